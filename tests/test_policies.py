"""The three scheduling policies on the real model: same outputs, different step shapes."""

from __future__ import annotations

import warnings

import pytest
from conftest import REFERENCE_TABLE, require_default_model

from xytune.runtime.engine.protocol import run_to_completion
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.engine.scheduler import SchedulerConfig
from xytune.runtime.llm import LLM

REFERENCE = REFERENCE_TABLE  # a table from some machine: read with allow_mismatch
PROMPTS = ["Tell me about the moon. " * 8, "List three colors:", "Why do cats purr? " * 5, "Count: 1, 2, 3,",
           "The best way to learn is " * 6]


@pytest.fixture(scope="module")
def llm():
    require_default_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference table may come from another CPU
        return LLM(dtype="float32", kv_cache_gb=0.25, profile=str(REFERENCE), allow_mismatch=True,
                   max_num_batched_tokens=64, enable_prefix_caching=False)  # every run prefills anew


def run(llm, policy, slo_ms=100.0):
    eng = llm.engine
    eng.scheduler.reconfigure(max_num_batched_tokens=64, max_num_seqs=256, policy=policy, tbt_slo_ms=slo_ms,
                              align=16)
    eng.step_stats.clear()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reqs = [eng.add_request(llm.tokenizer.encode(p), params) for p in PROMPTS[:2]]
    eng.step()  # two requests start decoding, then three more arrive
    reqs += [eng.add_request(llm.tokenizer.encode(p), params) for p in PROMPTS[2:]]
    outs = run_to_completion(eng, reqs)
    return [o.outputs[0].token_ids for o in outs], list(eng.step_stats)


def test_policies_agree_on_outputs_and_differ_in_steps(llm):
    chunked, chunked_steps = run(llm, "chunked")
    first, first_steps = run(llm, "prefill-first")
    xy, xy_steps = run(llm, "xy", slo_ms=1000.0)
    assert chunked == first == xy
    assert all(s.num_tokens <= 64 for s in chunked_steps + first_steps + xy_steps)
    # chunked mixes decode tokens into prefill steps; prefill-first never does
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in chunked_steps)
    assert not any(s.num_prefill_tokens and s.num_decode_tokens for s in first_steps)
    # xy predicted every step and learned a calibration from the measurements
    assert all(s.predicted_seconds is not None for s in xy_steps)
    assert llm.engine.predictor.error_summary(skip=0)["steps"] > 0


def test_xy_sizes_prefill_to_the_slo(llm, monkeypatch):
    run(llm, "xy", slo_ms=1000.0)  # calibrates the predictor on this machine
    predictor = llm.engine.predictor
    slo_ms = predictor.predict(2 + 32, 3) * 1e3  # room for about 32 prefill tokens beside two decodes
    sched = llm.engine.scheduler
    # the rest of every request's tokens expected at the SLO itself: no slack, the plain pace rule
    monkeypatch.setattr(sched.xy, "recent_step_seconds", lambda: sched.config.tbt_slo_ms / 1e3)
    _, steps = run(llm, "xy", slo_ms=slo_ms)
    mixed = [s for s in steps if s.num_decode_tokens and s.num_prefill_tokens]
    assert mixed, "some steps should mix decode and prefill tokens"
    assert max(s.num_prefill_tokens for s in mixed) < 64
    # a loose SLO admits more prefill tokens per mixed step than a tight one
    _, loose = run(llm, "xy", slo_ms=5000.0)
    loose_mixed = [s for s in loose if s.num_decode_tokens and s.num_prefill_tokens]
    assert max(s.num_prefill_tokens for s in loose_mixed) > max(s.num_prefill_tokens for s in mixed)
    # an SLO no step can meet (the decodes alone are over it): xy serves the throughput-best step, so
    # prompts advance by more than one aligned chunk beside the decodes (tests/test_xy_fallback.py)
    outs, starved = run(llm, "xy", slo_ms=0.001)
    assert all(len(o) == 12 for o in outs)
    assert max(s.num_prefill_tokens for s in starved if s.num_decode_tokens) > 16 + 2
    # nobody decoding: nothing to protect, a prefill step takes the whole token budget
    assert max(s.num_prefill_tokens for s in starved if not s.num_decode_tokens) > 16 + 2
    # decode steps measured at a fifth of the SLO leave slack: the same SLO admits larger prefill chunks
    monkeypatch.setattr(sched.xy, "recent_step_seconds", lambda: sched.config.tbt_slo_ms / 5e3)
    _, slack = run(llm, "xy", slo_ms=slo_ms)
    slack_mixed = [s for s in slack if s.num_decode_tokens and s.num_prefill_tokens]
    assert max(s.num_prefill_tokens for s in slack_mixed) > max(s.num_prefill_tokens for s in mixed)


