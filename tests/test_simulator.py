"""The serving simulator: the real Scheduler on a virtual clock, on tables with known step costs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import linear_latency, synthetic_rows

from xytune.profiler.cost_model import CostModel
from xytune.profiler.devices import get_device
from xytune.profiler.geometry import PRESETS
from xytune.profiler.table import CostTable, new_meta
from xytune.runtime.engine.block_manager import BlockAllocator
from xytune.runtime.engine.scheduler import SchedulerConfig
from xytune.runtime.engine.simulator import SimulatedEngine, TraceRequest, step_model
from xytune.runtime.engine.speculative import SpeculativeConfig
from xytune.runtime.engine.step_predictor import (
    STEP_TERMS,
    AttentionRequests,
    StepPredictor,
    decode_key_tiles,
    decode_terms,
)
from xytune.runtime.model.attention import AttentionPaths

GEOMETRY = PRESETS["smollm2-135m"]


def table(engine_steps: dict | None = None) -> CostModel:
    """GEMM rows from a known law, float32, with ``engine_steps`` (term -> value) as the table's fit."""
    meta = new_meta(get_device("cpu").fingerprint(), GEOMETRY.to_dict(),
                    {"gemm_flops": {"float32": 1e11}, "copy_bytes_per_s": 1e10}, {"dtypes": ["float32"]})
    meta["complete"] = True
    if engine_steps is not None:
        coef = {t: 0.0 for t in STEP_TERMS} | engine_steps
        meta["engine_steps"] = {"float32": {"coef": coef, "steps": 100, "median_ape": 0.05, "tile_kv": 256}}
    return CostModel(CostTable(synthetic_rows(GEOMETRY, linear_latency), meta))


# 10 ms a step plus 1 ms a token: every step's time is known by hand
KNOWN = {"step_s": 0.010, "token_s_per_k": 1.0}


def engine(policy="chunked", budget=64, max_num_seqs=256, num_blocks=1024, **kwargs) -> SimulatedEngine:
    return SimulatedEngine(table(KNOWN), "float32", SchedulerConfig(budget, max_num_seqs, policy), num_blocks,
                           **kwargs)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def test_ttft_and_token_times_of_a_hand_computed_trace():
    """Request A (100 tokens, 3 out) at 0 s; B (10 tokens, 2 out) at 0.1 s; budget 64, 10 ms + 1 ms/token a step.

    A: chunk 64 (74 ms), chunk 36 (46 ms) -> first token at 0.120. B arrived during that step, so the next
    step is A's decode + B's whole prompt (11 tokens, 21 ms) -> 0.141; then both decode (12 ms) -> 0.153.
    """
    sim = engine().replay([TraceRequest(0.0, prompt(100), 3), TraceRequest(0.1, prompt(10, 1), 2)])
    a, b = sorted(sim.requests, key=lambda r: r.arrival_s)
    assert a.first_token_s == pytest.approx(0.120, abs=1e-12)
    assert a.token_times_s == pytest.approx([0.120, 0.141, 0.153], abs=1e-12)
    assert b.first_token_s - b.arrival_s == pytest.approx(0.041, abs=1e-12)
    assert b.finish_s == pytest.approx(0.153, abs=1e-12)
    assert b.itl_s == pytest.approx([0.012], abs=1e-12)
    assert sim.duration_s == pytest.approx(0.153, abs=1e-12)
    assert [s.num_tokens for s in sim.steps] == [64, 36, 11, 2]
    assert (a.input_tokens, a.output_tokens, b.output_tokens) == (100, 3, 2)


def test_an_idle_server_waits_for_the_next_arrival_and_replays_start_at_zero():
    eng = engine()
    first = eng.replay([TraceRequest(5.0, prompt(20), 2)])
    assert first.requests[0].first_token_s == pytest.approx(5.030, abs=1e-12)  # 10 ms + 20 tokens
    again = eng.replay([TraceRequest(1.0, prompt(20), 2)])  # the clock runs on; times count from the replay
    assert again.requests[0].first_token_s == pytest.approx(1.030, abs=1e-12)


def test_prefill_first_with_max_num_seqs_running_still_finishes():
    """The real scheduler stalled here: prefill-first with every sequence slot taken and a prompt waiting
    scheduled nothing, for ever. The decodes now run until a slot frees."""
    sim = engine("prefill-first", max_num_seqs=1).replay([TraceRequest(0.0, prompt(30, i), 4) for i in range(3)])
    assert sorted(r.output_tokens for r in sim.requests) == [4, 4, 4]
    firsts = sorted(r.first_token_s for r in sim.requests)
    finishes = sorted(r.finish_s for r in sim.requests)
    assert firsts[1] > finishes[0] and firsts[2] > finishes[1]  # one at a time


def test_a_small_kv_pool_preempts_and_every_request_still_finishes():
    sim = engine(num_blocks=12).replay([TraceRequest(0.0, prompt(60, i), 40) for i in range(4)])  # 192 slots
    assert sorted(r.output_tokens for r in sim.requests) == [40] * 4
    assert sum(r.num_preemptions for r in sim.requests) > 0


def test_a_prompt_longer_than_the_pool_is_refused_before_the_replay():
    with pytest.raises(ValueError, match="tokens"):
        engine(num_blocks=2).replay([TraceRequest(0.0, prompt(40), 2)])


