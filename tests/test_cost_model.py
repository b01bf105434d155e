import warnings

import numpy as np
import pytest
import torch
from conftest import linear_latency

from xytune.profiler.cost_model import CostModel, CostModelError
from xytune.profiler.table import write_table


@pytest.fixture
def model(tmp_path, synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    return CostModel.load(path)


def test_interpolation_between_buckets_is_exact_for_linear_costs(model, geometry):
    g = geometry.gemm("gate_up")
    for m in (3, 5, 12, 40, 100, 200):
        expected = min(linear_latency(p, m, g.n, g.k) for p in ("fast_small", "fast_large"))
        pred = model.predict("gemm", {"m": m, "n": g.n, "k": g.k})
        assert not pred.extrapolated
        assert pred.seconds == pytest.approx(expected, rel=0.02)


def test_best_switches_primitive_where_costs_cross(model, geometry):
    g = geometry.gemm("down")
    crossing = 3e-5 / (g.n * g.k * 1e-12)
    small, large = max(1, int(crossing / 4)), int(crossing * 4)
    assert model.best("gemm", {"m": small, "n": g.n, "k": g.k})[0] == "fast_small"
    assert model.best("gemm", {"m": large, "n": g.n, "k": g.k})[0] == "fast_large"


def test_extrapolation_is_flagged(model, geometry):
    g = geometry.gemm("qkv")
    inside = model.predict("gemm", {"m": 256, "n": g.n, "k": g.k})
    outside = model.predict("gemm", {"m": 1024, "n": g.n, "k": g.k})
    assert not inside.extrapolated and outside.extrapolated
    assert outside.seconds == pytest.approx(linear_latency("fast_large", 1024, g.n, g.k), rel=0.02)


def test_predict_step_sums_the_layer_stack(model, geometry):
    total = sum(g.count * min(linear_latency(p, 20, g.n, g.k) for p in ("fast_small", "fast_large"))
                for g in geometry.gemms())
    assert model.predict_step(20) == pytest.approx(total, rel=0.02)
    assert model.predict_step(20, num_logits=4) < model.predict_step(20)
    assert model.predict_step(0) == 0.0


def test_unknown_shape_and_bad_m(model):
    with pytest.raises(CostModelError, match="no gemm rows"):
        model.predict("gemm", {"m": 4, "n": 3, "k": 5})
    with pytest.raises(CostModelError, match="m >= 1"):
        model.predict("gemm", {"m": 0, "n": 960, "k": 576})


def test_fingerprint_mismatch_is_refused_unless_allowed(tmp_path, synthetic_table):
    synthetic_table.meta["fingerprint"] = {**synthetic_table.meta["fingerprint"], "device_name": "Other CPU 9000"}
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    with pytest.raises(CostModelError, match="different device.*device_name"):
        CostModel.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CostModel.load(path, allow_mismatch=True)
    assert any("fingerprint differs" in str(w.message) for w in caught)
    assert model.predict_step(8) > 0


def test_corrupt_table_is_a_cost_model_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + bytes(np.arange(200, dtype=np.uint8)))
    with pytest.raises(CostModelError, match="not a readable Parquet"):
        CostModel.load(path)


def test_table_from_an_absent_backend(tmp_path, synthetic_table):
    if torch.cuda.is_available():
        pytest.skip("this checks a CUDA table on a machine without CUDA")
    synthetic_table.meta["fingerprint"] = {**synthetic_table.meta["fingerprint"], "backend": "cuda",
                                           "device_name": "NVIDIA H100"}
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    with pytest.raises(CostModelError, match="NVIDIA H100.*not usable here"):
        CostModel.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert CostModel.load(path, allow_mismatch=True).predict_step(4) > 0
