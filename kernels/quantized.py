"""Weight-only quantized GEMM kernels on CPU: int8 per output channel and int4 in groups of 32.

Decode streams every weight from memory once per step; an int8 weight is a quarter of a float32 one and an
int4 weight an eighth, which is what llama.cpp reads (issue 18 measured ``_weight_int8pack_mm`` at 222 us
against 585 us for float32 ``F.linear`` on a 1536x576 weight at M=1, and float32 ahead from M=64). Each format
is made once from the float weight, when a kernel is bound (at load), never per call; activations stay in the
model's dtype.

- ``int8``: symmetric, one scale per output channel (``w = q * s``, q in [-127, 127]). GGUF's Q8_0 is the
  same arithmetic in blocks of 32, but ``_weight_int8pack_mm`` takes one scale per output row only, so this is
  Q8_0 with the block spanning the whole row.
- ``int4``: asymmetric, groups of 32 along K (``w = q * d + m``, q in [0, 15]): GGUF's Q4_1 block exactly
  (Q4_0 is its special case m = -8 d). Re-quantizing a Q4_1 model's dequantized weights this way gives back
  its own blocks up to rounding, since each block's min and max sit on its grid.

The ops and their schemas (torch 2.13.0, ``torch.ops.aten.<op>.default._schema``; checks in
aten/src/ATen/native/LinearAlgebra.cpp and int4mm_kernel.cpp):
``_weight_int8pack_mm(Tensor self, Tensor mat2, Tensor scales)``: self [M, K] float/bf16/fp16, mat2 [N, K]
int8, scales [N] in self's dtype. ``_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles)``:
self [N, K] int32 in [0, 15], N divisible by 16 -> uint8 [N, K / 2].
``_weight_int4pack_mm_for_cpu(Tensor self, Tensor mat2, int qGroupSize, Tensor qScaleAndZeros)``:
qScaleAndZeros [K / group, N, 2] in self's dtype, dequantizing as ``(q - 8) * scale + zero``; K divisible
by the group.

On Ascend the same formats run ``torch_npu.npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor
antiquant_scale, Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor?
bias=None, int antiquant_group_size=0, int inner_precise=0)``, which computes ``x @ ((weight + offset) * scale)``
(torch_npu 7.x API reference; x float16/bfloat16, scales in x's dtype): int8 takes the ``[N, K]`` codes as a
transposed ``[K, N]`` view (recommended per channel) with ``[N]`` scales; int4 takes the Q4_1 codes shifted to
-8..7 and packed by ``npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0)`` (int32 ``[K, N]``
-> ``[K, N / 8]``), with per-group ``[K / 32, N]`` scales ``d`` and offsets ``8 + m / d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gemm import SegmentKernel, _into, _plus_bias
from .triton_gemm import triton_weight_quant_gemm

GGUF_BLOCK = 32  # Q8_0, Q4_0 and Q4_1 blocks hold 32 weights along K
WEIGHT_FORMATS = ("float", "int8", "int4")  # a GEMM primitive's weight format (``Primitive.weight_format``)
QUANTIZATIONS = ("none", "int8", "int4", "auto")  # --quantization: which formats to profile or load


def swept_formats(quantization: str) -> tuple[str, ...]:
    """The weight formats a profile times for ``quantization``: float always (today's path, and prefill's
    winner on CPU), plus the one asked for, or every format (auto)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
    if quantization == "auto":
        return WEIGHT_FORMATS
    return tuple(f for f in WEIGHT_FORMATS if f in ("float", quantization))
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs rows in sixteens


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight ``[N, K]`` in one quantized format, as its kernel takes it."""

    format: str  # int8 | int4
    data: torch.Tensor  # int8 [N, K] or int4-packed uint8 [N, K / 2]
    # int8: [N]; int4: [K / group, N, 2] (scale, zero) in the activations' dtype (NPU: [K / group, N];
    # CUDA: [N, K / group])
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int  # along K; int8: K (one scale per row)
    offsets: torch.Tensor | None = None  # int4: NPU [K / group, N] antiquant offsets, CUDA [N, K / group] minimums

    @property
    def nbytes(self) -> int:
        extra = () if self.offsets is None else (self.offsets,)
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, *extra))


def int8_weight_ops_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def npu_weight_quant_available() -> bool:
    """torch_npu with its weight-only quantized matmul and int4 packing (Ascend)."""
    try:
        import torch_npu  # optional: only on Ascend
    except ImportError:
        return False
    return all(hasattr(torch_npu, op) for op in ("npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack"))


def int4_weight_ops_available() -> bool:
    return all(hasattr(torch.ops.aten, op) for op in ("_convert_weight_to_int4pack_for_cpu",
                                                       "_weight_int4pack_mm_for_cpu"))


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8 (scales from the row's absolute maximum, computed in float32)."""
    w = weight.detach().to(torch.float32)
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q.contiguous(), scales.to(weight.dtype), tuple(weight.shape), weight.shape[1])


def int4_shape_failure(n: int, k: int, group_size: int = GGUF_BLOCK) -> str | None:
    """Why torch's CPU int4 packing cannot take an ``[n, k]`` weight (None: it can)."""
    if n % INT4_ROW_MULTIPLE:
        return f"int4 packing needs N divisible by {INT4_ROW_MULTIPLE}, got {n}"
    if k % group_size:
        return f"int4 groups of {group_size} need K divisible by {group_size}, got {k}"
    return None


