"""StepPredictor (table + online NNLS fit) and the xy scheduler's token-count nudge, on synthetic tables."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_rows

from xytune.profiler.cost_model import CostModel
from xytune.profiler.geometry import PRESETS
from xytune.profiler.table import CostTable, new_meta, write_table
from xytune.runtime.engine.kv_cache import KVCache
from xytune.runtime.engine.scheduler import Scheduler, SchedulerConfig
from xytune.runtime.engine.step_predictor import StepPredictor, attention_pairs


def _model(tmp_path, latency, ms=(1, 2, 4, 8, 16, 32, 48, 64, 65, 80, 96, 128, 256)):
    from xytune.profiler.devices import get_device

    geometry = PRESETS["smollm2-135m"]
    meta = new_meta(get_device("cpu").fingerprint(), geometry.to_dict(),
                    {"gemm_flops": {"float32": 1e11}, "copy_bytes_per_s": 1e10}, {"dtypes": ["float32"]})
    meta["complete"] = True
    path = tmp_path / "t.parquet"
    write_table(path, CostTable(synthetic_rows(geometry, latency, primitives=("p",), ms=ms), meta))
    return CostModel.load(path)


def linear(prim, m, n, k):
    return 1e-5 + m * n * k * 1e-12


def tiled(prim, m, n, k):
    """A tile-quantised GEMM: cost steps up every 64 rows (a nearly empty tile costs a whole one)."""
    return 1e-5 + -(-m // 64) * 64 * n * k * 1e-12


def test_attention_pairs_counts_causal_pairs():
    assert attention_pairs([(0, 1)]) == 1  # a first token sees itself
    assert attention_pairs([(10, 1), (0, 4)]) == 11 + (1 + 2 + 3 + 4)
    assert attention_pairs([(100, 2)]) == 101 + 102


def test_fit_recovers_a_latency_law_the_table_does_not_know(tmp_path):
    """Steps cost 2x the table GEMMs + attention + a fixed overhead; the fit predicts them within 3%."""
    pred = StepPredictor(_model(tmp_path, linear), "float32")
    rng = np.random.default_rng(0)

    def truth(n, pairs):
        return 2.0 * pred.table_seconds(n, n) + 3e-8 * pairs + 4e-3

    for _ in range(120):
        n, ctx = int(rng.integers(1, 256)), int(rng.integers(0, 2000))
        pairs = attention_pairs([(ctx, n)])
        pred.observe(n, n, truth(n, pairs) * (1 + 0.01 * rng.standard_normal()), pairs)
    assert pred.coef is not None
    for n, ctx in ((8, 100), (64, 1500), (200, 50), (3, 1900)):
        pairs = attention_pairs([(ctx, n)])
        assert pred.predict(n, n, pairs) == pytest.approx(truth(n, pairs), rel=0.03)
    assert pred.error_summary(skip=40)["median_ape"] < 0.03


def test_a_machine_that_slows_down_is_tracked_within_a_few_steps(tmp_path):
    """After 200 steps of one law, every step suddenly takes 1.5x (a shared VM's neighbour wakes up): the fit
    spans hundreds of steps, the drift ratio of the last few steps catches up at once."""
    pred = StepPredictor(_model(tmp_path, linear), "float32")
    rng = np.random.default_rng(1)

    def truth(n, pairs):
        return 2.0 * pred.table_seconds(n, n) + 3e-8 * pairs + 4e-3

    def step(speed):
        n, ctx = int(rng.integers(1, 256)), int(rng.integers(0, 2000))
        pairs = attention_pairs([(ctx, n)])
        pred.observe(n, n, speed * truth(n, pairs), pairs)

    for _ in range(200):
        step(1.0)
    for _ in range(6):
        step(1.5)
    assert pred.drift == pytest.approx(1.5, rel=0.02)
    for n, ctx in ((8, 100), (64, 1500), (200, 50)):
        pairs = attention_pairs([(ctx, n)])
        assert pred.predict(n, n, pairs) == pytest.approx(1.5 * truth(n, pairs), rel=0.03)


def test_before_any_fit_the_table_is_scaled_by_the_measured_ratio(tmp_path):
    pred = StepPredictor(_model(tmp_path, linear), "float32")
    assert pred.predict(32, 1) == pred.table_seconds(32, 1)
    pred.observe(32, 1, 3 * pred.table_seconds(32, 1))
    assert pred.coef is None and pred.predict(16, 1) == pytest.approx(3 * pred.table_seconds(16, 1))


def test_nudge_moves_a_step_off_a_nearly_empty_tile(tmp_path):
    pred = StepPredictor(_model(tmp_path, tiled), "float32")
    kv = KVCache(1, 64, 16, 1, 8, __import__("torch").float32)
    sched = Scheduler(SchedulerConfig(policy="xy", align=16), kv, pred)
    assert sched.xy.nudge(busy=8, prefill=60) == 56  # 68 tokens -> 64: one tile instead of two
    assert sched.xy.nudge(busy=8, prefill=56) == 56  # already on the boundary
    flat = Scheduler(SchedulerConfig(policy="xy", align=16), kv, StepPredictor(_model(tmp_path, linear), "float32"))
    assert flat.xy.nudge(busy=8, prefill=60) == 60  # no tile effect: keep the SLO-sized step
