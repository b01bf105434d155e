"""The model's weight GEMMs: ``packed`` (oneDNN's pre-packed layout where the CPU packs this dtype, else the
weight as is), ``plain`` (``F.linear``) or ``smooth`` (SmoothGEMM over the registry's kernels bound to this
weight, segments from the cost table)."""

from __future__ import annotations

import torch

from xytune.kernels.gemm import bind_linear, bind_onednn_packed, pack_weight
from xytune.kernels.smooth_gemm import run_smooth_gemm
from xytune.profiler.primitives import gemm_kernels

GEMM_MODES = ("packed", "plain", "smooth")


class Linear:
    """``y = x @ W.T + b`` for a fixed weight ``W [N, K]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str = "packed",
                 batch_hint: int = 32, planner=None):
        """``mode`` smooth runs SmoothGEMM: ``planner`` picks the segments; it is a SmoothGEMMPlanner for
        this shape or ``planner_for(n, k, kernel_names)`` making one over the kernels this weight has."""
        if mode not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, not {mode!r}")
        if mode == "smooth" and planner is None:
            raise ValueError("gemm mode smooth needs a cost table (a SmoothGEMMPlanner per shape)")
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.packed = pack_weight(weight, batch_hint) if mode in ("packed", "smooth") else None
        # the registry's kernel for a whole GEMM: oneDNN on the packed weight where it packed, else F.linear
        self.kernel = bind_onednn_packed(weight, bias, self.packed) if self.packed is not None \
            else bind_linear(weight, bias)
        self.planner, self.kernels = None, None
        if mode == "smooth":
            self.kernels = gemm_kernels(weight, bias, self.packed)
            self.planner = planner(*weight.shape, set(self.kernels)) if callable(planner) else planner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.planner is not None:
            return self._smooth(x)
        return self.kernel(x, None, {})

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a step that samples nothing still passes an empty batch to lm_head
            return x.new_empty(0, self.out_features)
        return run_smooth_gemm(self.planner.plan(x.shape[0]), x, self.kernels, n=self.out_features)
