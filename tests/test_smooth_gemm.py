"""SmoothGEMM: least-time segment covers from a cost table, and a run that equals one matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_rows

from xytune.kernels.gemm import pack_weight
from xytune.kernels.smooth_gemm import SmoothGEMMPlanner, run_smooth_gemm
from xytune.profiler.cost_model import CostModel
from xytune.profiler.geometry import PRESETS
from xytune.profiler.primitives import gemm_kernels, primitives_for
from xytune.profiler.table import CostTable, new_meta, write_table

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def padded_cost(prim, m, n, k):
    """A fixed-shape kernel: a launch cost plus a cost per *bucket* row, so padding is paid in full."""
    return 1e-5 + m * n * k * 1e-12 * (1.0 if prim == "a" else 1.3)


@pytest.fixture
def planner(tmp_path):
    from xytune.profiler.devices import get_device

    geometry = PRESETS["smollm2-135m"]
    meta = new_meta(get_device("cpu").fingerprint(), geometry.to_dict(),
                    {"gemm_flops": {"float32": 1e11}, "copy_bytes_per_s": 1e10}, {"dtypes": ["float32"]})
    meta["complete"] = True
    path = tmp_path / "t.parquet"
    write_table(path, CostTable(synthetic_rows(geometry, padded_cost, primitives=("a", "b"), ms=BUCKETS), meta))
    g = geometry.gemm("gate_up")
    return SmoothGEMMPlanner(CostModel.load(path), g.n, g.k, "float32", exact_tails=False), g


def test_plan_covers_m_with_the_least_predicted_time(planner):
    p, g = planner
    plan = p.plan(70)
    assert [(s.start, s.rows, s.bucket) for s in plan.segments] == [(0, 64, 64), (64, 6, 8)]
    assert all(s.primitive == "a" for s in plan.segments)
    cost = lambda b: padded_cost("a", b, g.n, g.k)  # noqa: E731
    assert plan.predicted_s == pytest.approx(cost(64) + cost(8))
    assert plan.predicted_s < cost(128)  # what padding to the next bucket would cost
    assert p.pad_to_bucket(70)[:2] == (128, "a")
    assert p.plan(64).segments == (p.plan(64).segments[0],) and p.plan(64).segments[0].rows == 64
    big = p.plan(300)  # past the largest bucket: several full segments
    assert sum(s.rows for s in big.segments) == 300 and big.segments[0].rows == 128
    assert p.plan(70) is p.plan(70)  # cached per M


def test_shape_flexible_primitives_run_the_tail_at_its_real_size(planner):
    """On CPU torch ops run any M at the interpolated cost: no tail pays for a whole bucket."""
    p, g = planner
    flex = SmoothGEMMPlanner(p.cost_model, g.n, g.k, "float32", exact_tails=True)
    plan = flex.plan(70)
    assert [(s.rows, s.primitive) for s in plan.segments] == [(70, "a")]
    assert plan.predicted_s == pytest.approx(padded_cost("a", 70, g.n, g.k))
    assert plan.predicted_s < p.plan(70).predicted_s
    big = flex.plan(300)  # past the table: full buckets and one exact-size segment
    assert sum(s.rows for s in big.segments) == 300 and len(big.segments) == 3
    assert sum(s.rows != s.bucket or s.rows not in BUCKETS for s in big.segments) == 1


def test_bad_m_and_missing_shapes_are_errors(planner):
    p, _ = planner
    with pytest.raises(ValueError, match="at least 1"):
        p.plan(0)
    with pytest.raises(ValueError, match="no gemm rows"):
        SmoothGEMMPlanner(p.cost_model, 7, 9, "float32")
    with pytest.raises(ValueError, match="none of the primitives"):
        SmoothGEMMPlanner(p.cost_model, p.n, p.k, "float32", primitives={"triton.tiled_gemm"})



@pytest.mark.parametrize("m", [1, 5, 64, 70, 129, 300])
def test_run_writes_every_segment_into_one_output(tmp_path, m):
    from xytune.profiler.devices import get_device

    geometry = PRESETS["smollm2-135m"]
    meta = new_meta(get_device("cpu").fingerprint(), geometry.to_dict(),
                    {"gemm_flops": {"float32": 1e11}, "copy_bytes_per_s": 1e10}, {"dtypes": ["float32"]})
    meta["complete"] = True
    prims = ("torch.linear", "torch.matmul_out", "torch.matmul_pretransposed")
    write_table(tmp_path / "t.parquet", CostTable(synthetic_rows(
        geometry, lambda p, mm, n, k: padded_cost("a" if p == prims[m % 3] else "b", mm, n, k),
        primitives=prims, ms=BUCKETS), meta))
    g = geometry.gemm("o")
    planner = SmoothGEMMPlanner(CostModel.load(tmp_path / "t.parquet"), g.n, g.k, "float32", exact_tails=False)
    gen = torch.Generator().manual_seed(m)
    w, b = torch.randn(g.n, g.k, generator=gen), torch.randn(g.n, generator=gen)
    x = torch.randn(m, g.k, generator=gen)
    plan = planner.plan(m)
    out = run_smooth_gemm(plan, x, gemm_kernels(w, b), n=g.n)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    into = torch.full((m, g.n), float("nan"))
    assert run_smooth_gemm(plan, x, gemm_kernels(w, b), out=into) is into
    torch.testing.assert_close(into, out)
    if len(plan.segments) == 1:  # several segments may prefer a primitive that writes into out without a copy
        assert plan.segments[0].primitive == prims[m % 3]
    with pytest.raises(ValueError, match="rows"):
        run_smooth_gemm(plan, x[:-1] if m > 1 else torch.randn(2, g.k), gemm_kernels(w, b), n=g.n)


def test_serving_binds_the_kernels_the_profiler_registry_times():
    """One definition per GEMM primitive: SmoothGEMM's kernels for a weight are the registry's, each computing
    ``x @ W.T + b`` into the output it is given."""
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen), torch.randn(5, 16, generator=gen)
    packed = pack_weight(w)
    kernels = gemm_kernels(w, b, packed)
    registered = {p.name for p in primitives_for("gemm", "cpu", "float32") if p.weight_format == "float"}  # quantized
    # formats are bound only where their weights were loaded (tests/test_quantized.py)
    assert set(kernels) == (registered if packed is not None else registered - {"onednn.packed_linear"})
    for name, kernel in kernels.items():
        torch.testing.assert_close(kernel(x, None, {}), F.linear(x, w, b), msg=name)
        out = torch.empty(5, 24)
        assert kernel(x, out, {}) is out
        torch.testing.assert_close(out, F.linear(x, w, b), msg=name)
