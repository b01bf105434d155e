"""Capabilities probed, never assumed: a primitive that raises is pruned with its reason, the rest go on."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from conftest import synthetic_cost_model, synthetic_rows

from xytune.profiler.geometry import PRESETS
from xytune.profiler.primitives import Primitive, gemm_work, register, unregister
from xytune.profiler.probe import fastest_dtype, probe, usable_primitives
from xytune.profiler.sweep import Sweep, SweepSettings
from xytune.profiler.table import read_table
from xytune.profiler.timing import TimingPolicy
from xytune.reports.summary import render_summary, summarize_table
from xytune.runtime.model.loader import resolve_dtype

TINY = TimingPolicy(warmup=1, budget_s=0.0, min_samples=2, max_samples=2)
MISSING_ISA = "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw"


def _bf16_refusing(shape, config, dtype, device):
    """Like oneDNN's bf16 packing on an AVX2-only CPU: the float32 path works, the bf16 one raises."""
    if dtype == "bfloat16":
        raise RuntimeError(MISSING_ISA)
    w = torch.randn(shape["n"], shape["k"])
    x = torch.randn(shape["m"], shape["k"])
    return lambda: x @ w.t()


def _config_refusing(shape, config, dtype, device):
    """A tile config the device cannot run (a Triton config out of shared memory, say)."""
    if config["tile"] == 64:
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    x = torch.randn(shape["m"], shape["k"])
    return lambda: x.sum()


@pytest.fixture
def refusing_primitives():
    prims = [Primitive("test.bf16_refusing", "gemm", ("cpu",), ("float32", "bfloat16"), _bf16_refusing, gemm_work),
             Primitive("test.config_refusing", "gemm", ("cpu",), ("float32",), _config_refusing, gemm_work,
                       space={"tile": (16, 64, 128)})]
    for p in prims:
        register(p)
    yield prims
    for p in prims:
        unregister(p.name)


def test_probe_reports_one_line_and_usable_leaves_the_primitive_out(refusing_primitives, cpu_device):
    bf16_refusing = refusing_primitives[0]
    assert probe(bf16_refusing, "float32", cpu_device) is None
    reason = probe(bf16_refusing, "bfloat16", cpu_device)
    assert reason == f"RuntimeError: {MISSING_ISA}" and "\n" not in reason
    usable, pruned = usable_primitives("gemm", cpu_device, "bfloat16")
    assert bf16_refusing.name not in {p.name for p in usable} and usable  # the registry's own still run
    assert [(p.primitive, p.reason) for p in pruned if p.primitive.startswith("test.")] == [
        (bf16_refusing.name, reason)]


def test_sweep_prunes_failing_primitives_and_configs_and_goes_on(refusing_primitives, cpu_device, tmp_path):
    out = tmp_path / "t.parquet"
    settings = SweepSettings(dtypes=["float32", "bfloat16"], buckets=[1, 4], targets=["o"], timing=TINY,
                             attention=False)
    Sweep(cpu_device, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    table = read_table(out)
    rows = table.rows
    assert table.complete
    refusing = rows[rows["primitive"] == "test.bf16_refusing"]
    assert set(refusing["dtype"]) == {"float32"} and len(refusing) == 2  # timed where it runs, pruned elsewhere
    configs = rows[rows["primitive"] == "test.config_refusing"]["config"]
    assert sorted(configs.unique()) == ['{"tile":128}', '{"tile":16}']
    assert set(rows[rows["dtype"] == "bfloat16"]["primitive"]) >= {"torch.linear"}  # the rest went on
    pruned = {(p["primitive"], p["dtype"], p.get("config")): p["reason"] for p in table.meta["pruned"]}
    assert pruned[("test.bf16_refusing", "bfloat16", None)] == f"RuntimeError: {MISSING_ISA}"
    assert "shared memory" in pruned[("test.config_refusing", "float32", '{"tile":64}')]

    from rich.console import Console

    console = Console(record=True, width=200)
    render_summary(summarize_table(table), console)
    text = console.export_text()
    assert "pruned" in text and MISSING_ISA in text and "test.config_refusing" in text


def test_fastest_dtype_leaves_out_dtypes_whose_gemms_do_not_run(cpu_device):
    """A dtype no GEMM primitive runs in is left out; between two that run, the measured faster wins."""
    dtype, seconds = fastest_dtype(cpu_device, ["float32", "no-such-dtype"])
    assert dtype == "float32" and seconds == {}
    dtype, seconds = fastest_dtype(cpu_device, ["float32", "bfloat16"])
    assert set(seconds) == {"float32", "bfloat16"} and dtype == min(seconds, key=seconds.get)
    assert all(0 < s < 0.1 for s in seconds.values())
    with pytest.raises(RuntimeError, match="no GEMM"):
        fastest_dtype(cpu_device, ["no-such-dtype"])


def _two_dtype_table(tmp_path, bf16_speed: float):
    """float32 rows, and bfloat16 rows ``bf16_speed`` times as fast (below 1: slower, as on an AVX2 CPU)."""
    geometry = PRESETS["smollm2-135m"]
    latency = lambda p, m, n, k: 1e-5 + m * n * k * 1e-12  # noqa: E731
    rows = [synthetic_rows(geometry, latency, primitives=("a",), dtype="float32"),
            synthetic_rows(geometry, lambda p, m, n, k: latency(p, m, n, k) / bf16_speed, primitives=("a",),
                           dtype="bfloat16")]
    return synthetic_cost_model(tmp_path / f"t{bf16_speed}.parquet", pd.concat(rows, ignore_index=True),
                                dtypes=("float32", "bfloat16"))


def test_auto_dtype_is_what_the_table_measured_fastest(tmp_path):
    avx2_like = _two_dtype_table(tmp_path, bf16_speed=0.25)  # bf16 GEMMs 4x slower (an AVX2-only CPU)
    amx_like = _two_dtype_table(tmp_path, bf16_speed=3.0)  # bf16 3x faster (AVX-512 BF16 / AMX)
    assert avx2_like.fastest_dtype() == "float32"
    assert amx_like.fastest_dtype() == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu"), avx2_like) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), amx_like) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu"), amx_like) == torch.float32  # asked by name: as asked


def test_tables_without_tuning_get_defaults_with_one_warning(tmp_path):
    model = _two_dtype_table(tmp_path, bf16_speed=1.0)
    with pytest.warns(UserWarning, match="no measured split_margin"):
        assert model.tuning("split_margin", "float32") == 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per constant
        assert model.tuning("split_margin", "bfloat16") == 0.25
    model.meta["tuning"] = {"float32": {"split_margin": 0.07}}
    assert model.tuning("split_margin", "float32") == 0.07
