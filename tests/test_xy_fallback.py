"""xy on a machine too slow for its SLO: it serves at the throughput the table allows and never starves prompts.

The scheduler runs for real against a virtual clock: every step takes what the (synthetic) cost table
predicts, so the figures are the table's, not this machine's, and the test holds on any CPU.
"""

from __future__ import annotations

import torch
from conftest import synthetic_cost_model, synthetic_rows

from xytune.profiler.geometry import PRESETS
from xytune.runtime.engine.kv_cache import KVCache
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.engine.scheduler import Request, Scheduler, SchedulerConfig
from xytune.runtime.engine.step_predictor import StepPredictor, attention_pairs


def slow_machine(prim, m, n, k):
    """A machine on which even one decode token's step takes far over a 200 ms SLO: 1 s of fixed cost per
    GEMM call stack plus a per-token cost, so larger steps are more efficient per token."""
    return 1.0 / 150 + m * n * k * 2e-12


def _predictor(tmp_path):
    ms = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    rows = synthetic_rows(PRESETS["smollm2-135m"], slow_machine, primitives=("p",), ms=ms)
    return StepPredictor(synthetic_cost_model(tmp_path / "slow.parquet", rows), "float32")


def simulate(policy: str, tmp_path, budget: int = 512, num_requests: int = 12,
             tbt_slo_ms: float | None = None) -> tuple[float, list, list]:
    """Requests of 100-400 prompt tokens and 8-40 outputs, all waiting at t=0; the virtual seconds to
    finish them all, the finished requests and the prefill tokens of every step that had decodes too."""
    predictor = _predictor(tmp_path)
    assert predictor.predict(1, 1) > 0.2  # a lone decode token already misses the 200 ms SLO
    sched = Scheduler(SchedulerConfig(budget, 256, policy, tbt_slo_ms, tpot_slo_ms=200.0),
                      KVCache(1, 4096, 16, 1, 8, torch.float32), predictor)
    rng = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(num_requests):
        prompt = torch.randint(5, 1000, (int(torch.randint(100, 401, (1,), generator=rng)),), generator=rng)
        req = Request(f"r{i}", prompt.tolist(), SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True))
        sched.add(req)
        reqs.append(req)
    clock, mixed_prefill = 0.0, []
    for _ in range(10_000):
        if not sched.has_work():
            break
        scheduled = sched.schedule().scheduled
        assert scheduled, "a step with work waiting must schedule something"
        tokens = sum(n for _, n in scheduled)
        logits = [r for r, n in scheduled if r.num_computed + n >= r.num_tokens]
        clock += predictor.predict(tokens, len(logits), attention_pairs([(r.num_computed, n) for r, n in scheduled]))
        decodes = sum(1 for r, n in scheduled if r.output_ids and n == 1)
        if decodes:
            mixed_prefill.append(tokens - decodes)
        for r, n in scheduled:
            r.num_computed += n
        for r in logits:
            r.output_ids.append(7)
            if len(r.output_ids) >= r.params.max_tokens:
                sched.finish(r, "length")
    return clock, reqs, mixed_prefill


def test_xy_falls_back_to_throughput_when_the_slo_cannot_be_met(tmp_path):
    xy_s, xy_reqs, xy_mixed = simulate("xy", tmp_path)
    chunked_s, chunked_reqs, _ = simulate("chunked", tmp_path)
    assert all(len(r.output_ids) == r.params.max_tokens for r in xy_reqs + chunked_reqs)  # nobody starved
    assert xy_s <= 1.05 * chunked_s, (xy_s, chunked_s)
    assert max(xy_mixed) > 16 * 4  # prompts advance in large steps beside the decodes, not one tile at a time


def test_a_step_with_room_for_the_decodes_only_still_takes_one_aligned_chunk(tmp_path):
    """The SLO just above what the decodes alone take: feasible, no room for prefill, and yet prompts
    advance one aligned chunk per step (the floor that keeps xy from starving them)."""
    decode_only = _predictor(tmp_path).predict(12, 12, 0.0)
    _, reqs, mixed = simulate("xy", tmp_path, tbt_slo_ms=decode_only * 1e3 * 1.0001)
    assert all(len(r.output_ids) == r.params.max_tokens for r in reqs)
    assert mixed and max(mixed) == 16


def test_the_step_target_defaults_to_the_tpot_slo():
    assert SchedulerConfig(policy="xy").step_slo_s == 0.2
    assert SchedulerConfig(policy="xy", tpot_slo_ms=120.0).step_slo_s == 0.12
    assert SchedulerConfig(policy="xy", tbt_slo_ms=50.0, tpot_slo_ms=120.0).step_slo_s == 0.05
