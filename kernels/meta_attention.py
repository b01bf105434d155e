"""Meta-Attention: a mixed prefill/decode/verify batch as a few fixed-shape tile classes.

The plan (host side, once per step, shared by every layer) sorts the batch's
requests into two tile classes:

- **short** (decode, short verify): a request's query heads that share a KV
  head are GQA-packed into the rows of one ``tile_q``-row tile (row ``r`` is
  query token ``r // group`` with query head ``h * group + r % group``), so a
  decode token fills ``group`` rows instead of wasting ``tile_q - 1``. Its
  keys are cut into ``tile_kv`` chunks (split-KV: a long context becomes
  several tiles that run in parallel) whose partial results merge by
  log-sum-exp. Tiles whose keys are all visible to all rows are ``full``; the
  rest (a short last chunk, a diagonal, a tree) are ``masked`` and carry a
  bias.
- **long** (prefill chunks): ``prefill_tile``-token query tiles, each reading
  only the keys up to its last row (tiles past the causal frontier are
  ``skipped``, never computed), grouped by key length so one fused attention
  call runs a whole group.

Tiles are ordered longest key range first (what a parallel backend needs to
balance its workers). The torch backend runs each class in a handful of
batched calls whatever the number of requests or heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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

    @property
    def num_keys(self) -> int:
        return self.context_len + self.q_len

    def allowed(self) -> torch.Tensor:
        """Bool ``[q_len, context_len + q_len]``: may query i read key j."""
        L = self.num_keys
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
class ShortTiles:
    """The short class: ``N`` GQA-packed ``tile_q x tile_kv`` tiles, split-KV, merged by segment."""

    q_index: torch.Tensor  # [N, tile_q] rows of q.view(T*H, d) (0 for padding rows)
    kv_index: torch.Tensor  # [N, tile_kv] rows of cache.view(kvh*S, d) (0 for padding keys)
    bias: torch.Tensor  # [N, 1 or tile_q, tile_kv] 0 / -inf (one row when no mask depends on the row)
    segment: torch.Tensor  # [N] (request, kv head, row tile) each tile belongs to
    num_segments: int
    key_len: torch.Tensor  # [N] real keys per tile, longest first
    out_index: torch.Tensor  # [R] rows of out.view(T*H, d) for every real packed row
    out_from: torch.Tensor  # [R] (segment * tile_q + row) each comes from; (tile * tile_q + row) unless split
    split: bool  # some segment has more than one tile: merge by log-sum-exp
    _bias_cache: dict = field(default_factory=dict)

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias_cache:
            self._bias_cache[dtype] = self.bias.to(dtype)
        return self._bias_cache[dtype]


@dataclass
class LongGroup:
    """Long-class query tiles of similar key length, run as one fused attention call."""

    q_tokens: torch.Tensor  # [B, tq] token rows of q (0 for padding)
    key_slots: torch.Tensor  # [B, Lg] cache slots (0 for padding)
    mask: torch.Tensor  # [B, 1, tq, Lg] bool: may the row read the key
    out_tokens: torch.Tensor  # [R] token rows written
    out_from: torch.Tensor  # [R] (tile * tq + row) each comes from


@dataclass
class MetaAttentionPlan:
    tile_q: int
    tile_kv: int
    prefill_tile: int
    num_heads: int
    num_kv_heads: int
    short: ShortTiles | None
    long: list[LongGroup]
    counts: dict  # tiles (per KV head) by class: full, masked, skipped


def plan_meta_attention(requests: list[AttnRequest], num_heads: int, num_kv_heads: int, cache_slots: int,
                        tile_q: int = 16, tile_kv: int = 256, prefill_tile: int = 64) -> MetaAttentionPlan:
    """Cut a batch into classified, GQA-packed, longest-first tiles (host side, no per-tile tensors)."""
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if not requests or not any(r.q_len for r in requests):
        raise ValueError("the batch has no query rows")
    if min(tile_q, tile_kv, prefill_tile) < 1:
        raise ValueError("tile sizes must be positive")
    g = num_heads // num_kv_heads
    counts = {"full": 0, "masked": 0, "skipped": 0}
    short, long, base = [], [], 0
    for r in requests:
        (short if r.q_len * g <= tile_q else long).append((base, r))
        base += r.q_len
    return MetaAttentionPlan(tile_q, tile_kv, prefill_tile, num_heads, num_kv_heads,
                             _plan_short(short, num_heads, num_kv_heads, cache_slots, tile_q, tile_kv, counts),
                             _plan_long(long, num_kv_heads, tile_kv, prefill_tile, counts), counts)


def _plan_short(items, H, kvh, cache_slots, tile_q, tile_kv, counts) -> ShortTiles | None:
    if not items:
        return None
    g = H // kvh
    row_dependent = any(r.q_len > 1 for _, r in items)
    q_idx, kv_idx, biases, seg, key_len, out_index, out_from = [], [], [], [], [], [], []
    s = 0
    rows = np.arange(tile_q)
    for base, r in items:
        L, R = r.num_keys, r.q_len * g
        allowed = r.allowed().repeat_interleave(g, dim=0).numpy() if row_dependent else None
        slots = r.key_slots.numpy()
        for h in range(kvh):
            qi = np.zeros(tile_q, dtype=np.int64)
            qi[:R] = (base + rows[:R] // g) * H + h * g + rows[:R] % g
            out_index.append(qi[:R])
            out_from.append(s * tile_q + rows[:R])
            for k0 in range(0, L, tile_kv):
                n = min(tile_kv, L - k0)
                ki = np.zeros(tile_kv, dtype=np.int64)
                ki[:n] = h * cache_slots + slots[k0: k0 + n]
                b = np.full((tile_q if row_dependent else 1, tile_kv), -np.inf, dtype=np.float32)
                if row_dependent:
                    b[:R, :n][allowed[:, k0: k0 + n]] = 0.0
                    b[R:, 0] = 0.0  # padding rows read one key: finite, discarded
                    full = n == tile_kv and bool(allowed[:, k0: k0 + n].all())
                else:
                    b[:, :n] = 0.0
                    full = n == tile_kv
                counts["full" if full else "masked"] += h == 0
                q_idx.append(qi)
                kv_idx.append(ki)
                biases.append(b)
                seg.append(s)
                key_len.append(n)
            s += 1
    order = np.argsort(-np.asarray(key_len), kind="stable")  # longest first
    segment = np.asarray(seg)[order]
    src = np.concatenate(out_from)
    split = len(seg) > s
    if not split:  # one tile per segment: rows are read straight from the (reordered) tiles
        tile_of = np.empty(s, dtype=np.int64)
        tile_of[segment] = np.arange(len(segment))
        src = tile_of[src // tile_q] * tile_q + src % tile_q
    t = torch.from_numpy
    return ShortTiles(
        q_index=t(np.stack(q_idx)[order]), kv_index=t(np.stack(kv_idx)[order]), bias=t(np.stack(biases)[order]),
        segment=t(segment), num_segments=s, key_len=t(np.asarray(key_len)[order]),
        out_index=t(np.concatenate(out_index)), out_from=t(src), split=split,
    )


def _plan_long(items, kvh, tile_kv, tq, counts) -> list[LongGroup]:
    tiles = []  # (keys, base, request, row0, row1)
    for base, r in items:
        allowed = r.allowed()
        for r0 in range(0, r.q_len, tq):
            r1 = min(r.q_len, r0 + tq)
            a = allowed[r0:r1]
            keys = int(a.any(0).nonzero().max()) + 1  # nothing past the last readable key is computed
            blocks = -(-r.num_keys // tile_kv)
            used = -(-keys // tile_kv)
            counts["skipped"] += blocks - used
            full = sum(bool(a[:, k0: k0 + tile_kv].all()) and r1 - r0 == tq and k0 + tile_kv <= keys
                       for k0 in range(0, keys, tile_kv))
            counts["full"] += full
            counts["masked"] += used - full
            tiles.append((keys, base, r, r0, r1, a[:, :keys]))
    tiles.sort(key=lambda x: -x[0])
    groups, current = [], []
    for tile in tiles:  # a group pads to its longest tile: start a new one past one key block of padding
        if current and -(-current[0][0] // tile_kv) != -(-tile[0] // tile_kv):
            groups.append(current)
            current = []
        current.append(tile)
    if current:
        groups.append(current)
    return [_long_group(grp, tq) for grp in groups]


def _long_group(tiles, tq) -> LongGroup:
    B, Lg = len(tiles), tiles[0][0]
    q_tokens = torch.zeros(B, tq, dtype=torch.long)
    key_slots = torch.zeros(B, Lg, dtype=torch.long)
    mask = torch.zeros(B, 1, tq, Lg, dtype=torch.bool)
    mask[:, :, :, 0] = True  # padding rows read one key: finite, discarded
    out_tokens, out_from = [], []
    for i, (keys, base, r, r0, r1, a) in enumerate(tiles):
        n = r1 - r0
        q_tokens[i, :n] = base + torch.arange(r0, r1)
        key_slots[i, :keys] = r.key_slots[:keys]
        mask[i, 0, :n] = False
        mask[i, 0, :n, :keys] = a
        out_tokens.append(q_tokens[i, :n])
        out_from.append(i * tq + torch.arange(n))
    return LongGroup(q_tokens, key_slots, mask, torch.cat(out_tokens), torch.cat(out_from))


def run_meta_attention_torch(plan: MetaAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against head-major caches ``[kv_heads, slots, d]`` -> ``[T, H, d]``."""
    T, H, d = q.shape
    out = torch.empty_like(q)
    if plan.short is not None:
        _run_short(plan, plan.short, q, k_cache, v_cache, scale, out)
    for grp in plan.long:
        _run_long(plan, grp, q, k_cache, v_cache, scale, out)
    return out


