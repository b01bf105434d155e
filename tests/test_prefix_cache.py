"""Prefix cache: hashed full blocks reused across requests, LRU eviction, reference counts, hit rate."""

from __future__ import annotations

import pytest
from conftest import require_default_model

from xytune.runtime.engine.block_manager import BlockAllocator, block_hashes
from xytune.runtime.engine.engine import Engine
from xytune.runtime.engine.protocol import run_to_completion
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6], 2, 3)
    b = block_hashes([9, 2, 3, 4, 5, 6], 2, 3)
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b)), "a different first block changes every later hash"
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, 3, start=1, parent=a[0]) == a[1:]


def test_cached_blocks_survive_release_and_are_evicted_oldest_first():
    alloc = BlockAllocator(4, enable_prefix_caching=True)
    a, b = alloc.allocate(2)
    alloc.register(a, 111)
    alloc.register(b, 222)
    alloc.free([a, b])
    assert alloc.num_free == 4 and alloc.num_cached == 2
    assert alloc.lookup([111, 222, 333]) == [a, b]  # found after release
    assert alloc.num_free == 2
    alloc.free([a, b])  # released tail first (as vLLM does): the tail block b is the older
    taken = alloc.allocate(3)  # two never-used blocks, then the LRU cached one
    assert b in taken and a not in taken
    assert alloc.lookup([222]) == []
    assert alloc.lookup([111, 222]) == [a]  # the prefix outlives its tail
    with pytest.raises(MemoryError):
        alloc.allocate(1)


def test_shared_blocks_are_reference_counted():
    alloc = BlockAllocator(3, enable_prefix_caching=True)
    (a,) = alloc.allocate(1)
    alloc.register(a, 7)
    assert alloc.lookup([7]) == [a]  # a second owner
    alloc.free([a])
    assert alloc.num_free == 2  # still held by the first owner
    alloc.free([a])
    assert alloc.num_free == 3


def test_disabled_cache_never_finds_anything():
    alloc = BlockAllocator(2)
    (a,) = alloc.allocate(1)
    alloc.register(a, 5)
    alloc.free([a])
    assert alloc.lookup([5]) == [] and alloc.num_cached == 0


@pytest.fixture(scope="module")
def llm():
    require_default_model()
    return LLM("smollm2-135m", dtype="float32", kv_cache_gb=0.25)


SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and keep a friendly "
          "tone. The user is a student preparing for an exam in physics and chemistry. ")


def test_a_shared_prefix_hits_and_outputs_stay_exact(llm):
    p = SamplingParams(max_tokens=16, temperature=0)
    qs = [SYSTEM + "What is entropy?", SYSTEM + "What is a mole?", SYSTEM + "Why does ice float?"]
    cold = Engine(llm.model, llm.tokenizer, num_blocks=64, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids
                for o in run_to_completion(cold, [cold.add_request(llm.tokenizer.encode(q), p) for q in qs])]
    eng = Engine(llm.model, llm.tokenizer, num_blocks=64, enable_prefix_caching=True)
    first = run_to_completion(eng, [eng.add_request(llm.tokenizer.encode(qs[0]), p)])
    rest = run_to_completion(eng, [eng.add_request(llm.tokenizer.encode(q), p) for q in qs[1:]])
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    shared = len(llm.tokenizer.encode(SYSTEM)) // 16 * 16
    alloc = eng.kv.allocator
    assert alloc.hit_tokens >= 2 * shared > 0
    assert 0 < alloc.hit_rate < 1
    assert alloc.num_free == 64


def test_cached_prefix_skips_prefill_work(llm):
    p = SamplingParams(max_tokens=1, temperature=0)
    ids = llm.tokenizer.encode(SYSTEM * 3)
    eng = Engine(llm.model, llm.tokenizer, num_blocks=64, enable_prefix_caching=True)
    run_to_completion(eng, [eng.add_request(ids, p)])
    n_before = sum(s.num_tokens for s in eng.step_stats)
    again = eng.add_request(ids, p)
    run_to_completion(eng, [again])
    n_again = sum(s.num_tokens for s in eng.step_stats) - n_before
    assert n_before == len(ids)
    assert again.num_cached_tokens == (len(ids) - 1) // 16 * 16
    assert n_again == len(ids) - again.num_cached_tokens < 16


def test_prefix_cache_with_preemption_keeps_outputs(llm):
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [SYSTEM + q for q in ("Define force.", "Define energy.", "Define mass.", "Define heat.")]
    ids = [llm.tokenizer.encode(q) for q in prompts]
    cold = Engine(llm.model, llm.tokenizer, num_blocks=64, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in run_to_completion(cold, [cold.add_request(i, greedy) for i in ids])]
    eng = Engine(llm.model, llm.tokenizer, num_blocks=14, enable_prefix_caching=True)
    outs = run_to_completion(eng, [eng.add_request(i, greedy) for i in ids])
    assert eng.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert eng.kv.allocator.num_free == 14
