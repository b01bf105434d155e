"""Capabilities are probed, never assumed.

Whether a kernel runs at all depends on the machine: oneDNN's bf16 weight
packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (a Zen 3 has neither), a
Triton config can run out of shared memory, an NPU may refuse a weight
format. So every primitive is run once on a tiny input before a sweep
registers it or the engine uses it; one that raises is pruned with its
reason (kept in the table's metadata and shown by ``xytune show``), and the
rest go on. Which dtype is fast is measured too (``fastest_dtype``): a bf16
GEMM exists on an AVX2 CPU but runs 3-6x slower than float32 there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from xytune.profiler.devices import Device, failure_reason
from xytune.profiler.primitives import REGISTRY, Primitive
from xytune.profiler.timing import TimingPolicy, measure_interleaved


@dataclass(frozen=True)
class Pruned:
    """A primitive (or one config of it) that cannot run on this device, and why."""

    primitive: str
    dtype: str
    reason: str
    config: str | None = None  # canonical JSON of the failing config; None: the whole primitive

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def probe_config(primitive: Primitive, shape: dict, dtype: str, device: Device) -> dict:
    """The config a probe runs: the first of the grid that is valid for the tiny shape (else the first)."""
    grid = primitive.grid()
    valid = [c for c in grid if primitive.invalid(shape, c, dtype, device) is None]
    return (valid or grid)[0]


def _probe_uncached(primitive: Primitive, dtype: str, device: Device) -> str | None:
    if device.backend not in primitive.backends or dtype not in primitive.dtypes:
        return f"not built for {device.backend} {dtype}"
    if not primitive.available():
        return "its runtime (library or op) is not installed here"
    shape = primitive.probe_shape
    try:
        fn = primitive.make(shape, probe_config(primitive, shape, dtype, device), dtype, device)
        with torch.inference_mode():
            fn()
        device.synchronize()
    except Exception as exc:  # any failure is a fact about this machine: record it, go on with the rest
        return failure_reason(exc)
    return None


@functools.lru_cache(maxsize=None)
def _probe_cached(name: str, dtype: str, backend: str, index: int) -> str | None:
    return _probe_uncached(REGISTRY[name], dtype, Device(backend, index))


def probe(primitive: Primitive, dtype: str, device: Device) -> str | None:
    """Run ``primitive`` once on a tiny input: None when it works here, else the one-line reason it does not.

    Registered primitives are probed once per process and device; others (tests registering their own) each
    time.
    """
    if REGISTRY.get(primitive.name) is primitive:
        return _probe_cached(primitive.name, dtype, device.backend, device.index)
    return _probe_uncached(primitive, dtype, device)


def usable_primitives(op: str, device: Device, dtype: str) -> tuple[list[Primitive], list[Pruned]]:
    """The registered primitives of ``op`` that run on ``device`` in ``dtype``, and those pruned (with why)."""
    usable, pruned = [], []
    for p in REGISTRY.values():
        if p.op != op or device.backend not in p.backends or dtype not in p.dtypes:
            continue
        reason = probe(p, dtype, device)
        if reason is None:
            usable.append(p)
        else:
            pruned.append(Pruned(p.name, dtype, reason))
    return usable, pruned


FASTEST_DTYPE_MS = (16, 128)  # token counts of the dtype probe: a decode batch and a prefill chunk


def fastest_dtype(device: Device, candidates: list[str], n: int = 1024, k: int = 1024,
                  repeats: int = 7) -> tuple[str, dict[str, float]]:
    """The candidate dtype whose GEMMs run fastest here, and each one's geometric-mean seconds.

    Times the GEMM primitive the engine runs (oneDNN packed where it probes fine, else torch.linear) at
    ``FASTEST_DTYPE_MS`` tokens on an ``n x k`` weight, the dtypes taking turns. Dtypes whose GEMMs do not
    run at all are left out. About 0.1 s on a 2-core CPU; used when no cost table says which dtype is faster.
    """
    fns, names = [], []
    for dtype in candidates:
        usable, _ = usable_primitives("gemm", device, dtype)
        prims = {p.name: p for p in usable}
        prim = prims.get("onednn.packed_linear") or prims.get("torch.linear")
        if prim is None:
            continue
        names.append(dtype)
        fns.append([prim.make({"m": m, "n": n, "k": k}, {}, dtype, device) for m in FASTEST_DTYPE_MS])
    if not names:
        raise RuntimeError(f"no GEMM of {', '.join(candidates)} runs on {device.name}.")
    if len(names) == 1:
        return names[0], {}
    policy = TimingPolicy(warmup=1, budget_s=0.0, min_samples=repeats, max_samples=repeats, cold=False)
    flat = [f for per_dtype in fns for f in per_dtype]
    samples = measure_interleaved(flat, device, policy)
    medians = [sorted(s)[len(s) // 2] for s in samples]
    per = len(FASTEST_DTYPE_MS)
    seconds = {d: math.exp(sum(math.log(t) for t in medians[i * per:(i + 1) * per]) / per)
               for i, d in enumerate(names)}
    return min(seconds, key=seconds.get), seconds
