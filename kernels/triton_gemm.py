"""Tiled Triton GEMMs ``y = x @ w.T`` with a masked (virtually padded) M/N/K tail: on a float weight, and on a
weight-only quantized one (int8 per output channel, or Q4_1 nibbles in groups) dequantized tile by tile.

The tile sizes are the profiler's config space (BLOCK_M/N/K, num_warps,
num_stages). Out-of-range rows are masked rather than copied into a padded
buffer, which is the property SmoothGEMM relies on for its tail segment.
Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _x_tile(x_ptr, rm, kk, M, K, stride_xm, stride_xk):
        """The activations' [BLOCK_M, BLOCK_K] tile, rows and columns past M and K read as 0 (virtual padding)."""
        return tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                       mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)

    @triton.jit
    def _store_tile(y_ptr, acc, rm, rn, M, N, stride_ym, stride_yn):
        """The float32 accumulator into the output's dtype, the tail masked."""
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, y_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = _x_tile(x_ptr, rm, kk, M, K, stride_xm, stride_xk)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc += tl.dot(x, w, input_precision=PRECISION)
        _store_tile(y_ptr, acc, rm, rn, M, N, stride_ym, stride_yn)

    @triton.jit
    def _weight_quant_gemm_kernel(
        x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, M, N, K,
        stride_xm, stride_xk, stride_qn, stride_sn, stride_ym, stride_yn,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # BITS 8: q int8 [N, K], s [N] (applied once, after the K loop). BITS 4: q uint8 [N, K / 2] holding k = 2j
        # in the low nibble of byte j and k = 2j + 1 in the high one, s (step d) and m (minimum) [N, K / GROUP]
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = _x_tile(x_ptr, rm, kk, M, K, stride_xm, stride_xk)
            w_mask = (rn[None, :] < N) & (kk[:, None] < K)
            if BITS == 8:
                w = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None], mask=w_mask, other=0).to(tl.float32)
            else:
                packed = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] // 2, mask=w_mask, other=0)
                code = (packed.to(tl.int32) >> ((kk[:, None] % 2) * 4)) & 0xF
                group = rn[None, :] * stride_sn + kk[:, None] // GROUP
                step = tl.load(s_ptr + group, mask=w_mask, other=0.0).to(tl.float32)
                low = tl.load(m_ptr + group, mask=w_mask, other=0.0).to(tl.float32)
                w = code.to(tl.float32) * step + low
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        if BITS == 8:
            acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        _store_tile(y_ptr, acc, rm, rn, M, N, stride_ym, stride_yn)


# ``tl.dot``'s ``input_precision`` for every dtype. For float32 inputs Triton's default is TF32 (10-bit
# mantissas): float32 rows would then beat the float32 (non-TF32) peak, SmoothGEMM would pick them and their
# outputs would stop matching the reference. For 16-bit inputs the option changes nothing (tensor cores run
# either way: ``supportMMA`` in triton lib/Analysis/Utility.cpp tests the precision for f32 x f32 only), and
# "ieee", unlike "tf32", is a name every backend accepts (triton 3.9 language/core.py ``dot``: AMD takes
# "tf32" on CDNA3 only; semantic.py ``_str_to_dot_input_precision`` checks the name whatever the dtype).
# No profiled dtype is named TF32, so nothing asks for TF32.
DOT_PRECISION = "ieee"


def triton_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, *,
                BLOCK_M: int = 64, BLOCK_N: int = 64, BLOCK_K: int = 32,
                num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``x[M, K] @ w[N, K].T`` into ``out[M, N]`` (allocated when not given)."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'xytune[cuda]').")
    M, K = x.shape
    N, K2 = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: x has K={K}, w has K={K2}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _gemm_kernel[grid](
        x, w, out, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=DOT_PRECISION,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def triton_weight_quant_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                             bits: int, group_size: int, offsets: torch.Tensor | None = None, *,
                             BLOCK_M: int = 16, BLOCK_N: int = 64, BLOCK_K: int = 64,
                             num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``x[M, K] @ dequant(codes).T`` into ``out[M, N]``: ``bits`` 8 (``codes`` int8 ``[N, K]``, ``scales``
    ``[N]``) or 4 (``codes`` uint8 nibbles ``[N, K / 2]``, ``scales`` and ``offsets`` ``[N, K / group_size]``:
    ``w = q * scale + offset``). The weight is read once per tile of M rows, at 1 or 1/2 byte a weight."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'xytune[cuda]').")
    M, K = x.shape
    N = codes.shape[0]
    if bits == 4 and (offsets is None or codes.shape[1] * 2 != K or K % group_size):
        raise ValueError(f"int4 codes must be [N, K / 2] nibbles with offsets, K divisible by {group_size}")
    if bits == 8 and codes.shape[1] != K:
        raise ValueError(f"inner dimensions differ: x has K={K}, the codes have K={codes.shape[1]}")
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _weight_quant_gemm_kernel[grid](
        x, codes, scales, scales if offsets is None else offsets, out, M, N, K,
        x.stride(0), x.stride(1), codes.stride(0), scales.stride(0) if bits == 4 else 0, out.stride(0), out.stride(1),
        BITS=bits, GROUP=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=DOT_PRECISION,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
