"""Meta-Attention on Ascend NPUs: the plan's tile classes mapped onto torch_npu's fused attention op.

``torch_npu.npu_fused_infer_attention_score`` has two branches: with one
query token per sequence it runs IncreFlashAttention (decode), otherwise
PromptFlashAttention. The short class's decode requests go to the first as
one batch (their K/V gathered from the paged cache into ``BSND`` with
``actual_seq_lengths_kv`` per request, so no padding is computed); the long
class's tile groups, and short verify requests, go to the second with their
mask (torch_npu masks where the mask is True, the opposite of SDPA). GQA is
native to the op (``num_key_value_heads``).

The op's paged mode (``block_table`` with ``block_size``) would read K/V in
place instead of gathering them per call, but it wants the cache as
``[blocks, block_size, kv_heads * d]`` pages, not the engine's head-major
``[kv_heads, slots, d]``: adopting it means changing the KV cache layout.

Needs torch_npu and an NPU; tests/test_npu_contract.py runs it against a CPU
stand-in with the op's upstream schema.
"""

from __future__ import annotations

import torch

from .long import _long_group
from .tiles import LongGroup, MetaAttentionPlan

# The op's query dtypes (int8 only with quantisation scales): torch_npu API reference,
# torch_npu.npu_fused_infer_attention_score, "query ... FLOAT16, BFLOAT16, INT8"
NPU_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)


def run_meta_attention_npu(plan: MetaAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against head-major caches ``[kv_heads, slots, d]`` -> ``[T, H, d]``.

    A float32 ``q`` is refused rather than cast: computing a float32 engine's attention in half precision would
    quietly break the float32 results it promises (greedy output equal to the float32 reference)."""
    if q.dtype not in NPU_ATTENTION_DTYPES:
        raise ValueError(f"torch_npu's fused attention takes float16 or bfloat16, not {str(q.dtype)[6:]}: run the "
                         "engine in --dtype bfloat16 or float16 on an NPU.")
    import torch_npu  # optional: only on Ascend

    T, H, d = q.shape
    kvh = k_cache.shape[0]
    out = torch.empty_like(q)
    decode = [(b, r) for b, r in plan.short_requests if r.q_len == 1]
    other = [(b, r) for b, r in plan.short_requests if r.q_len > 1]
    if decode:
        lens = [r.num_keys for _, r in decode]
        lmax = max(lens)
        slots = torch.zeros(len(decode), lmax, dtype=torch.long)
        for i, (_, r) in enumerate(decode):
            slots[i, : r.num_keys] = r.key_slots
        slots = slots.to(q.device)
        k = k_cache[:, slots].permute(1, 2, 0, 3).contiguous()  # [B, Lmax, kvh, d]
        v = v_cache[:, slots].permute(1, 2, 0, 3).contiguous()
        rows = torch.tensor([b for b, _ in decode], device=q.device)
        o, _ = torch_npu.npu_fused_infer_attention_score(
            q[rows][:, None].contiguous(), k, v, actual_seq_lengths_kv=lens, num_heads=H,
            num_key_value_heads=kvh, input_layout="BSND", scale=scale)
        out[rows] = o[:, 0]
    groups = list(plan.long)
    if other:  # one group, padded to its longest request's keys: _long_group wants its tiles longest first
        tiles = sorted(((r.num_keys, b, r, 0, r.q_len, r.allowed()) for b, r in other), key=lambda t: -t[0])
        groups.append(_long_group(tiles, max(r.q_len for _, r in other)))
    for grp in groups:
        _run_group(grp, q, k_cache, v_cache, scale, out, torch_npu)
    return out


def _run_group(grp: LongGroup, q, k_cache, v_cache, scale, out, torch_npu) -> None:
    B, tq = grp.q_tokens.shape
    T, H, d = q.shape
    kvh = k_cache.shape[0]
    dev = q.device
    qg = q[grp.q_tokens.to(dev)]  # [B, tq, H, d]
    k = k_cache[:, grp.key_slots.to(dev)].permute(1, 2, 0, 3).contiguous()  # [B, Lg, kvh, d]
    v = v_cache[:, grp.key_slots.to(dev)].permute(1, 2, 0, 3).contiguous()
    masked = (~grp.mask).to(dev)  # torch_npu: True = masked out
    o, _ = torch_npu.npu_fused_infer_attention_score(
        qg.contiguous(), k, v, atten_mask=masked, num_heads=H, num_key_value_heads=kvh, input_layout="BSND",
        scale=scale, sparse_mode=0)
    out.index_copy_(0, grp.out_tokens.to(dev), o.reshape(B * tq, H, d)[grp.out_from.to(dev)])
