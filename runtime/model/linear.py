"""The model's weight GEMMs: ``packed`` (oneDNN's pre-packed layout where the CPU packs this dtype, else the
weight as is), ``plain`` (``F.linear``) or ``smooth`` (SmoothGEMM over the registry's kernels bound to this
weight, segments from the cost table). ``load_formats`` holds the weight quantized (kernels/quantized.py)
instead of, or beside, the float one."""

from __future__ import annotations

import torch

from xytune.kernels.gemm import bind_linear, bind_onednn_packed, pack_weight
from xytune.kernels.quantized import QUANTIZED_BINDS, QUANTIZERS, WEIGHT_FORMATS, int4_shape_failure, int4_weight
from xytune.kernels.smooth_gemm import run_smooth_gemm
from xytune.profiler.primitives import gemm_kernels

GEMM_MODES = ("packed", "plain", "smooth")


class Linear:
    """``y = x @ W.T + b`` for a fixed weight ``W [N, K]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str = "packed",
                 batch_hint: int = 32, planner=None, sources: tuple[str, ...] = ()):
        """``mode`` smooth runs SmoothGEMM: ``planner`` picks the segments; it is a SmoothGEMMPlanner for
        this shape or ``planner_for(n, k, kernel_names)`` making one over the kernels this weight has.
        ``sources``: the checkpoint tensors stacked (along N) into this weight, so their own quantized blocks
        can be found."""
        self.sources = sources
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
        self.quantized = {}
        self.int4_from_checkpoint = False
        if mode == "smooth":
            self.kernels = gemm_kernels(weight, bias, self.packed)
            self.planner = planner(*weight.shape, set(self.kernels)) if callable(planner) else planner

    def load_formats(self, formats, planner=None, int4_codes=None) -> None:
        """Hold the weight in ``formats`` (of WEIGHT_FORMATS), each made once here: int4 from ``int4_codes``
        (``(q, d, m)``, the checkpoint's own Q4 blocks) when given, else quantized from the float weight.

        The float weight (and its packed layout) is dropped unless ``float`` is among them, or no quantized
        format can take this shape (int4 packing needs N % 16 == 0 and K % 32 == 0: the weight stays float).
        With a ``planner`` (as for ``__init__``) SmoothGEMM picks per M among the formats held; without one a
        single quantized format runs every M."""
        unknown = set(formats) - set(WEIGHT_FORMATS)
        if unknown or not formats:
            raise ValueError(f"weight formats must be some of {WEIGHT_FORMATS}, not {sorted(formats)}")
        n, k = self.out_features, self.in_features
        self.quantized = {}
        for f in formats:
            if f == "float" or (f == "int4" and int4_shape_failure(n, k)):
                continue
            if f == "int4" and int4_codes is not None:
                self.quantized[f] = int4_weight(*int4_codes, self.weight.dtype, self.weight.device)
            else:
                self.quantized[f] = QUANTIZERS[f](self.weight)
        self.int4_from_checkpoint = "int4" in self.quantized and int4_codes is not None
        if "float" not in formats and self.quantized:
            self.weight, self.packed = None, None
        if planner is not None:
            self.kernels = gemm_kernels(self.weight, self.bias, self.packed, self.quantized)
            self.planner = planner(n, k, set(self.kernels)) if callable(planner) else planner
        elif self.quantized:
            fmt = next(f for f in formats if f in self.quantized)
            self.kernel = QUANTIZED_BINDS[fmt](None, self.bias, self.quantized[fmt])
            self.planner, self.kernels = None, None

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Bytes held per weight format (float: the weight as is, without oneDNN's packed copy)."""
        held = {f: q.nbytes for f, q in self.quantized.items()}
        if self.weight is not None:
            held["float"] = self.weight.numel() * self.weight.element_size()
        return held

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.planner is not None:
            return self._smooth(x)
        return self.kernel(x, None, {})

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a step that samples nothing still passes an empty batch to lm_head
            return x.new_empty(0, self.out_features)
        return run_smooth_gemm(self.planner.plan(x.shape[0]), x, self.kernels, n=self.out_features)