def test_step_deadline_spends_the_slack_of_requests_ahead_of_their_pace(llm):
    from xytune.runtime.engine.scheduler import Request

    sched = llm.engine.scheduler
    sched.reconfigure(max_num_batched_tokens=64, max_num_seqs=256, policy="xy", tbt_slo_ms=100.0, align=16)
    with pytest.raises(ValueError):
        sched.reconfigure(max_num_batched_tokens=0)  # checked as a new config is, and left unchanged
    assert sched.config.max_num_batched_tokens == 64
    now = 1000.0
    def decoding(rid, tokens, since, max_tokens=16, ttft=0.2):
        return Request(rid, [1, 2], SamplingParams(max_tokens=max_tokens), arrival=now - since - ttft,
                       output_ids=[5] * tokens, first_token_time=now - since)

    ahead = decoding("a", 10, 0.7)  # 10 tokens in 0.7 s
    late = decoding("b", 10, 2.0, max_tokens=48)  # 10 in 2 s: behind its pace, but 38 more tokens can catch up
    slo = 0.1  # with the rest of the tokens expected at the SLO, the rule is the plain pace
    assert sched.xy.step_deadline([(ahead, 1)], now, slo) == pytest.approx(0.3)  # token 11 is due 0.3 s from now
    assert sched.xy.step_deadline([(ahead, 1), (late, 1)], now, slo) == pytest.approx(0.1)  # the late one: the SLO
    # decoders that missed their SLOs whatever happens next set no deadline: 10 of at most 16 tokens in 2 s
    # (over 15 x 0.1 s already), or a first token after the 2 s TTFT SLO
    lost_tpot, lost_ttft = decoding("l", 10, 2.0), decoding("t", 10, 0.7, ttft=2.5)
    assert sched.xy.step_deadline([(ahead, 1), (lost_tpot, 1), (lost_ttft, 1)], now, slo) == pytest.approx(0.3)
    assert sched.xy.step_deadline([(lost_tpot, 1), (lost_ttft, 1)], now, slo) == pytest.approx(0.8)  # nothing to protect
    far_ahead = decoding("c", 50, 0.1)
    assert sched.xy.step_deadline([(far_ahead, 1)], now, slo) == pytest.approx(0.8)  # capped at 8x the SLO
    assert sched.xy.step_deadline([], now, slo) == pytest.approx(0.1)
    # fast steps leave slack: a request that just got its first token, expecting 15 more at 30 ms each, can
    # take 16 x 0.1 - 15 x 0.03 = 1.15 s (capped to 0.8 s); one with 3 tokens to go 3 x 0.1 - 2 x 0.03 = 0.24 s
    fresh, short = decoding("f", 1, 0.0, max_tokens=48), decoding("s", 1, 0.0, max_tokens=4)
    assert sched.xy.step_deadline([(fresh, 1)], now, 0.03) == pytest.approx(0.8)
    assert sched.xy.step_deadline([(short, 1)], now, 0.03) == pytest.approx(0.24)
    assert sched.xy.step_deadline([(fresh, 1), (short, 1)], now, 0.03) == pytest.approx(0.24)
    # a request whose length is known (ignore_eos, no stops) counts all of its tokens to come: 47 x 0.1 -
    # 46 x 0.09 = 0.56 s, where the same request that may stop early counts 16: 16 x 0.1 - 15 x 0.09 = 0.25 s
    known = Request("k", [1, 2], SamplingParams(max_tokens=48, ignore_eos=True), arrival=now - 0.2,
                    output_ids=[5], first_token_time=now)
    assert sched.xy.step_deadline([(known, 1)], now, 0.09) == pytest.approx(0.56)
    assert sched.xy.step_deadline([(fresh, 1)], now, 0.09) == pytest.approx(0.25)
    known.params.stop_token_ids.append(7)  # a stop token can end it early: back to 16
    assert sched.xy.step_deadline([(known, 1)], now, 0.09) == pytest.approx(0.25)
    # slow steps take slack away: 3 x 0.1 - 2 x 0.2 < the SLO, so the step gets the SLO
    assert sched.xy.step_deadline([(short, 1)], now, 0.2) == pytest.approx(0.1)
    # a prompt that has waited over half its TTFT SLO (2 s) lets the step run 2x the TBT SLO
    waiting = Request("w", [1, 2, 3], SamplingParams(), arrival=now - 1.5)
    sched.waiting.append(waiting)
    try:
        assert sched.xy.step_deadline([(late, 1)], now, 0.1) == pytest.approx(0.2)
        waiting.arrival = now - 0.5
        assert sched.xy.step_deadline([(late, 1)], now, 0.1) == pytest.approx(0.1)
    finally:
        sched.waiting.remove(waiting)


def test_xy_needs_a_cost_table():
    from xytune.runtime.engine.kv_cache import KVCache
    from xytune.runtime.engine.scheduler import Scheduler

    with pytest.raises(ValueError, match="cost table"):
        Scheduler(SchedulerConfig(policy="xy"), KVCache(1, 4, 16, 1, 8, __import__("torch").float32))
    with pytest.raises(ValueError, match="policy must be"):
        SchedulerConfig(policy="fastest")


def test_xy_serves_prompts_that_can_still_meet_their_ttft_first(llm):
    from xytune.runtime.engine.scheduler import Request

    sched = llm.engine.scheduler
    sched.config = SchedulerConfig(64, 256, "xy", 100.0, 16, ttft_slo_ms=2000.0)
    now = 1000.0
    late_old = Request("a", [1, 2], SamplingParams(), arrival=now - 3.0)  # missed its 2 s TTFT already
    late = Request("b", [1, 2], SamplingParams(), arrival=now - 2.5)
    fresh_old = Request("c", [1, 2], SamplingParams(), arrival=now - 1.5)
    fresh = Request("d", [1, 2], SamplingParams(), arrival=now - 0.1)
    order = sched.xy.slo_order([late_old, late, fresh_old, fresh], now)
    assert [r.request_id for r in order] == ["c", "d", "a", "b"]  # FCFS within each half, nobody dropped
