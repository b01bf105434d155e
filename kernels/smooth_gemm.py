"""SmoothGEMM: any token count M as a few segments of profiled, fixed-shape GEMM primitives.

Hardware that likes fixed tile shapes (an NPU's cube unit, a CUDA graph, a
compiled Triton config) runs a GEMM fastest at the M it was built for. Padding
every step's M up to the next built bucket wastes the padded rows; running an
arbitrary M may fall off the fast path. SmoothGEMM instead covers M with
segments, each a (primitive, config, bucket) the cost table measured: a
dynamic programme picks the cover of least predicted time, largest segments
first. The last segment may be shorter than its bucket: it is padded only
virtually (the kernel masks the missing rows, or the primitive simply runs
the real rows), never copied into a padded buffer. Plans are cached per M,
and every segment writes its rows straight into one output tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gemm import COPYING, SegmentKernel

# The host cost of one more segment (a call and a slice) and the predicted gain a split must show over one
# exact-size call (so that table noise alone does not cut a GEMM in pieces) are this machine's: the profiler
# measures them (xytune/profiler/calibrate.py) and the planner reads them from the cost table.


@dataclass(frozen=True)
class Segment:
    start: int
    rows: int  # real rows
    bucket: int  # the profiled M it is costed at (rows <= bucket: the rest is virtual padding)
    primitive: str
    config: tuple  # sorted (key, value) pairs of the primitive's config
    predicted_s: float


@dataclass(frozen=True)
class SmoothPlan:
    m: int
    segments: tuple[Segment, ...]

    @property
    def predicted_s(self) -> float:
        return sum(s.predicted_s for s in self.segments)


class SmoothGEMMPlanner:
    """Plans for one GEMM shape ``(n, k, dtype)`` from the measured buckets of a cost table."""

    def __init__(self, cost_model, n: int, k: int, dtype: str, primitives: set[str] | None = None,
                 exact_tails: bool = True):
        """``exact_tails``: the primitives run any M at the table's interpolated cost (CPU torch ops), so
        a tail segment is costed at its real rows; False for fixed-shape kernels (NPU, CUDA graphs), whose
        tail pays its whole bucket."""
        curves = cost_model.curves("gemm", n, k, dtype)
        if not curves:
            raise ValueError(f"the cost table has no gemm rows for n={n} k={k} {dtype}.")
        options = []
        for name, curve in curves.items():
            if primitives is not None and name not in primitives:
                continue
            for m, s, cfg in zip(curve.ms, curve.seconds, curve.configs):
                options.append((int(m), float(s), name, tuple(sorted(cfg.items()))))
        if not options:
            raise ValueError(f"none of the primitives {sorted(primitives or [])} is in the table for n={n} k={k}.")
        self.n, self.k, self.dtype = n, k, dtype
        self.cost_model = cost_model
        self.segment_overhead_s = cost_model.tuning("segment_overhead_s", dtype)
        self.split_margin = cost_model.tuning("split_margin", dtype)
        self._curves = {name: c for name, c in curves.items() if primitives is None or name in primitives}
        self.exact_tails = exact_tails
        self.options = options
        self._bucket = np.array([o[0] for o in options])
        # a segment of several is written into a slice of the output: kernels without an out= form pay a copy
        bw = float(cost_model.meta.get("peaks", {}).get("copy_bytes_per_s") or 1e10)
        elem = 4 if dtype == "float32" else 2
        copy_s = np.array([2.0 * o[0] * n * elem / bw if o[2] in COPYING else 0.0 for o in options])
        self._cost = np.array([o[1] for o in options]) + copy_s + self.segment_overhead_s
        self._names = sorted(self._curves)
        self._best = np.zeros(1)  # least predicted time to cover r rows, r = 0..len-1
        self._choice = np.zeros(1, dtype=np.int64)
        self._plans: dict[int, SmoothPlan] = {}

    @property
    def buckets(self) -> list[int]:
        return sorted({o[0] for o in self.options})

    def _extend(self, m: int) -> None:
        """Dynamic programme over r = rows left: best[r] = min_j cost_j + best[max(0, r - bucket_j)]."""
        start = len(self._best)
        if m < start:
            return
        best = np.concatenate([self._best, np.zeros(m + 1 - start)])
        choice = np.concatenate([self._choice, np.zeros(m + 1 - start, dtype=np.int64)])
        for r in range(start, m + 1):
            total = self._cost + best[np.maximum(r - self._bucket, 0)]
            j = int(np.argmin(total))
            best[r], choice[r] = total[j], j
            if self.exact_tails and r <= self._bucket.max():  # one exact-size segment of the best primitive
                tail, name = min((c.at(r)[0], name) for name, c in self._curves.items())
                # splitting must win clearly: table noise alone should not cut a GEMM in pieces
                if best[r] > tail * (1 - self.split_margin):
                    best[r], choice[r] = tail, -1 - self._names.index(name)
        self._best, self._choice = best, choice

    def plan(self, m: int) -> SmoothPlan:
        """The least-predicted-time cover of ``m`` rows (cached per M)."""
        plan = self._plans.get(m)
        if plan is None:
            plan = self._plans[m] = self._make_plan(m)
        return plan

    def _make_plan(self, m: int) -> SmoothPlan:
        if m < 1:
            raise ValueError(f"M must be at least 1, got {m}.")
        self._extend(m)
        picks, r = [], m
        while r > 0:  # the buckets of the least-cost cover
            j = int(self._choice[r])
            if j < 0:  # the rest as one exact-size segment
                name = self._names[-1 - j]
                curve = self._curves[name]
                picks.append((r, float(curve.at(r)[0]), name, tuple(sorted(curve.config_for(r).items()))))
                break
            picks.append(self.options[j])
            r -= min(self.options[j][0], r)
        picks.sort(key=lambda o: -o[0])  # largest first: every segment full but the virtually padded tail
        segs, start = [], 0
        for bucket, cost, name, cfg in picks:
            rows = min(bucket, m - start)
            segs.append(Segment(start, rows, bucket, name, cfg, cost))
            start += rows
        return SmoothPlan(m, tuple(segs))

    def pad_to_bucket(self, m: int) -> tuple[int, str, tuple, float]:
        """The baseline: the next profiled bucket >= m and its best primitive (what CUDA-graph serving runs)."""
        fits = [o for o in self.options if o[0] >= m]
        if not fits:
            raise ValueError(f"M={m} is past the largest profiled bucket {max(self._bucket)}.")
        bucket = min(o[0] for o in fits)
        _, cost, name, cfg = min((o for o in fits if o[0] == bucket), key=lambda o: o[1])
        return bucket, name, cfg, cost


def run_smooth_gemm(plan: SmoothPlan, x: torch.Tensor, kernels: dict[str, SegmentKernel],
                    out: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """``x [M, K]`` through the plan's segments into one ``out [M, N]``."""
    if x.shape[0] != plan.m:
        raise ValueError(f"the plan is for M={plan.m}, the input has {x.shape[0]} rows.")
    if out is None and len(plan.segments) == 1:  # one segment: the primitive's own output, no copy
        s = plan.segments[0]
        return kernels[s.primitive](x, None, dict(s.config))
    if out is None:
        out = torch.empty(plan.m, n, dtype=x.dtype, device=x.device)
    for s in plan.segments:
        kernels[s.primitive](x[s.start: s.start + s.rows], out[s.start: s.start + s.rows], dict(s.config))
    return out
