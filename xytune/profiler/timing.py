"""Timing a callable: warm-up, then samples until a time budget or a count.

Raw samples are kept (the regression report tests them), and the summary
statistics every cost-table row carries are computed here once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from xytune.profiler.devices import Device


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 2
    budget_s: float = 0.05  # per point, samples only
    min_samples: int = 5
    max_samples: int = 100
    cold: bool = True  # flush the GPU/NPU L2 before each sample (weights are cold in serving)


QUICK_TIMING = TimingPolicy(warmup=1, budget_s=0.01, min_samples=5, max_samples=10)
DEFAULT_TIMING = TimingPolicy()


def measure(fn: Callable[[], Any], device: Device, policy: TimingPolicy = DEFAULT_TIMING) -> list[float]:
    """Seconds per call of ``fn``, one entry per sample."""
    with torch.inference_mode():
        first = math.inf
        for _ in range(max(policy.warmup, 1)):
            first = min(first, device.time_once(fn))
        if device.backend != "cpu":
            # Events need the count up front: size it from the warm-up time.
            count = int(policy.budget_s / max(first, 1e-7))
            return device.time_samples(fn, max(policy.min_samples, min(policy.max_samples, count)), policy.cold)
        samples: list[float] = []
        deadline = time.perf_counter() + policy.budget_s
        while len(samples) < policy.max_samples and (
            len(samples) < policy.min_samples or time.perf_counter() < deadline
        ):
            samples.extend(device.time_samples(fn, 1, policy.cold))
        return samples


def measure_interleaved(fns: list[Callable[[], Any]], device: Device,
                        policy: TimingPolicy = DEFAULT_TIMING) -> list[list[float]]:
    """Samples of several callables taken in turns, one sample each per round.

    A CPU's speed drifts by 10-30% over seconds on a shared VM; configs timed one after another would
    compare different minutes, configs timed in turns compare the same ones. Accelerators are timed per
    callable with events (their clocks do not drift that way).
    """
    if device.backend != "cpu" or len(fns) < 2:
        return [measure(fn, device, policy) for fn in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(max(policy.warmup, 1)):
                device.time_once(fn)
        samples: list[list[float]] = [[] for _ in fns]
        deadline = time.perf_counter() + policy.budget_s * len(fns)
        while len(samples[0]) < policy.max_samples and (
            len(samples[0]) < policy.min_samples or time.perf_counter() < deadline
        ):
            for fn, out in zip(fns, samples):
                out.extend(device.time_samples(fn, 1, policy.cold))
        return samples


def summarize(samples: list[float]) -> dict[str, float]:
    """The statistics columns of a cost-table row."""
    a = np.asarray(samples, dtype=np.float64)
    return {
        "median_s": float(np.median(a)),
        "p20_s": float(np.percentile(a, 20)),
        "p80_s": float(np.percentile(a, 80)),
        "mean_s": float(a.mean()),
        "std_s": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "n": int(a.size),
    }
