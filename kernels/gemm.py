"""Weight GEMM kernels, each bound once to a weight ``[N, K]`` and then called per step.

One definition serves both sides: the profiler's registry times these bound
kernels on its operands and SmoothGEMM runs them on the model's weights, so
what the table measured is what the engine runs. A bound kernel is
``(x [M, K], out [M, N] or None, config) -> y`` (``out`` when given).

On CPU, oneDNN can pre-pack a weight into its blocked (VNNI for bf16) layout;
``F.linear`` repacks the weight on every call, which on a 2-core AVX-512 CPU
cost about a third of a bf16 decode step (docs/benchmarks.md). Whether packing
runs for a dtype is probed once (``packing_failure``), never assumed.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from xytune.profiler.devices import failure_reason

from .triton_gemm import triton_gemm

SegmentKernel = Callable[[torch.Tensor, torch.Tensor | None, dict], torch.Tensor]

# Kernels that compute a new tensor and copy it into ``out``: SmoothGEMM costs that copy, the profiler times
# them without one (as a single-segment GEMM runs them)
COPYING = {"torch.linear", "onednn.packed_linear", "npu.matmul", "torch.int8pack_mm", "torch.int4pack_mm"}
# torch_npu's ACL storage formats (aclFormat in CANN's acl/acl_base.h: ACL_FORMAT_ND = 2, ACL_FORMAT_FRACTAL_NZ = 29)
NPU_FORMAT_ND, NPU_FORMAT_FRACTAL_NZ = 2, 29
NPU_WEIGHT_FORMATS = {"ND": NPU_FORMAT_ND, "NZ": NPU_FORMAT_FRACTAL_NZ}  # npu.matmul's weight_format config


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
        return failure_reason(exc)
    return None


def pack_weight(weight: torch.Tensor, batch_hint: int = 32) -> torch.Tensor | None:
    """oneDNN's packed layout of a CPU weight, or None where this dtype or device cannot be packed."""
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or packing_failure(weight.dtype) is not None):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if out is None else out.copy_(y)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y.add_(bias) if bias is not None else y


def bind_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SegmentKernel:
    return lambda x, out, config: _into(out, F.linear(x, weight, bias))


def bind_matmul_out(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SegmentKernel:
    def run(x, out, config):
        return _plus_bias(torch.matmul(x, weight.t(), out=out) if out is not None else torch.matmul(x, weight.t()),
                          bias)
    return run


def bind_matmul_pretransposed(weight: torch.Tensor, bias: torch.Tensor | None = None,
                              eager: bool = False) -> SegmentKernel:
    """``x @ W^T`` with ``W^T`` stored contiguous. Serving makes it on first use (it doubles the weight's
    memory, so only weights whose plans pick it pay); the profiler (``eager``) before timing."""
    wt = weight.t().contiguous() if eager else None

    def run(x, out, config):
        nonlocal wt
        if wt is None:
            wt = weight.t().contiguous()
        return _plus_bias(torch.matmul(x, wt, out=out) if out is not None else torch.matmul(x, wt), bias)
    return run


def bind_onednn_packed(weight: torch.Tensor, bias: torch.Tensor | None = None,
                       packed: torch.Tensor | None = None) -> SegmentKernel:
    """oneDNN's linear on the pre-packed weight (``packed``: one made already); raises where it cannot pack."""
    packed = packed if packed is not None else pack_weight(weight)
    if packed is None:
        raise RuntimeError(packing_failure(weight.dtype) or "oneDNN packs only float32 and bfloat16 CPU weights")
    return lambda x, out, config: _into(out, torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))


def bind_triton(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SegmentKernel:
    """The tiled Triton GEMM; the tail segment is masked inside the kernel, not padded."""

    def run(x, out, config):
        if out is None:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        triton_gemm(x, weight, out, **config)
        return _plus_bias(out, bias)
    return run


def bind_npu_matmul(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SegmentKernel:
    """torch_npu's matmul with the transposed weight kept in ND or FRACTAL_NZ, as the config says (each layout
    cast once, on first use). A format the NPU does not keep raises, so the probe prunes it rather than the
    sweep timing an ND weight under NZ's name."""
    layouts: dict[str, torch.Tensor] = {}

    def run(x, out, config):
        fmt = config.get("weight_format", "ND")
        if fmt not in layouts:
            import torch_npu  # optional: only on Ascend

            # npu_format_cast(Tensor self, int acl_format, int? customize_dtype=None) -> Tensor and
            # get_npu_format(Tensor self) -> int: torch_npu/csrc/aten/npu_native_functions.yaml (Ascend/pytorch
            # commit 9ed07bbb, torch_npu master 2025)
            wt = torch_npu.npu_format_cast(weight.t().contiguous(), NPU_WEIGHT_FORMATS[fmt])
            kept = torch_npu.get_npu_format(wt)
            if kept != NPU_WEIGHT_FORMATS[fmt]:
                raise RuntimeError(f"npu_format_cast left this {weight.dtype} weight in ACL format {kept}, not {fmt}")
            layouts[fmt] = wt
        return _into(out, _plus_bias(torch.matmul(x, layouts[fmt]), bias))
    return run
