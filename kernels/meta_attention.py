"""Meta-Attention: a mixed prefill/decode/verify batch as fixed-size (query x key) tiles.

Plan (host side, once per batch shape): every request's rectangle of
(query rows x keys) is cut into ``tile_q x tile_kv`` tiles, one set per KV
head. Rows are GQA-packed: row ``r`` of a request's KV head ``h`` is query
token ``r // group`` with query head ``h * group + r % group``, so a decode
token's query heads fill one tile together instead of wasting ``tile_q - 1``
rows each. Tiles are classified ``full`` (no key masked), ``masked``
(diagonal or tree boundary, or a short last key block) or ``skipped`` (every
key masked; never emitted), and ordered longest key range first (what a
parallel backend needs to balance its workers).

Run (torch backend): all emitted tiles are gathered and computed in one
batched matmul-softmax-matmul; tiles of one row block merge over the key axis
by log-sum-exp. No Python loop over requests or heads in the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAUSAL, NO_MASK, TREE = "causal", "none", "tree"


@dataclass(frozen=True)
class AttnRequest:
    """One request's share of a step.

    ``context_len`` keys are already cached; ``q_len`` new tokens follow them
    and are both queries and keys. ``key_slots`` lists the cache slots of all
    ``context_len + q_len`` keys. For ``tree`` masks, ``parents[i]`` is the
    index of new token ``i``'s parent among the new tokens (-1: it hangs off
    the cached context); a token sees the context, its ancestors and itself.
    """

    q_len: int
    context_len: int
    key_slots: torch.Tensor
    mask: str = CAUSAL
    parents: tuple[int, ...] | None = None

    def allowed(self) -> torch.Tensor:
        """Bool ``[q_len, context_len + q_len]``: may query i read key j."""
        L = self.context_len + self.q_len
        keys = torch.arange(L)
        if self.mask == NO_MASK:
            return torch.ones(self.q_len, L, dtype=torch.bool)
        if self.mask == CAUSAL:
            return keys[None, :] <= (self.context_len + torch.arange(self.q_len))[:, None]
        if self.mask != TREE or self.parents is None or len(self.parents) != self.q_len:
            raise ValueError("a tree mask needs one parent index per new token")
        anc = torch.eye(self.q_len, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= i:
                raise ValueError("tree parents must come before their children")
            if p >= 0:
                anc[i] |= anc[p]
        out = torch.zeros(self.q_len, L, dtype=torch.bool)
        out[:, : self.context_len] = True
        out[:, self.context_len:] = anc
        return out


@dataclass
class MetaAttentionPlan:
    tile_q: int
    tile_kv: int
    num_heads: int
    num_kv_heads: int
    q_index: torch.Tensor  # [N, tile_q] rows of q.view(T*H, d) (0 where padding)
    kv_index: torch.Tensor  # [N, tile_kv] rows of cache.view(kvh*S, d) (0 where padding)
    bias: torch.Tensor  # [N, tile_q, tile_kv] 0 or -inf
    block_of_tile: torch.Tensor  # [N] row block each tile belongs to (the LSE merge key)
    key_len: torch.Tensor  # [N] real keys in each tile (tiles are sorted by it, longest first)
    out_index: torch.Tensor  # [B] flat rows of out.view(T*H, d) for every valid packed row
    out_rows: torch.Tensor  # [B] (row block * tile_q + row) of those rows
    num_blocks: int
    counts: dict  # tiles per class: full, masked, skipped

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The tile bias in ``dtype``, converted once per plan."""
        cached = getattr(self, "_bias_cache", None)
        if cached is None or cached.dtype != dtype:
            cached = self._bias_cache = self.bias.to(dtype)
        return cached


