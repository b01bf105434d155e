"""Speculative decoding: n-gram draft trees, tree masks, exact acceptance, greedy output unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_default_model
from scipy import stats

from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.engine.speculative import Draft, SpeculativeConfig, propose_ngram, verify
from xytune.runtime.llm import LLM
from xytune.runtime.model.attention import tree_mask

REPETITIVE = [
    "Copy this sentence twice: the old lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "the old lighthouse keeper climbed the spiral stairs every evening at dusk.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4,",
    "Why is the sky blue?",
]


def test_propose_finds_the_newest_match_and_branches():
    cfg = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=2, max_branches=2)
    ctx = [7, 8, 1, 2, 3, 4, 9, 1, 2, 5, 6, 0, 1, 2]  # "1 2" continued by "3 4 .." and later by "5 6 .."
    d = propose_ngram(ctx, cfg, budget=4)
    assert d.tokens == [5, 6, 3, 4] and d.parents == [0, 1, 0, 3] and d.depths == [1, 2, 1, 2]
    chain = propose_ngram(ctx, SpeculativeConfig(num_speculative_tokens=3, max_branches=1), budget=8)
    assert chain.tokens == [5, 6, 0] and chain.parents == [0, 1, 2]
    assert propose_ngram([1, 2, 3, 4, 5], cfg, budget=4) is None  # no repeated suffix
    assert propose_ngram(ctx, cfg, budget=0) is None
    assert d.truncated(3).tokens == [5, 6, 3] and d.truncated(0) is None


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="at least 1"):
        SpeculativeConfig(num_speculative_tokens=0)


def test_tree_mask_sees_context_ancestors_and_self():
    m = tree_mask([-1, 0, 1, 0, 3], context_before=2)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_greedy_verify_follows_the_argmax_through_the_tree():
    vocab = 6
    draft = Draft(tokens=[2, 3, 4], parents=[0, 0, 2])  # rows 1 (tok 2), 2 (tok 3), 3 (tok 4, child of row 2)
    logits = torch.full((4, vocab), -5.0)
    logits[0, 3] = 5  # root picks 3: row 2
    logits[2, 4] = 5  # row 2 picks 4: row 3
    logits[3, 1] = 5  # bonus token
    r = verify(logits, draft, SamplingParams(temperature=0), None, [[]] * 4)
    assert r.tokens == [3, 4, 1] and r.path == [2, 3]
    r = verify(logits, draft, SamplingParams(temperature=0), None, [[3]] + [[]] * 3)  # min_tokens bans 3 first
    assert r.tokens[0] != 3 and r.path == [] and len(r.tokens) == 1


def test_sampled_verify_keeps_the_distribution_exact():
    """Emitted (first, second) token pairs follow p_root(x) * p_x(y), the plain sampler's law."""
    vocab, n = 5, 40000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g) * 1.5
    draft = Draft(tokens=[0, 3], parents=[0, 0])  # two candidate first tokens (p = 0.83 and 0.13 here)
    params = SamplingParams(temperature=0.8)
    counts = np.zeros((vocab, vocab + 1))  # column vocab: no second token (root draw rejected both)
    for _ in range(n):
        r = verify(logits, draft, params, g, [[]] * 3)
        counts[r.tokens[0], r.tokens[1] if len(r.tokens) > 1 else vocab] += 1
    p_root = torch.softmax(logits[0].double() / 0.8, -1).numpy()
    expected = np.zeros_like(counts)
    for x in range(vocab):
        if x in (0, 3):
            expected[x, :vocab] = p_root[x] * torch.softmax(logits[1 + (x == 3)].double() / 0.8, -1).numpy()
        else:
            expected[x, vocab] = p_root[x]
    mask = expected > 0
    assert counts[~mask].sum() == 0
    f_exp = expected[mask] / expected[mask].sum() * n  # renormalised: float rounding only
    chi = stats.chisquare(counts[mask], f_exp)
    assert chi.pvalue > 1e-3, chi


@pytest.fixture(scope="module")
def models():
    require_default_model()
    plain = LLM("smollm2-135m", dtype="float32", kv_cache_gb=0.25, enable_prefix_caching=False)
    spec = LLM("smollm2-135m", dtype="float32", kv_cache_gb=0.25, speculative="ngram", num_speculative_tokens=4)
    spec.model = plain.model  # one copy of the weights: the engines differ only in scheduling
    spec.engine.model = plain.model
    return plain, spec


def test_speculative_greedy_equals_plain_greedy(models):
    plain, spec = models
    p = SamplingParams(max_tokens=40, temperature=0)
    expected = [o.outputs[0].token_ids for o in plain.generate(REPETITIVE, p)]
    before = spec.engine.spec.accepted
    got = spec.generate(REPETITIVE, p)
    assert [o.outputs[0].token_ids for o in got] == expected
    st = spec.engine.spec
    assert st.accepted - before > 10, "the repetitive prompts should accept drafts"
    assert 0 < st.acceptance_rate <= 1 and st.tokens_per_step > 1
    assert spec.engine.kv.allocator.num_free == spec.engine.kv.num_blocks


def test_a_winning_side_branch_moves_its_kv_into_place(models, monkeypatch):
    """The right continuation sits on the second branch: its K/V rows must be moved to their positions."""
    plain, spec = models
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = plain.tokenizer.encode("Why is the sky blue?")
    truth = plain.generate([prompt], p)[0].outputs[0].token_ids
    sched = spec.engine.scheduler

    def oracle(req, budget):  # wrong first branch (2 nodes), the true next tokens on the second (3 nodes)
        k = len(req.output_ids)
        nxt = truth[k: k + 3]
        if len(nxt) < 3 or budget < 5:
            return None
        wrong = (nxt[0] + 1) % 1000
        return Draft(tokens=[wrong, wrong, nxt[0], nxt[1], nxt[2]], parents=[0, 1, 0, 3, 4])

    monkeypatch.setattr(sched, "_propose", oracle)
    before = spec.engine.spec.accepted
    out = spec.generate([prompt], p)[0].outputs[0]
    assert out.token_ids == truth
    assert spec.engine.spec.accepted - before >= 9


def test_seeded_sampling_with_speculation_is_reproducible(models):
    _, spec = models
    p = SamplingParams(max_tokens=24, temperature=0.7, seed=3, ignore_eos=True)
    a = spec.generate(REPETITIVE[:2], p)
    b = spec.generate(REPETITIVE[:2], p)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 24 for o in a)
