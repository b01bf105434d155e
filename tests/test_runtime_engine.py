"""Engine behaviour on the real default model: KV accounting, preemption, sampling, stops, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import DOOMED_SEED, break_sampling_for_one_seed, require_default_model

from xytune.runtime import llm as llm_module
from xytune.runtime.engine.block_manager import BlockAllocator
from xytune.runtime.engine.engine import Engine, RequestError
from xytune.runtime.engine.protocol import (
    AbortRequest,
    AddRequest,
    RequestRejected,
    StepDone,
    StopEngine,
    drive,
    run_to_completion,
)
from xytune.runtime.engine.sampling import SamplingParams, filter_logits, row_argmax
from xytune.runtime.llm import LLM


@pytest.fixture(scope="module")
def llm():
    require_default_model()
    return LLM("smollm2-135m", dtype="float32", kv_cache_gb=0.25)


PROMPTS = ["Tell me a story about a dragon.", "List five fruits:", "The history of Rome", "Explain gravity.",
           "Write a poem about autumn leaves falling", "Why is the sky blue?"]


def test_blocks_return_to_the_pool(llm):
    kv = llm.engine.kv
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert kv.allocator.num_free == kv.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_preemption_under_a_small_cache_keeps_outputs_exact(llm):
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    expected = llm.generate(PROMPTS, greedy)
    engine = Engine(llm.model, llm.tokenizer, num_blocks=12, block_size=16)  # 6 requests need 24 blocks
    outs = run_to_completion(engine, [engine.add_request(llm.tokenizer.encode(p), greedy) for p in PROMPTS])
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small for all requests"
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    for got, want in zip(outs, expected):  # recomputed requests record each logprob once
        assert len(got.prompt_logprobs) == len(got.prompt_token_ids) and got.prompt_logprobs[0] is None
        assert [e[0] for e in got.prompt_logprobs[1:]] == pytest.approx([e[0] for e in want.prompt_logprobs[1:]],
                                                                          abs=1e-4)
        got_lp, want_lp = got.outputs[0].logprobs, want.outputs[0].logprobs
        assert [e[0] for e in got_lp] == pytest.approx([e[0] for e in want_lp], abs=1e-4)
    assert sum(o.metrics["num_preemptions"] for o in outs) == engine.scheduler.num_preemptions
    assert engine.kv.allocator.num_free == 12


def test_seeded_sampling_is_reproducible_and_varies(llm):
    p = dict(max_tokens=24, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], SamplingParams(**p, seed=7))
    b = llm.generate(PROMPTS[:2], SamplingParams(**p, seed=7))
    c = llm.generate(PROMPTS[:2], SamplingParams(**p, seed=8))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].token_ids for o in a] != [o.outputs[0].token_ids for o in c]
    # The same seed gives the same tokens whether the request runs alone or in a batch.
    alone = llm.generate(PROMPTS[0], SamplingParams(**p, seed=7))
    assert alone[0].outputs[0].token_ids == a[0].outputs[0].token_ids


def test_top_k_and_top_p_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(k2[2:]).all() and torch.isfinite(k2[:2]).all()
    probs = logits.softmax(-1)  # [0.636, 0.234, 0.086, ...]
    p = filter_logits(logits, 1.0, -1, 0.8)
    assert torch.isfinite(p[:2]).all() and torch.isinf(p[2:]).all()
    assert probs[0] < 0.8 < probs[0] + probs[1]
    tiny = filter_logits(logits, 1.0, -1, 0.01)
    assert torch.isfinite(tiny[0]) and torch.isinf(tiny[1:]).all()
    assert torch.allclose(filter_logits(logits, 2.0, -1, 1.0).softmax(-1), (logits / 2).softmax(-1))
    # min_p: keep tokens at least this likely relative to the top one (e^-1 = 0.37 of it for the second)
    kept = filter_logits(logits, 1.0, -1, 1.0, min_p=0.3)
    assert torch.isfinite(kept[:2]).all() and torch.isinf(kept[2:]).all()
    assert torch.isfinite(filter_logits(logits, 1.0, -1, 1.0, min_p=1.0)).sum() == 1
    assert torch.isfinite(filter_logits(logits, 2.0, -1, 1.0, min_p=0.3)).sum() == 3  # after temperature


def test_extreme_sampling_values_sample_instead_of_failing():
    """Found by fuzzing the server: a temperature of 1e-38 or a repetition penalty of 1e308 made the softmax
    NaN and torch.multinomial raise. Such values are valid; they sample like greedy (or penalise hard)."""
    from xytune.runtime.engine.sampling import adjust_logits, sample

    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5]])
    gen = torch.Generator().manual_seed(0)
    cold = SamplingParams(temperature=1.175494351e-38)
    assert sample(logits.clone(), [cold], [gen]) == [0]
    assert SamplingParams(temperature=5e-155).greedy  # 0 in float32: greedy, as vLLM does below 1e-5
    for penalty in (7.9e307, 1e-300):
        params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
        z = adjust_logits(logits[0].clone(), params, [0, 2], [1])
        assert not torch.isnan(z).any() and z.argmax() == (3 if penalty > 1 else 0)
        assert sample(z[None].clone(), [params], [gen])[0] in range(4)
    row = logits[0].clone()
    adjust_logits(row, SamplingParams(repetition_penalty=5e-324), [0], [])  # in place, as the model runner calls it
    assert not torch.isnan(row).any()
    assert sample(logits.clone(), [SamplingParams(top_p=5e-324)], [gen]) == [0]  # top_p rounds to 0 in float32
    with pytest.raises(ValueError, match="seed must be in"):  # a generator cannot take it: refused, not a crash
        SamplingParams(temperature=1.0, seed=-881910654389628436480)
    banned = SamplingParams(temperature=0.7)  # every token banned (stop tokens before min_tokens): no NaN draw
    assert sample(logits.clone(), [banned], [gen], [[0, 1, 2, 3]]) == [0]


def test_row_argmax_takes_the_first_maximum_like_torch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (64, 1000), generator=gen).float()  # many ties per row
    logits[5] = float("-inf")
    logits[6, 10] = float("inf")
    assert row_argmax(logits) == logits.argmax(-1).tolist()
    assert row_argmax(logits.bfloat16()) == logits.argmax(-1).tolist()  # the torch path for other dtypes
    assert row_argmax(logits[:, ::2]) == logits[:, ::2].argmax(-1).tolist()  # strided rows


def test_bad_words_ban_a_last_token_only_after_the_rest_of_the_word():
    from xytune.runtime.engine.sampling import adjust_logits

    params = SamplingParams(bad_words_ids=[[5], [7, 8, 9]])
    z = adjust_logits(torch.zeros(12), params, prompt_ids=[1], output_ids=[3, 7])
    assert torch.isinf(z).nonzero().flatten().tolist() == [5]  # the one-token word only: 7 8 is not yet out
    z = adjust_logits(torch.zeros(12), params, prompt_ids=[1], output_ids=[3, 7, 8])
    assert torch.isinf(z).nonzero().flatten().tolist() == [5, 9]


def test_stop_strings_stop_ids_and_lengths(llm):
    base = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    assert " 8," in base.text
    cut = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=30, temperature=0, stop=[" 8,"]))[0].outputs[0]
    assert cut.finish_reason == "stop" and base.text.startswith(cut.text) and " 8," not in cut.text
    stop_id = base.token_ids[5]
    by_id = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=30, temperature=0,
                                                          stop_token_ids=[stop_id]))[0].outputs[0]
    first = base.token_ids.index(stop_id)
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: first + 1]
    late = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id],
                                                         min_tokens=first + 2))[0].outputs[0]
    assert stop_id not in late.token_ids[: first + 2]


def test_eos_finishes_with_stop(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=200, temperature=0))[0]
    assert out.prompt.startswith("<|im_start|>") and out.finished
    out = out.outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids
    assert "4" in out.text and "<|im_end|>" not in out.text


def test_bad_requests(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match="context holds"):
        llm.generate([[5] * (llm.engine.max_model_len + 3)], SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[10**7]], SamplingParams())
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-5),
                dict(min_tokens=5, max_tokens=2), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("bad, message", [
    (dict(dtype="int3"), "Unknown dtype"), (dict(gemm="fast"), "gemm must be one of"),
    (dict(attention="flash"), "attention must be one of"), (dict(gemm="smooth"), "give profile=TABLE"),
    (dict(quantization="int2"), "quantization must be one of"), (dict(weight_memory_gb=0), "weight_memory_gb"),
    (dict(profile="/no/such/table.parquet"), "does not exist"), (dict(model="/no/such/model"), "not found")])
def test_bad_arguments_are_refused_before_the_checkpoint_loads(monkeypatch, bad, message):
    def load_checkpoint(model):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(llm_module, "load_checkpoint", load_checkpoint)
    with pytest.raises(ValueError, match=message):
        LLM(**{"dtype": "float32", **bad})


def test_allocator_refuses_overdraw():
    a = BlockAllocator(4)
    got = a.allocate(3)
    with pytest.raises(MemoryError):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4 and sorted(a.allocate(4)) == [0, 1, 2, 3]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "xytune.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_cli(llm):
    proc = _cli("--prompt", "The capital of France is", "--max-tokens", "8", "--dtype", "float32", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["finish_reason"] == "length" and out["timings"]["ttft_s"] > 0 and "logprobs" not in out
    proc = _cli("--prompt", "one two one two one", "--max-tokens", "8", "--dtype", "float32", "--json",
                "--repetition-penalty", "1.3", "--logprobs", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = llm.generate("one two one two one", SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3,
                                                                 logprobs=2))[0].outputs[0]
    assert out["token_ids"] == expected.token_ids
    assert [e["logprob"] for e in out["logprobs"]] == pytest.approx([lp for lp, _ in expected.logprobs], abs=1e-4)
    assert [[t["id"] for t in e["top"]] for e in out["logprobs"]] == [[t for t, _ in top] for _, top in expected.logprobs]
    for args, needle in [(["--model", "/no/such/model"], "not found"), (["--dtype", "int3"], "Unknown dtype"),
                         (["--temperature", "-2"], "temperature"), (["--device", "cuda:7"], "cuda"),
                         (["--presence-penalty", "3"], "presence_penalty")]:
        proc = _cli("--prompt", "hi", *args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_adjust_logits_applies_bias_then_repetition_then_output_penalties():
    from xytune.runtime.engine.sampling import adjust_logits, top_logprobs

    z = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={4: 10.0})
    out = adjust_logits(z.clone(), p, prompt_ids=[0], output_ids=[1, 3, 3])
    # 0: prompt only, 2.0 / 2; 1: once in the output, -1 * 2 - 0.5 - 0.25; 2: untouched;
    # 3: twice, 3 / 2 - 1.0 - 0.25; 4: biased to 8.0, not seen
    assert out.tolist() == pytest.approx([1.0, -2.75, 0.5, 0.25, 8.0])
    lp, top = top_logprobs(z[None], [3], [2])[0]
    ref = torch.log_softmax(z, -1)
    assert lp == pytest.approx(float(ref[3]))
    assert top == [(3, pytest.approx(float(ref[3]))), (0, pytest.approx(float(ref[0])))]
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                dict(logit_bias={1: 101}), dict(logprobs=21), dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(RequestError, match="logit_bias names token id"):
        llm.engine.add_request([1, 2, 3], SamplingParams(logit_bias={10**9: 1.0}))
    forced = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                    logit_bias={42: 100.0}))[0].outputs[0]
    assert forced.token_ids == [42] * 5


def test_a_request_that_fails_in_the_engine_fails_alone(llm, monkeypatch):
    """A sampler that raises for one request's parameters (as a bug would) fails that request only: the
    others in its steps produce exactly what they produce without it, and the engine serves on."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], greedy)]
    break_sampling_for_one_seed(monkeypatch)
    doomed = SamplingParams(max_tokens=8, temperature=0.8, seed=DOOMED_SEED, ignore_eos=True)
    outs = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [greedy, doomed, greedy])
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == expected
    assert not llm.engine.requests and not llm.engine.scheduler.running
    assert llm.engine.kv.allocator.num_free == llm.engine.kv.num_blocks  # its blocks went back too
    monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], greedy)] == expected


