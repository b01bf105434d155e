"""The per-request SDPA loop: one fused ``scaled_dot_product_attention`` call per request.

It is what Meta-Attention is measured against, and what the engine runs for a
class of steps where the cost table measured it faster (on a CPU whose fused
SDPA is quick, or a batch of few long requests). K/V are gathered by
``index_select`` and GQA is left to SDPA (``enable_gqa``), so no head is
repeated in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .meta_attention import AttnRequest


def request_masks(requests: list[AttnRequest], device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """Per request, the boolean mask its SDPA call takes; None for a decode (it reads every key). Made once per
    step: every layer reuses them."""
    return [None if r.q_len == 1 else r.allowed().to(device) for r in requests]


def run_sdpa_loop(requests: list[AttnRequest], masks: list[torch.Tensor | None], q: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [T, H, d]`` (requests' tokens in order) against head-major caches ``[kv_heads, slots, d]``."""
    out = torch.empty_like(q)
    base, gqa = 0, q.shape[1] != k_cache.shape[0]
    for r, mask in zip(requests, masks):
        slots = r.key_slots.to(k_cache.device)
        k = k_cache.index_select(1, slots)[None]
        v = v_cache.index_select(1, slots)[None]
        qr = q[base: base + r.q_len].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[base: base + r.q_len] = o[0].transpose(0, 1)
        base += r.q_len
    return out
