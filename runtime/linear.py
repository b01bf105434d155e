"""Weight GEMMs of the model, with the weight prepared once for the fastest plain-torch path.

On CPU, oneDNN can pre-pack a weight into its blocked (VNNI for bf16) layout;
``F.linear`` repacks the weight on every call, which on a 2-core AVX-512 CPU
costs about a third of a bf16 decode step and half of a float32 one
(see docs/benchmarks.md). Elsewhere the weight is used as is.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

GEMM_MODES = ("packed", "plain", "smooth")


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.lru_cache(maxsize=None)
def packing_failure(dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot pack and run a ``dtype`` weight on this CPU (None: it can), probed once on 8x8.

    torch's bf16 packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU it raises.
    """
    if not onednn_packing_available():
        return "this torch build has no oneDNN weight packing"
    try:
        w = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        torch.ops.mkldnn._linear_pointwise(torch.ones(4, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError as exc:
        from xytune.probe import failure_reason

        return failure_reason(exc)
    return None


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
        self.packed = None
        if (mode in ("packed", "smooth") and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.bfloat16) and packing_failure(weight.dtype) is None):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.planner, self.kernels = None, None
        if mode == "smooth":
            from xytune.kernels.smooth_gemm import torch_segment_kernels

            self.kernels = torch_segment_kernels(weight, bias, self.packed)
            self.planner = planner(*weight.shape, set(self.kernels)) if callable(planner) else planner

    def _bind(self, x: torch.Tensor):
        """A no-argument call on a fixed input (what the profiler times)."""
        return lambda: self(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.planner is not None:
            return self._smooth(x)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        from xytune.kernels.smooth_gemm import run_smooth_gemm

        if x.shape[0] == 0:  # a step that samples nothing still passes an empty batch to lm_head
            return x.new_empty(0, self.out_features)
        return run_smooth_gemm(self.planner.plan(x.shape[0]), x, self.kernels, n=self.out_features)