@pytest.mark.parametrize("acceptance, per_verify", [(1.0, 5.0), (0.0, 1.0)])
def test_speculative_verify_emits_accepted_drafts_plus_one(acceptance, per_verify):
    eng = engine(speculative=SpeculativeConfig(num_speculative_tokens=4), acceptance_rate=acceptance)
    sim = eng.replay([TraceRequest(0.0, prompt(20), 21)])
    assert sim.requests[0].output_tokens == 21
    assert eng.spec.tokens_per_step == per_verify
    assert eng.spec.acceptance_rate == acceptance
    assert max(s.num_verify_tokens for s in sim.steps) == 5  # the pending token and four drafts in one chunk


def test_the_xy_policy_runs_on_the_simulated_clock_and_is_deterministic():
    trace = [TraceRequest(0.05 * i, prompt(int(50 + 30 * (i % 5)), i), 8 + i % 3) for i in range(30)]
    runs = [engine("xy", budget=256).replay(trace) for _ in range(2)]
    assert [r.finish_s for r in runs[0].requests] == [r.finish_s for r in runs[1].requests]
    assert len(runs[0].requests) == 30


def test_without_an_engine_step_fit_a_step_is_its_gemm_and_attention_rows():
    model = table()
    with pytest.warns(UserWarning, match="no engine-step fit"):
        truth, source = step_model(model, "float32")
    assert "GEMM and attention rows only" in source
    gemms = model.predict_step(16, num_logits=16, dtype="float32")
    assert truth.predict(16, 16, 0.0) == pytest.approx(gemms, rel=1e-12)  # the synthetic table has no attention


def test_a_fit_stored_with_the_table_is_what_the_simulator_and_the_engine_start_from():
    model = table({"step_s": 0.02, "split_tile_s_per_100": 0.5, "decode_key_s_per_m": 2.0,
                   "plan_s_per_k_requests": 1.0, "loop_s_per_k_requests": 3.0, "plan_step_s": 0.004})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a table with a fit warns of nothing
        truth, source = step_model(model, "float32")
    assert "engine-step fit" in source
    keys = [100, 300, 600]
    tiles, spanned = decode_terms(keys, 256)
    assert tiles == decode_key_tiles(keys, 256) == 0 + 1 + 2  # the chunks past each decode's first
    assert spanned == 256 * (1 + 2 + 3)  # every tile as wide as the longest range allows: 256
    assert decode_terms([40, 70], 256) == (0.0, 80 * 2)  # short contexts shrink the tile to the longest, 16-aligned
    assert decode_terms([40, 70], 256, padded=False) == (0.0, 40 + 70)  # one call per request: its own keys
    expected = 0.02 + 0.005 * tiles + 2.0e-6 * spanned + 1.0e-3 * 3 + 0.004  # three requests planned, once
    assert truth.predict(3, 3, 0.0, keys, planned=3) == pytest.approx(expected, rel=1e-12)
    looped = 0.02 + 0.005 * tiles + 2.0e-6 * sum(keys) + 3.0e-3 * 3  # nothing planned: no plan's step cost
    assert truth.predict(3, 3, 0.0, keys, looped=3) == pytest.approx(looped, rel=1e-12)
    started = StepPredictor.from_table(model, "float32")
    assert started.tile_kv == 256 and started.predict(3, 3, 0.0, keys, 3) == truth.predict(3, 3, 0.0, keys, 3)


def test_a_decode_step_of_the_same_requests_as_the_last_reuses_its_plan():
    meta = AttentionRequests()
    assert meta.count(("a", "b"), decode_only=True) == (2, 0)  # nothing to advance yet
    assert meta.count(("a", "b"), decode_only=True) == (0, 0)  # advanced
    assert meta.count(("a", "b", "c"), decode_only=False) == (3, 0)  # a prefill chunk joined: planned afresh
    assert meta.count(("a", "b"), decode_only=True) == (2, 0)  # the plan before it was not kept
    assert meta.count(("b", "a"), decode_only=True) == (2, 0)  # another order is another plan


def test_a_step_on_the_sdpa_loop_path_runs_every_request_alone_and_keeps_no_plan():
    mixed_loop = AttentionRequests(AttentionPaths(decode=((1, 2.0),), prefill=((1, 0.5),)))  # (requests, loop / meta)
    assert mixed_loop.count(("a", "b"), decode_only=True) == (2, 0)
    assert mixed_loop.count(("a", "b", "c"), decode_only=False) == (0, 3)
    assert mixed_loop.count(("a", "b"), decode_only=True) == (2, 0)
    assert mixed_loop.would_count(4, decode_only=False) == (0, 4) and mixed_loop.would_count(4, True) == (4, 0)
    # decodes loop for a few requests and plan for many (the loop 0.8x Meta-Attention's time at 8, 1.2x at 32)
    by_count = AttentionRequests(AttentionPaths(decode=((8, 0.8), (32, 1.2))))
    assert by_count.count(("a",), decode_only=True) == (0, 1)
    assert by_count.count(("a",), decode_only=True) == (0, 1)  # a loop step keeps no plan to advance
    many = tuple("abcdefghijklmnopqrstuvwxyz")
    assert by_count.count(many, decode_only=True) == (26, 0)
    assert by_count.count(many, decode_only=True) == (0, 0)  # advanced
    assert by_count.would_count(2, decode_only=True) == (0, 2) and by_count.would_count(40, True) == (40, 0)


def test_reset_prefix_cache_forgets_only_blocks_nobody_holds():
    alloc = BlockAllocator(4, enable_prefix_caching=True)
    held, released = alloc.allocate(1), alloc.allocate(1)
    alloc.register(held[0], 11)
    alloc.register(released[0], 22)
    alloc.free(released)
    assert alloc.lookup([22]) == released
    alloc.free(released)
    alloc.reset_prefix_cache()
    assert alloc.lookup([22]) == [] and alloc.num_free == 3
    assert alloc.lookup([11]) == held  # still held by its request: still findable
