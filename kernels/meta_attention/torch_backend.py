"""Meta-Attention's torch backend: a plan's tiles as batched GEMMs (short class) and grouped attention
(long class) on any device torch runs on; the CPU's path and the fallback where Triton or torch_npu is absent."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiles import LongGroup, MetaAttentionPlan, ShortTiles


def run_meta_attention_torch(plan: MetaAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against head-major caches ``[kv_heads, slots, d]`` -> ``[T, H, d]``."""
    T, H, d = q.shape
    out = torch.empty_like(q)
    for tiles in (plan.short, plan.short_multi):
        if tiles is not None:
            _run_short(plan, tiles, q, k_cache, v_cache, scale, out)
    for grp in plan.long:
        _run_long(plan, grp, q, k_cache, v_cache, scale, out)
    return out


def _gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` for a 2-D row index, through index_select (20x faster than advanced indexing on CPU)."""
    return source.index_select(0, index.reshape(-1)).view(*index.shape, source.shape[-1])


def _run_short(plan, st: ShortTiles, q, k_cache, v_cache, scale, out) -> None:
    T, H, d = q.shape
    N, P = st.kv_index.shape
    # GEMMs in the input dtype unless the batch is at most the table's float32_short_tiles (few tiles, where
    # this CPU's float32 batched GEMM beats its bf16 one); softmax statistics in float32
    small = q.device.type == "cpu" and q.dtype != torch.float32 and N <= plan.float32_short_tiles
    dtype = torch.float32 if small else q.dtype
    qt = _gather_rows(q.reshape(T * H, d), st.q_index).to(dtype)  # [N, tq, d]
    kt = _gather_rows(k_cache.reshape(-1, st.page * d), st.kv_index).view(N, P * st.page, d)  # [N, tkv, d]
    vt = _gather_rows(v_cache.reshape(-1, st.page * d), st.kv_index).view(N, P * st.page, d)
    kt, vt = kt.to(dtype), vt.to(dtype)
    s = torch.baddbmm(st.bias_as(dtype), qt, kt.transpose(1, 2), alpha=scale)
    if not st.split:  # one tile per segment: a plain softmax (float32 inside, the input dtype out), no merge
        rows = torch.bmm(torch.softmax(s, -1), vt).reshape(-1, d)
    else:
        # Every tile is exponentiated against its segment's maximum (over all of the segment's tiles), so the
        # partial sums merge by plain addition: no per-tile rescaling, and rows a tile masks entirely add 0.
        tq = st.q_index.shape[1]
        big = torch.full((st.num_segments, tq), float("-inf"), dtype=s.dtype)
        big = big.scatter_reduce_(0, st.segment[:, None].expand(-1, tq), s.amax(-1), "amax")
        p = s.float().sub_(big[st.segment][..., None]).exp_()
        o = torch.bmm(p.to(dtype), vt).float()  # unnormalised
        num = torch.zeros(st.num_segments, tq, d).index_add_(0, st.segment, o)
        den = torch.zeros(st.num_segments, tq).index_add_(0, st.segment, p.sum(-1))
        rows = num.div_(den[..., None]).reshape(-1, d)
    out.view(T * H, d).index_copy_(0, st.out_index, rows.index_select(0, st.out_from).to(q.dtype))


def _run_long(plan, grp: LongGroup, q, k_cache, v_cache, scale, out) -> None:
    """Short key ranges: GQA-packed batched GEMMs (about 2x torch's CPU flash kernel there); long ones: fused SDPA."""
    B, tq = grp.q_tokens.shape
    T, H, d = q.shape
    kvh, S = k_cache.shape[:2]
    Lg, g = grp.key_slots.shape[1], H // kvh
    idx = grp.packed_index(kvh, S)
    k = _gather_rows(k_cache.reshape(-1, grp.page * d), idx.kv).view(kvh, B, Lg, d)
    v = _gather_rows(v_cache.reshape(-1, grp.page * d), idx.kv).view(kvh, B, Lg, d)
    if Lg > plan.sdpa_min_keys:
        qg = q.index_select(0, grp.q_tokens.reshape(-1)).view(B, tq, H, d)
        o = F.scaled_dot_product_attention(qg.transpose(1, 2), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=grp.mask, scale=scale, enable_gqa=g > 1)
        rows = o.transpose(1, 2).reshape(B * tq, H, d)
        out.index_copy_(0, grp.out_tokens, rows.index_select(0, grp.out_from))
        return
    # q's g heads of one KV head are contiguous: gathering (KV head, tile, row) rows of g*d packs them directly
    qp = _gather_rows(q.reshape(T * kvh, g * d), idx.q).mul_(scale).view(kvh * B, tq * g, d)
    s = torch.bmm(qp, k.view(kvh * B, Lg, d).transpose(1, 2))
    s.view(kvh, B, tq, g, Lg).add_(grp.bias(q.dtype))
    o = torch.bmm(torch.softmax(s, -1), v.view(kvh * B, Lg, d))  # softmax in float32 inside, q's dtype out
    out.view(T * kvh, g * d).index_copy_(0, idx.out_dst, o.view(-1, g * d).index_select(0, idx.out_src))