def _run_short(plan, st: ShortTiles, q, k_cache, v_cache, scale, out) -> None:
    T, H, d = q.shape
    qt = q.reshape(T * H, d)[st.q_index]  # [N, tq, d]
    kt = k_cache.reshape(-1, d)[st.kv_index]  # [N, tkv, d]
    vt = v_cache.reshape(-1, d)[st.kv_index]
    # GEMMs in the input dtype (bf16 runs them ~2x faster on CPU), softmax statistics in float32
    s = torch.baddbmm(st.bias_as(q.dtype), qt, kt.transpose(1, 2), alpha=scale).float()
    if not st.split:  # one tile per segment: a plain softmax, no merge
        o = torch.bmm(torch.softmax(s, -1).to(q.dtype), vt)
        rows = o.reshape(-1, d)
    else:
        m = s.amax(-1)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m[..., None])
        o = torch.bmm(p.to(q.dtype), vt).float()  # unnormalised
        big = torch.full((st.num_segments, plan.tile_q), float("-inf"))
        big = big.scatter_reduce(0, st.segment[:, None].expand_as(m), m, "amax")
        w = torch.exp(m - big[st.segment])
        num = torch.zeros(st.num_segments, plan.tile_q, d).index_add_(0, st.segment, o * w[..., None])
        den = torch.zeros(st.num_segments, plan.tile_q).index_add_(0, st.segment, p.sum(-1) * w)
        rows = (num / den[..., None]).reshape(-1, d)
    out.view(T * H, d)[st.out_index] = rows[st.out_from].to(q.dtype)


def _run_long(plan, grp: LongGroup, q, k_cache, v_cache, scale, out) -> None:
    B, tq = grp.q_tokens.shape
    qg = q[grp.q_tokens].transpose(1, 2)  # [B, H, tq, d]
    kg = k_cache[:, grp.key_slots].transpose(0, 1)  # [B, kvh, Lg, d]
    vg = v_cache[:, grp.key_slots].transpose(0, 1)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=grp.mask, scale=scale,
                                       enable_gqa=plan.num_heads != plan.num_kv_heads)
    out[grp.out_tokens] = o.transpose(1, 2).reshape(B * tq, *out.shape[1:])[grp.out_from]