def int4_codes(weight: torch.Tensor, group_size: int = GGUF_BLOCK):
    """Q4_1's codes ``q [N, K]`` (int32 in [0, 15]) and each group's step ``d`` and minimum ``m``
    ``[N, K / group]`` (float32), so that ``w ~ q * d + m``."""
    n, k = weight.shape
    groups = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    d = ((high - low) / 15.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / d[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
    return q, d, low


def quantize_int4(weight: torch.Tensor, group_size: int = GGUF_BLOCK) -> QuantizedWeight:
    """Asymmetric int4 in groups of ``group_size`` along K, as GGUF Q4_1 (``w = q * d + m``)."""
    n, k = weight.shape
    if (why := int4_shape_failure(n, k, group_size)) is not None:
        raise ValueError(why)
    return int4_weight(*int4_codes(weight, group_size), weight.dtype, weight.device)


def int4_weight(q: torch.Tensor, d: torch.Tensor, low: torch.Tensor, dtype: torch.dtype,
                device: torch.device | str) -> QuantizedWeight:
    """Q4_1 codes ``q [N, K]`` (0..15) with each group's step ``d`` and minimum ``low`` ``[N, K / group]`` in the
    layout ``device``'s kernel takes, scales in ``dtype``: torch's packed int4 (CPU), torch_npu's int4 pack
    (Ascend) or nibble pairs (CUDA, ``triton_weight_quant_gemm``). The codes come from a float weight
    (``int4_codes``) or straight from a GGUF file's Q4_0/Q4_1/Q4_K blocks (``GGUFInt4Blocks``)."""
    n, k = q.shape
    group_size = k // d.shape[1]
    device = torch.device(device)
    q, d, low = q.to(device=device, dtype=torch.int32), d.to(device, torch.float32), low.to(device, torch.float32)
    if device.type == "npu":
        import torch_npu  # optional: only on Ascend

        packed = torch_npu.npu_convert_weight_to_int4pack((q - 8).t().contiguous())
        return QuantizedWeight("int4", packed, d.t().to(dtype).contiguous(), (n, k), group_size,
                               (8.0 + low / d).t().to(dtype).contiguous())
    if device.type == "cuda":
        return int4_nibbles(q, d, low, dtype)
    zero = low + 8.0 * d  # the op dequantizes (q - 8) * scale + zero
    scale_zero = torch.stack([d.t(), zero.t()], dim=-1).to(dtype).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return QuantizedWeight("int4", packed, scale_zero, (n, k), group_size)


def int4_nibbles(q: torch.Tensor, d: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> QuantizedWeight:
    """The Triton kernel's int4 layout: codes two to a byte along K (even k in the low nibble), with per-group
    steps and minimums ``[N, K / group]`` in ``dtype`` (as GGUF keeps them in float16)."""
    n, k = q.shape
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return QuantizedWeight("int4", packed, d.to(dtype).contiguous(), (n, k), k // d.shape[1],
                           low.to(dtype).contiguous())


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def format_bytes(fmt: str, n: int, k: int, elem_bytes: int, group_size: int = GGUF_BLOCK) -> int:
    """Bytes an ``[n, k]`` weight takes in ``fmt`` with scales of ``elem_bytes`` (what QuantizedWeight.nbytes
    will be), known before quantizing so a memory budget can choose formats."""
    if fmt == "float":
        return n * k * elem_bytes
    if fmt == "int8":
        return n * k + n * elem_bytes
    return n * k // 2 + (k // group_size) * n * 2 * elem_bytes


def _bind_triton(qw: QuantizedWeight, bias: torch.Tensor | None, bits: int) -> SegmentKernel:
    def run(x, out, config):
        if out is None:
            out = torch.empty(x.shape[0], qw.shape[0], dtype=x.dtype, device=x.device)
        triton_weight_quant_gemm(x, qw.data, qw.scales, out, bits, qw.group_size, qw.offsets, **config)
        return _plus_bias(out, bias)
    return run


def bind_int8_weight(weight: torch.Tensor, bias: torch.Tensor | None = None,
                     quantized: QuantizedWeight | None = None) -> SegmentKernel:
    """``_weight_int8pack_mm`` (CPU), the Triton weight-only GEMM (CUDA) or ``npu_weight_quant_batchmatmul``
    (Ascend) on the weight quantized once here (``quantized``: one made already)."""
    qw = quantized or quantize_int8(weight)
    if qw.data.device.type == "cuda":
        return _bind_triton(qw, bias, 8)
    if qw.data.device.type == "npu":
        import torch_npu  # optional: only on Ascend

        codes = qw.data.t()  # [K, N] view of the [N, K] codes: the per-channel layout the op prefers
        return lambda x, out, config: _into(out, _plus_bias(
            torch_npu.npu_weight_quant_batchmatmul(x, codes, qw.scales), bias))
    return lambda x, out, config: _into(out, _plus_bias(
        torch.ops.aten._weight_int8pack_mm(x.contiguous(), qw.data, qw.scales), bias))


def bind_int4_weight(weight: torch.Tensor, bias: torch.Tensor | None = None,
                     quantized: QuantizedWeight | None = None) -> SegmentKernel:
    """``_weight_int4pack_mm_for_cpu`` (CPU), the Triton weight-only GEMM on nibbles (CUDA) or
    ``npu_weight_quant_batchmatmul`` per group (Ascend) on the weight quantized once here (``quantized``: one
    made already)."""
    qw = quantized or quantize_int4(weight)
    if qw.data.device.type == "cuda":
        return _bind_triton(qw, bias, 4)
    if qw.data.device.type == "npu":
        import torch_npu  # optional: only on Ascend

        return lambda x, out, config: _into(out, _plus_bias(torch_npu.npu_weight_quant_batchmatmul(
            x, qw.data, qw.scales, qw.offsets, antiquant_group_size=qw.group_size), bias))
    return lambda x, out, config: _into(out, _plus_bias(
        torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), qw.data, qw.group_size, qw.scales), bias))


QUANTIZED_BINDS = {"int8": bind_int8_weight, "int4": bind_int4_weight}
