"""Meta-Attention on Triton: one kernel launch runs the whole task list of a mixed batch.

A task is ``BLOCK_M`` GQA-packed query rows of one request and KV head
against one key range of at most ``kv_split`` keys, read straight from the
paged cache through the request's slot list; causal, tree (an ancestor
bitmask per token, in as many 64-bit words as the longest tree needs) and
no-mask rows share the kernel. Key ranges past a row block's causal frontier
are never scheduled; a long context becomes several tasks (split-KV) whose
partial results (un-normalised output, row max, row sum) merge by
log-sum-exp afterwards; a plan with no split key range writes the output
from the kernel and merges nothing. Tasks are ordered longest key range
first so the GPU's last wave is short. Any head dim runs: the kernel pads it
to a power of two with masked loads.

Runs on CUDA; on CPU tensors under ``TRITON_INTERPRET=1`` (float32) for tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..triton_gemm import DOT_PRECISION
from .tiles import CAUSAL, NO_MASK, TREE, AttnRequest

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

MASK_CODE = {CAUSAL: 0, NO_MASK: 1, TREE: 2}
# task columns
T_ROW0, T_ROWS, T_TOKEN, T_CTX, T_HEAD, T_K0, T_K1, T_SLOTS, T_MASK, T_SEG = range(10)
TREE_WORD = 64  # a tree token's ancestors: one bit per new token of its request, in int64 words
MIN_BLOCK = 16  # tl.dot takes no side below 16 (the head dim is padded up to it)


@dataclass
class TritonPlan:
    tasks: torch.Tensor  # [N, 10] int32, longest key range first
    key_slots: torch.Tensor  # [sum L] int32, every request's slots back to back
    tree_bits: torch.Tensor  # [T, W] int64: bit j % 64 of word j // 64 set where new token j is an ancestor (or self)
    out_index: torch.Tensor  # [R] int64 rows of out.view(T*H, d), one per real packed row
    out_from: torch.Tensor  # [R] int64 (segment * BLOCK_M + row) each comes from after the merge
    num_segments: int
    block_m: int
    block_n: int
    split: bool  # some segment has several tasks: partial results merge by log-sum-exp; else tasks write out


def plan_triton(requests: list[AttnRequest], num_heads: int, num_kv_heads: int, block_m: int = 16,
                block_n: int = 32, kv_split: int = 512, device: str | torch.device = "cpu") -> TritonPlan:
    g = num_heads // num_kv_heads
    tasks, seg_rows, slots = [], [], []
    seg, token_base, slot_base = 0, 0, 0
    total = sum(r.q_len for r in requests)
    words = max([-(-r.q_len // TREE_WORD) for r in requests if r.mask == TREE], default=1)
    bits = np.zeros((total, words), dtype=np.uint64)
    for r in requests:
        if r.mask == TREE:
            for i, p in enumerate(r.parents):
                if p >= 0:
                    bits[token_base + i] = bits[token_base + p]
                bits[token_base + i, i // TREE_WORD] |= np.uint64(1) << np.uint64(i % TREE_WORD)
        slots.append(r.key_slots.numpy().astype(np.int32))
        L, R = r.num_keys, r.q_len * g
        for h in range(num_kv_heads):
            for r0 in range(0, R, block_m):
                rows = min(block_m, R - r0)
                last_token = (r0 + rows - 1) // g
                k1 = r.context_len + last_token + 1 if r.mask == CAUSAL else L
                for k0 in range(0, k1, kv_split):
                    tasks.append((r0, rows, token_base, r.context_len, h, k0, min(k1, k0 + kv_split), slot_base,
                                  MASK_CODE[r.mask], seg))
                rr = r0 + np.arange(block_m)
                flat = (token_base + rr // g) * num_heads + h * g + rr % g
                seg_rows.append(np.where(rr < R, flat, -1))
                seg += 1
        token_base += r.q_len
        slot_base += L
    t = np.asarray(tasks, dtype=np.int32)
    t = t[np.argsort(-(t[:, T_K1] - t[:, T_K0]), kind="stable")]
    dest = np.concatenate(seg_rows)
    real = np.flatnonzero(dest >= 0)  # host side, once per step: the run never syncs to find them
    return TritonPlan(
        tasks=torch.from_numpy(t).to(device), key_slots=torch.from_numpy(np.concatenate(slots)).to(device),
        tree_bits=torch.from_numpy(bits.view(np.int64)).to(device),
        out_index=torch.from_numpy(dest[real]).to(device), out_from=torch.from_numpy(real).to(device),
        num_segments=seg, block_m=block_m, block_n=block_n, split=len(t) > seg,
    )


if triton is not None:

    @triton.jit
    def _meta_attention_kernel(
        q_ptr, k_ptr, v_ptr, tasks_ptr, slots_ptr, bits_ptr, o_ptr, m_ptr, l_ptr, scale,
        stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_ot, stride_oh, tree_words,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
    ):
        """One task. ``DIRECT`` (no segment split): the normalised rows go straight to ``o_ptr`` = out
        ``[T, H, d]``; otherwise the task's partial (un-normalised rows, row max, row sum) to ``o/m/l``."""
        task = tl.program_id(0)
        base = tasks_ptr + task * 10
        row0 = tl.load(base + 0)
        nrows = tl.load(base + 1)
        token0 = tl.load(base + 2)
        ctx = tl.load(base + 3)
        # 64-bit element offsets: one KV head's pool (slots x d) passes 2**31 elements on large caches
        head = tl.load(base + 4).to(tl.int64)
        k0 = tl.load(base + 5)
        k1 = tl.load(base + 6)
        slot0 = tl.load(base + 7)
        kind = tl.load(base + 8)

        r = tl.arange(0, BLOCK_M)
        packed = row0 + r
        tok = packed // G  # token within the request
        token = (token0 + tok).to(tl.int64)
        qhead = head * G + packed % G
        row_ok = r < nrows
        # rows whose ancestor words are read; a block, as a load mask made from the scalar kind is mistyped
        # (int32, refused) by triton 3.9's interpreter
        tree_rows = row_ok & (tl.full((BLOCK_M,), 2, tl.int32) == kind)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM  # the head dim padded up to a power of two: the pad reads and writes nothing
        q = tl.load(q_ptr + token[:, None] * stride_qt + qhead[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for kb in range(k0, k1, BLOCK_N):
            kpos = kb + tl.arange(0, BLOCK_N)
            key_ok = kpos < k1
            slot = tl.load(slots_ptr + slot0 + kpos, mask=key_ok, other=0).to(tl.int64)
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + head * stride_kh + slot[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + head * stride_vh + slot[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            new = kpos[None, :] - ctx  # index among the request's new tokens (negative: cached context)
            causal_ok = kpos[None, :] <= ctx + tok[:, None]
            # tree: bit (new % 64) of word (new // 64), so the shift stays below 64; words are read only for
            # tree tasks' real (row, new key) pairs
            new_c = tl.maximum(new, 0)
            word = tl.load(bits_ptr + token[:, None] * tree_words + new_c // 64,
                           mask=tree_rows[:, None] & key_ok[None, :] & (new >= 0), other=0)
            tree_ok = (new < 0) | (((word >> (new_c % 64)) & 1) == 1)
            allowed = key_ok[None, :] & row_ok[:, None] & (
                ((kind == 0) & causal_ok) | (kind == 1) | ((kind == 2) & tree_ok))
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if DIRECT:
            rows = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + token[:, None] * stride_ot + qhead[:, None] * stride_oh + d[None, :],
                     rows.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            out = (task * BLOCK_M + r).to(tl.int64)
            tl.store(o_ptr + out[:, None] * HEAD_DIM + d[None, :], acc, mask=d_ok[None, :])
            tl.store(m_ptr + out, m_i)
            tl.store(l_ptr + out, l_i)


def run_meta_attention_triton(plan: TritonPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against head-major caches ``[kv_heads, slots, d]`` -> ``[T, H, d]``.

    Any head dim: it is padded to the next power of two (at least 16) inside the kernel, with masked loads.
    No host sync: the plan holds every index the run needs.
    """
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'xytune[cuda]').")
    T, H, d = q.shape
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("the Triton Meta-Attention kernel reads each head's d values contiguously")
    N, bm = plan.tasks.shape[0], plan.block_m
    launch = functools.partial(
        _meta_attention_kernel[(N,)], q, k_cache, v_cache, plan.tasks, plan.key_slots, plan.tree_bits)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    tiles = dict(G=H // k_cache.shape[0], HEAD_DIM=d, BLOCK_D=max(MIN_BLOCK, triton.next_power_of_2(d)),
                 BLOCK_M=bm, BLOCK_N=plan.block_n, PRECISION=DOT_PRECISION)
    if not plan.split:  # one task per segment: each writes its rows, normalised, with no merge
        out = torch.empty(T, H, d, dtype=q.dtype, device=q.device)
        launch(out, out, out, scale, *strides, out.stride(0), out.stride(1), plan.tree_bits.shape[1],
               DIRECT=True, **tiles)
        return out
    o = torch.empty(N * bm, d, dtype=torch.float32, device=q.device)
    m = torch.empty(N * bm, dtype=torch.float32, device=q.device)
    l = torch.empty(N * bm, dtype=torch.float32, device=q.device)
    launch(o, m, l, scale, *strides, 0, 0, plan.tree_bits.shape[1], DIRECT=False, **tiles)
    # log-sum-exp merge of each segment's tasks
    seg = plan.tasks[:, T_SEG].long()
    m, l, o = m.view(N, bm), l.view(N, bm), o.view(N, bm, d)
    big = torch.full((plan.num_segments, bm), float("-inf"), device=q.device)
    big = big.scatter_reduce(0, seg[:, None].expand(-1, bm), m, "amax")
    big = torch.where(torch.isinf(big), torch.zeros_like(big), big)
    w = torch.exp(m - big[seg])
    num = torch.zeros(plan.num_segments, bm, d, device=q.device).index_add_(0, seg, o * w[..., None])
    den = torch.zeros(plan.num_segments, bm, device=q.device).index_add_(0, seg, l * w)
    rows = (num / den.clamp_min(1e-30)[..., None]).view(-1, d)
    out = torch.empty(T * H, d, dtype=q.dtype, device=q.device)
    out.index_copy_(0, plan.out_index, rows.index_select(0, plan.out_from).to(q.dtype))
    return out.view(T, H, d)
