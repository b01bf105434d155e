"""The machine constants the kernels switch on, measured by the profiler and kept in the table's ``tuning``.

SmoothGEMM and Meta-Attention each make a few decisions whose crossover is a
fact about the machine, not about the algorithm: how much one more GEMM
segment costs on the host, how much predicted gain justifies a split, what
one more long attention group costs in padded scores, and up to how many
short tiles a bf16 batch is better run in float32. Hard-coding figures from
one CPU made another run the slower path, so the sweep measures them here,
per dtype, and ``CostModel.tuning`` hands them to the kernels. The defaults
below (documented, conservative) only serve tables that lack a figure, with a
one-line warning.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from xytune.kernels.meta_attention import (
    DEFAULT_FLOAT32_SHORT_TILES,
    DEFAULT_GROUP_COST_SCORES,
    plan_meta_attention,
    run_meta_attention_torch,
)
from xytune.profiler.devices import Device
from xytune.profiler.primitives import DTYPES, attention_batch
from xytune.profiler.timing import TimingPolicy, measure_interleaved

TUNING_DEFAULTS: dict[str, float] = {
    # SmoothGEMM: host cost of one more segment (a call and a slice); ~10 us is a slow CPU's dispatch.
    "segment_overhead_s": 10e-6,
    # SmoothGEMM: a split must beat one exact-size call by this fraction of its predicted time.
    "split_margin": 0.25,
    # Meta-Attention: fixed cost of one more long group, in padded (query row, key) scores.
    "group_cost_scores": float(DEFAULT_GROUP_COST_SCORES),
    # Meta-Attention: up to this many short tiles run their GEMMs in float32 when the input is bf16 (CPU).
    "float32_short_tiles": float(DEFAULT_FLOAT32_SHORT_TILES),
}

CALIBRATION_TIMING = TimingPolicy(warmup=2, budget_s=0.0, min_samples=9, max_samples=9, cold=False)


def _medians(fns: list, device: Device, policy: TimingPolicy = CALIBRATION_TIMING) -> list[float]:
    return [float(np.median(s)) for s in measure_interleaved(fns, device, policy)]


def segment_overhead(device: Device, dtype: str, calls: int = 64) -> float:
    """Seconds one more segment adds: a slice and a GEMM call on a tiny operand (the cost is the call)."""
    t = DTYPES[dtype]
    x = torch.randn(calls, 16).to(device.torch_device, t)
    w = torch.randn(16, 16).to(device.torch_device, t)
    out = torch.empty(calls, 16, dtype=t, device=device.torch_device)

    def many():
        for i in range(calls):
            torch.matmul(x[i: i + 1], w.t(), out=out[i: i + 1])

    return _medians([many], device)[0] / calls


def split_margin(rows: pd.DataFrame) -> float:
    """Twice the median relative spread (p80 - p20) / median of the table's GEMM rows, within [0.02, 0.5].

    A split is only worth its risk when its predicted gain is beyond what the table's own measurements
    scatter by; a quiet machine (or an accelerator) splits on smaller gains than a noisy VM.
    """
    gemm = rows[rows["op"] == "gemm"]
    if not len(gemm):
        return TUNING_DEFAULTS["split_margin"]
    spread = ((gemm["p80_s"] - gemm["p20_s"]) / gemm["median_s"]).median()
    return float(np.clip(2.0 * spread, 0.02, 0.5))


def group_cost_scores(device: Device, dtype: str, heads: int, kv_heads: int, head_dim: int,
                      rows: int = 32, keys: tuple[int, ...] = (64, 256, 1024)) -> float:
    """One long group's fixed cost over its cost per padded score: fit ``t = a + b * rows * keys``, ``a / b``.

    Each point is one prefill tile of ``rows`` queries after ``keys - rows`` cached keys, planned as a single
    long group on the batched-GEMM path (the path the grouping's padding trade-off is about).
    """
    fns, scores = [], []
    for n_keys in keys:
        shape = {"m": 1, "q": rows, "n": n_keys - rows, "k": head_dim, "heads": heads, "kv_heads": kv_heads}
        reqs, q, k, v = attention_batch(shape, dtype, device, decode=False)
        plan = plan_meta_attention(reqs, heads, kv_heads, k.shape[1], prefill_tile=rows, sdpa_min_keys=1 << 30)
        fns.append(lambda plan=plan, q=q, k=k, v=v: run_meta_attention_torch(plan, q, k, v, head_dim ** -0.5))
        scores.append(rows * n_keys)
    slope, intercept = np.polyfit(scores, _medians(fns, device), 1)
    if slope <= 0:
        return TUNING_DEFAULTS["group_cost_scores"]
    return float(np.clip(intercept / slope, 0.0, 1e7))


def float32_short_tiles(device: Device, dtype: str, heads: int, kv_heads: int, head_dim: int,
                        requests: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int:
    """The most short tiles for which running their GEMMs in float32 beats ``dtype`` (0: never).

    Decode batches of 1-64 requests over 100-200 cached keys (one tile per request and KV head) are run
    both ways, taking turns; the answer is the tile count of the largest batch up to which float32 won
    every time. Only a CPU with a non-float32 dtype has the choice.
    """
    if device.backend != "cpu" or dtype == "float32":
        return 0
    best = 0
    for n in requests:
        shape = {"m": n, "n": 200, "k": head_dim, "heads": heads, "kv_heads": kv_heads, "verify_every": 0}
        reqs, q, k, v = attention_batch(shape, dtype, device, decode=True)
        plans = [plan_meta_attention(reqs, heads, kv_heads, k.shape[1], tile_q=heads // kv_heads, tile_kv=256,
                                     float32_short_tiles=limit) for limit in (0, 1 << 30)]
        native, f32 = _medians([lambda p=p: run_meta_attention_torch(p, q, k, v, head_dim ** -0.5)
                                for p in plans], device)
        if f32 >= native:
            break
        best = int(plans[0].short.kv_index.shape[0])
    return best


def measure_tuning(device: Device, dtypes: list[str], geometry) -> dict[str, dict[str, float]]:
    """The per-dtype constants that need timing (``split_margin`` comes from the rows at the end)."""
    heads, kv_heads, d = geometry.heads_per_rank, geometry.kv_heads_per_rank, geometry.head_dim
    out = {}
    for dtype in dtypes:
        figures = {"segment_overhead_s": segment_overhead(device, dtype)}
        if device.backend == "cpu":  # the torch attention backend the constants steer runs on CPU
            figures["group_cost_scores"] = group_cost_scores(device, dtype, heads, kv_heads, d)
            figures["float32_short_tiles"] = float(float32_short_tiles(device, dtype, heads, kv_heads, d))
        out[dtype] = figures
    return out