def test_the_engine_loop_takes_commands_and_publishes_text_and_rejections(llm):
    """``drive``, the loop of the server thread, the engine process and the bench: a request it cannot take
    is rejected alone, an aborted one stops publishing, and the text the steps publish adds up to what
    ``LLM.generate`` returns, cut at a stop string the same way."""
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPTS[0], greedy)[0].outputs[0]
    stop = expected.text[len(expected.text) // 2:][:3]
    stopping = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    inbox = [[AddRequest("a", llm.tokenizer.encode(PROMPTS[0]), greedy),
              AddRequest("bad", [], greedy),
              AddRequest("s", llm.tokenizer.encode(PROMPTS[0]), stopping),
              AddRequest("gone", llm.tokenizer.encode(PROMPTS[1]), greedy)],
             [AbortRequest("gone"), StopEngine()]]
    text, tokens, finished, rejected = {}, {}, {}, {}

    def publish(msg):
        if isinstance(msg, RequestRejected):
            rejected[msg.request_id] = msg.message
        elif isinstance(msg, StepDone):
            for rid, u in msg.updates:
                text[rid] = text.get(rid, "") + u.text
                tokens[rid] = tokens.get(rid, []) + u.token_ids
                if u.finished:
                    finished[rid] = u.finish_reason

    drive(llm.engine, lambda wait_s: inbox.pop(0) if inbox else [], publish)
    assert rejected == {"bad": "The prompt is empty."}
    assert finished == {"a": "length", "s": "stop"} and len(tokens["gone"]) == 1
    assert text["a"] == expected.text and tokens["a"] == expected.token_ids
    assert text["s"] == expected.text[: expected.text.index(stop)]
    assert not llm.engine.requests and llm.engine.kv.allocator.num_free == llm.engine.kv.num_blocks