def plan_meta_attention(requests: list[AttnRequest], num_heads: int, num_kv_heads: int, cache_slots: int,
                        tile_q: int = 64, tile_kv: int = 128) -> MetaAttentionPlan:
    """Cut a batch into classified, GQA-packed, longest-first tiles (host side)."""
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    g = num_heads // num_kv_heads
    tiles = []  # (key_len, q_rows, kv_rows, bias, block)
    out_index, out_rows = [], []
    counts = {"full": 0, "masked": 0, "skipped": 0}
    token_base, block = 0, 0
    for req in requests:
        L = req.context_len + req.q_len
        allowed = req.allowed().repeat_interleave(g, dim=0)  # packed rows: token-major, group head minor
        rows = req.q_len * g
        token = torch.arange(rows) // g
        for h in range(num_kv_heads):
            head = h * g + torch.arange(rows) % g
            flat_q = (token_base + token) * num_heads + head
            flat_kv = h * cache_slots + req.key_slots
            for r0 in range(0, rows, tile_q):
                r1 = min(rows, r0 + tile_q)
                n = r1 - r0
                out_index.append(flat_q[r0:r1])
                out_rows.append(block * tile_q + torch.arange(n))
                for k0 in range(0, L, tile_kv):
                    k1 = min(L, k0 + tile_kv)
                    a = allowed[r0:r1, k0:k1]
                    if not a.any():
                        counts["skipped"] += 1
                        continue
                    full = bool(a.all()) and n == tile_q and k1 - k0 == tile_kv
                    counts["full" if full else "masked"] += 1
                    qi = torch.zeros(tile_q, dtype=torch.long)
                    qi[:n] = flat_q[r0:r1]
                    ki = torch.zeros(tile_kv, dtype=torch.long)
                    ki[: k1 - k0] = flat_kv[k0:k1]
                    bias = torch.full((tile_q, tile_kv), float("-inf"))
                    bias[:n, : k1 - k0].masked_fill_(a, 0.0)
                    tiles.append((k1 - k0, qi, ki, bias, block))
                block += 1
        token_base += req.q_len
    tiles.sort(key=lambda t: -t[0])  # longest key range first
    if not tiles:
        raise ValueError("the batch has no query rows")
    return MetaAttentionPlan(
        tile_q, tile_kv, num_heads, num_kv_heads,
        q_index=torch.stack([t[1] for t in tiles]), kv_index=torch.stack([t[2] for t in tiles]),
        bias=torch.stack([t[3] for t in tiles]), block_of_tile=torch.tensor([t[4] for t in tiles]),
        key_len=torch.tensor([t[0] for t in tiles]),
        out_index=torch.cat(out_index), out_rows=torch.cat(out_rows), num_blocks=block, counts=counts,
    )


def run_meta_attention_torch(plan: MetaAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against head-major caches ``[kv_heads, slots, d]`` -> ``[T, H, d]``."""
    T, H, d = q.shape
    qf = q.reshape(T * H, d)
    q_t = qf[plan.q_index]  # [N, tq, d]
    k_t = k_cache.reshape(-1, d)[plan.kv_index]  # [N, tkv, d]
    v_t = v_cache.reshape(-1, d)[plan.kv_index]
    # GEMMs in the input dtype (bf16 runs them ~2x faster on CPU), softmax statistics in float32
    s = torch.baddbmm(plan.bias_as(q.dtype), q_t, k_t.transpose(1, 2), alpha=scale).float()
    m = s.amax(-1)  # [N, tq]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    l = p.sum(-1)
    o = torch.bmm(p.to(q.dtype), v_t).float()  # [N, tq, d], unnormalised
    # log-sum-exp merge of the tiles of each row block
    nb, tq = plan.num_blocks, plan.tile_q
    idx = plan.block_of_tile
    big_m = torch.full((nb, tq), float("-inf")).scatter_reduce(0, idx[:, None].expand(-1, tq), m, "amax")
    big_m = torch.where(torch.isinf(big_m), torch.zeros_like(big_m), big_m)
    w = torch.exp(m - big_m[idx])  # 0 for rows a tile fully masks
    num = torch.zeros(nb, tq, d).index_add_(0, idx, o * w[..., None])
    den = torch.zeros(nb, tq).index_add_(0, idx, l * w)
    rows = (num / den[..., None]).reshape(nb * tq, d)[plan.out_rows]
    out = torch.empty(T * H, d, dtype=q.dtype, device=q.device)
    out[plan.out_index] = rows.to(q.dtype)
    return out.view(T, H, d)
