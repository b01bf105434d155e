"""Measured device peaks: large-GEMM FLOP/s per dtype and memory-copy bandwidth.

Every cost-table row is reported as a fraction of these, which is what tells
a memory-bound decode GEMM from a badly tiled one.
"""

from __future__ import annotations

import torch

from xytune.kernels.gemm import bind_onednn_packed, pack_weight
from xytune.profiler.devices import Device
from xytune.profiler.primitives import DTYPES
from xytune.profiler.timing import TimingPolicy, measure

PEAK_TIMING = TimingPolicy(warmup=2, budget_s=0.3, min_samples=3, max_samples=20, cold=False)


def _gemm_size(device: Device) -> int:
    return 1024 if device.backend == "cpu" else 8192


def measure_gemm_peak(device: Device, dtype: str, policy: TimingPolicy = PEAK_TIMING) -> float:
    """FLOP/s of a large square matmul (the best of its samples)."""
    n = _gemm_size(device)
    a = torch.randn(n, n).to(device.torch_device, DTYPES[dtype])
    b = torch.randn(n, n).to(device.torch_device, DTYPES[dtype])
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    best = min(measure(lambda: torch.matmul(a, b, out=out), device, policy))
    if device.backend == "cpu":  # oneDNN with a pre-packed operand is faster still on many CPUs
        weight = b.t().contiguous()  # a @ b as a linear layer: x @ W.T with W = b.T
        packed = pack_weight(weight)
        if packed is not None:  # None where the probe found packing unsupported for this dtype
            linear = bind_onednn_packed(weight, None, packed)
            best = min(best, min(measure(lambda: linear(a, None, {}), device, policy)))
    return 2.0 * n**3 / best


def measure_copy_bandwidth(device: Device, policy: TimingPolicy = PEAK_TIMING, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy of ``nbytes`` (default 64 MiB on CPU, 1 GiB else; read + write
    counted)."""
    numel = (nbytes or (64 if device.backend == "cpu" else 1024) * 2**20) // 4
    src = torch.ones(numel, dtype=torch.float32, device=device.torch_device)
    dst = torch.empty_like(src)
    samples = measure(lambda: dst.copy_(src), device, policy)
    return 2.0 * numel * 4 / min(samples)


def measure_peaks(device: Device, dtypes: list[str], policy: TimingPolicy = PEAK_TIMING) -> dict:
    return {
        "gemm_flops": {dt: measure_gemm_peak(device, dt, policy) for dt in dtypes},
        "copy_bytes_per_s": measure_copy_bandwidth(device, policy),
    }


def roofline_fraction(flops: float, nbytes: float, seconds: float, dtype: str, peaks: dict) -> dict[str, float]:
    """Achieved FLOP/s and bytes/s of one row, and its fraction of the roofline bound."""
    achieved_flops = flops / seconds
    achieved_bw = nbytes / seconds
    peak_f = peaks["gemm_flops"].get(dtype) or max(peaks["gemm_flops"].values())
    bound_s = max(flops / peak_f, nbytes / peaks["copy_bytes_per_s"])
    return {
        "achieved_flops": achieved_flops,
        "achieved_bytes_per_s": achieved_bw,
        "frac_peak": bound_s / seconds,
    }

