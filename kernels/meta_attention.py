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
  ``skipped``, never computed), grouped by key length so one batched
  attention call runs a whole group.

Short multi-token requests (verify trees, tiny chunks) form a short class
of their own, so decodes keep tiles of ``group`` rows. Long groups are cut
by a small dynamic program that weighs padding against a group's fixed cost.
When every request's keys sit in aligned pages of the paged cache, K/V are
gathered a page at a time.

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
# Two machine constants steer the plan. Both are measured by the profiler (xytune/calibrate.py) and reach the
# plan from the cost table; these defaults only serve a table that lacks them.
# - group_cost_scores: the fixed cost of one more long group (its torch calls) in units of padded (row, key)
#   scores; 11,000 on a 2-core AVX-512 VM (~0.09 ms a group, ~8 ns a score with 9 heads of 64 dims).
# - float32_short_tiles: up to this many short tiles run their GEMMs in float32 on CPU when the input is bf16
#   (oneDNN's bf16 batched GEMM has a fixed cost per call that float32 lacks on some CPUs); 0 = never.
DEFAULT_GROUP_COST_SCORES = 11_000
DEFAULT_FLOAT32_SHORT_TILES = 0


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
    page: int = 1  # kv_index counts pages of this many slots (rows of cache.view(kvh*S/page, page*d))
    decode: "DecodeTiles | None" = None  # decode-only tiles: what the next decode step needs to advance them
    _bias_cache: dict = field(default_factory=dict)

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias_cache:
            self._bias_cache[dtype] = self.bias.to(dtype)
        return self._bias_cache[dtype]


@dataclass
class DecodeTiles:
    """Where each decode request's newest key sits in a decode-only ``ShortTiles``, so that the next decode
    step (the same requests, one key longer each) updates the tiles instead of planning them again."""

    num_keys: np.ndarray  # [n] keys per request
    last_tile: np.ndarray  # [n, kvh] tile holding each request's last key chunk, per KV head
    last_chunk_start: np.ndarray  # [n] key position where that chunk starts
    pages_per_head: int  # kv_index = head * pages_per_head + page


@dataclass(frozen=True)
class PackedIndex:
    """A long group's gathers in GQA-packed (KV head, tile, row) order, so no permute copies are needed."""

    q: torch.Tensor  # [kvh, B, tq] rows of q.view(T*kvh, g*d)
    kv: torch.Tensor  # [kvh, B, Lg/page] rows of cache.view(kvh*S/page, page*d)
    out_dst: torch.Tensor  # [kvh*R] rows of out.view(T*kvh, g*d) written
    out_src: torch.Tensor  # [kvh*R] rows of the packed output they come from


@dataclass
class LongGroup:
    """Long-class query tiles of similar key length, run as one fused attention call."""

    q_tokens: torch.Tensor  # [B, tq] token rows of q (0 for padding)
    key_slots: torch.Tensor  # [B, Lg] cache slots (0 for padding); Lg is a multiple of page
    mask: torch.Tensor  # [B, 1, tq, Lg] bool: may the row read the key
    out_tokens: torch.Tensor  # [R] token rows written
    out_from: torch.Tensor  # [R] (tile * tq + row) each comes from
    page: int = 1  # key_slots run in aligned pages of this many slots: gathers move whole pages
    _bias_cache: dict = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a 0/-inf bias ``[1, B, tq, 1, Lg]`` that broadcasts over KV heads and packed query heads
        (9x smaller than a bias per packed row, so it stays in cache), made once per plan."""
        if dtype not in self._bias_cache:
            self._bias_cache[dtype] = torch.zeros(self.mask.shape, dtype=dtype).masked_fill_(
                ~self.mask, float("-inf")).permute(1, 0, 2, 3)[:, :, :, None, :]
        return self._bias_cache[dtype]

    def packed_index(self, kvh: int, cache_slots: int) -> PackedIndex:
        key = ("index", kvh, cache_slots)
        if key not in self._bias_cache:
            B, tq = self.q_tokens.shape
            h = torch.arange(kvh)
            pages = self.key_slots[:, :: self.page] // self.page
            self._bias_cache[key] = PackedIndex(
                q=self.q_tokens[None] * kvh + h[:, None, None],
                kv=pages[None] + h[:, None, None] * (cache_slots // self.page),
                out_dst=(self.out_tokens[None] * kvh + h[:, None]).reshape(-1),
                out_src=(self.out_from[None] + h[:, None] * B * tq).reshape(-1))
        return self._bias_cache[key]


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
    sdpa_min_keys: int = 512  # long groups with more keys run torch's fused SDPA, shorter ones batched GEMMs
    short_requests: list = field(default_factory=list)  # (first token, AttnRequest) of the short class
    # short multi-token requests (verify trees, tiny chunks) in tiles of their own: sharing the decodes' tiles
    # would pad every decode's g rows up to the longest verify's rows
    short_multi: ShortTiles | None = None
    float32_short_tiles: int = DEFAULT_FLOAT32_SHORT_TILES  # see the module's constants


def plan_meta_attention(requests: list[AttnRequest], num_heads: int, num_kv_heads: int, cache_slots: int,
                        tile_q: int = 16, tile_kv: int = 256, prefill_tile: int = 64,
                        sdpa_min_keys: int = 512, page_size: int = 16,
                        pages_aligned: bool | None = None, group_cost_scores: float = DEFAULT_GROUP_COST_SCORES,
                        float32_short_tiles: int = DEFAULT_FLOAT32_SHORT_TILES) -> MetaAttentionPlan:
    """Cut a batch into classified, GQA-packed, longest-first tiles (host side, no per-tile tensors).

    ``page_size``: the paged cache's block size. When every request's keys sit in whole aligned pages (as the
    engine's block tables put them), K/V are gathered a page at a time, which moves the same bytes in 16x
    fewer rows; otherwise a slot at a time. ``pages_aligned``: the caller vouches for that layout (slots made
    from block tables), which saves checking every slot; None: check. ``group_cost_scores`` and
    ``float32_short_tiles``: this machine's constants, from the cost table (see the module's constants).
    """
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if not requests or not any(r.q_len for r in requests):
        raise ValueError("the batch has no query rows")
    if min(tile_q, tile_kv, prefill_tile) < 1:
        raise ValueError("tile sizes must be positive")
    g = num_heads // num_kv_heads
    aligned = pages_aligned if pages_aligned is not None else _paged(requests, page_size)
    page = page_size if page_size > 1 and cache_slots % page_size == 0 and aligned else 1
    counts = {"full": 0, "masked": 0, "skipped": 0}
    short, long, base = [], [], 0
    for r in requests:
        (short if r.q_len * g <= tile_q else long).append((base, r))
        base += r.q_len
    decode = [(b, r) for b, r in short if r.q_len == 1]
    multi = [(b, r) for b, r in short if r.q_len > 1]
    return MetaAttentionPlan(tile_q, tile_kv, prefill_tile, num_heads, num_kv_heads,
                             _plan_short(decode, num_heads, num_kv_heads, cache_slots, tile_q, tile_kv, counts, page),
                             _plan_long(long, num_kv_heads, tile_kv, prefill_tile, counts, page, group_cost_scores),
                             counts, sdpa_min_keys, short,
                             _plan_short(multi, num_heads, num_kv_heads, cache_slots, tile_q, tile_kv, counts, page),
                             float32_short_tiles)


def _paged(requests: list[AttnRequest], page: int) -> bool:
    """Does every request's key ``i`` sit at offset ``i % page`` of one page per ``page`` keys."""
    slots = np.concatenate([r.key_slots.numpy() for r in requests])
    lens = np.array([r.num_keys for r in requests])
    pos = np.arange(len(slots)) - np.repeat(np.cumsum(lens) - lens, lens)
    within = pos % page
    return bool((slots % page == within).all() and (slots - within == slots[np.arange(len(slots)) - within]).all())


def _plan_short(items, H, kvh, cache_slots, tile_q, tile_kv, counts, page=1) -> ShortTiles | None:
    """Vectorised over tiles: one numpy pass builds every index, bias and merge key."""
    if not items:
        return None
    g = H // kvh
    reqs = [r for _, r in items]
    n = len(reqs)
    # short contexts need no tile as long as the profiled one: shrink it to the longest key range (16-aligned)
    tile_kv = min(tile_kv, -(-max(r.num_keys for r in reqs) // 16) * 16)
    if tile_kv % page:
        page = 1
    tile_q = min(tile_q, max(r.q_len for r in reqs) * g)  # and the rows to the most any request packs
    base = np.array([b for b, _ in items])
    qlen = np.array([r.q_len for r in reqs])
    ctx = np.array([r.context_len for r in reqs])
    L = ctx + qlen
    R = qlen * g  # packed rows per (request, KV head)
    slots = np.concatenate([r.key_slots.numpy() for r in reqs])
    offset = np.concatenate([[0], np.cumsum(L)[:-1]])
    chunks = -(-L // tile_kv)
    # tiles, request-major then KV head then key chunk; segment = (request, KV head)
    per_req = kvh * chunks
    req = np.repeat(np.arange(n), per_req)
    local = np.arange(len(req)) - np.repeat(np.cumsum(per_req) - per_req, per_req)
    head = local // chunks[req]
    chunk = local % chunks[req]
    key_len = np.minimum(tile_kv, L[req] - chunk * tile_kv)  # real keys per tile
    # longest first; every per-tile array below is built in this order (reordering them after costs copies)
    order = np.argsort(-key_len, kind="stable")
    req, head, chunk, key_len = req[order], head[order], chunk[order], key_len[order]
    segment = req * kvh + head
    pos_page = chunk[:, None] * tile_kv + np.arange(0, tile_kv, page)[None, :]  # first key of every page
    kv_index = (head[:, None] * (cache_slots // page)  # padding pages: the request's last
                + slots[offset[req][:, None] + np.minimum(pos_page, L[req][:, None] - 1)] // page)
    rows = np.arange(tile_q)
    real_row = rows[None, :] < R[req][:, None]
    q_index = np.where(real_row, (base[req][:, None] + rows // g) * H + head[:, None] * g + rows % g, 0)
    decode = None
    if (qlen == 1).all():  # decode only: the mask does not depend on the row, only on the tile's key count
        full = key_len == tile_kv
        padding = torch.arange(tile_kv)[None, None, :] >= torch.from_numpy(key_len)[:, None, None]
        bias = torch.zeros(len(req), 1, tile_kv).masked_fill_(padding, float("-inf"))
        tile_at = np.empty(len(order), dtype=np.int64)
        tile_at[order] = np.arange(len(order))  # unsorted tile number -> its place in longest-first order
        first = np.cumsum(per_req) - per_req
        last = first[:, None] + np.arange(kvh)[None, :] * chunks[:, None] + chunks[:, None] - 1
        decode = DecodeTiles(L.copy(), tile_at[last], (chunks - 1) * tile_kv, cache_slots // page)
    else:
        pos = chunk[:, None] * tile_kv + np.arange(tile_kv)[None, :]  # key position within the request
        valid = pos < L[req][:, None]
        token = rows // g
        allowed = valid[:, None, :] & real_row[:, :, None]
        causal = np.array([r.mask == CAUSAL for r in reqs])[req]
        allowed &= ~causal[:, None, None] | (pos[:, None, :] <= (ctx[req][:, None] + token[None, :])[:, :, None])
        for i in np.flatnonzero(np.array([r.mask == TREE for r in reqs])[req]):  # few verify tiles: exact mask
            a = reqs[req[i]].allowed().repeat_interleave(g, dim=0).numpy()
            p = pos[i][valid[i]]
            allowed[i, : R[req[i]], : len(p)] = a[:, p]
        full = allowed.reshape(len(req), -1).all(1) | False
        full &= (R[req] == tile_q)
        allowed = allowed | (~real_row[:, :, None] & (np.arange(tile_kv) == 0)[None, None, :])  # padding rows: key 0
        bias = torch.from_numpy(np.where(allowed, np.float32(0), np.float32(-np.inf)))
    counts["full"] += int(full[head == 0].sum())
    counts["masked"] += int((~full[head == 0]).sum())
    num_segments = n * kvh
    seg_req = np.repeat(np.arange(n), kvh)
    seg_head = np.tile(np.arange(kvh), n)
    seg_rows = rows[None, :] < R[seg_req][:, None]
    out_index = ((base[seg_req][:, None] + rows // g) * H + seg_head[:, None] * g + rows % g)[seg_rows]
    src = (np.arange(num_segments)[:, None] * tile_q + rows[None, :])[seg_rows]
    split = len(req) > num_segments
    if not split:  # one tile per segment: rows are read straight from the (reordered) tiles
        tile_of = np.empty(num_segments, dtype=np.int64)
        tile_of[segment] = np.arange(len(segment))
        src = tile_of[src // tile_q] * tile_q + src % tile_q
    t = torch.from_numpy
    return ShortTiles(
        q_index=t(q_index), kv_index=t(kv_index), bias=bias, segment=t(segment), num_segments=num_segments,
        key_len=t(key_len), out_index=t(out_index), out_from=t(src), split=split, page=page, decode=decode,
    )


def advance_decode_plan(plan: MetaAttentionPlan, num_keys: np.ndarray, new_slots: np.ndarray) -> bool:
    """Update a decode-only plan in place for the next decode step of the same requests, in the same order.

    ``num_keys``: each request's keys now; ``new_slots``: the cache slot of each request's newest key. Each
    request gained one key: its last tile gets one more real key, and a key that opens a new page adds that
    page to the tile's gather index. A few small writes instead of a plan over every key of the batch.
    Returns False (plan unchanged) when this is not such a step or a request's new key needs a new tile
    (or a longer one): plan afresh then.
    """
    st = plan.short
    if plan.long or plan.short_multi is not None or st is None or st.decode is None:
        return False
    dec, tile_kv, page = st.decode, st.bias.shape[-1], st.page
    if num_keys.shape != dec.num_keys.shape or not (num_keys == dec.num_keys + 1).all():
        return False
    pos = dec.num_keys - dec.last_chunk_start  # the new key's position within its request's last tile
    if (pos >= tile_kv).any():
        return False
    page_at = pos // page
    opens = pos % page == 0
    head0 = st.kv_index[torch.from_numpy(dec.last_tile[:, 0]), torch.from_numpy(page_at)].numpy()
    if not (opens | (head0 == new_slots // page)).all():
        return False  # a key off its request's current page: not the step this plan was made for
    heads = np.arange(dec.last_tile.shape[1])[None, :] * dec.pages_per_head
    rows, cols = torch.from_numpy(dec.last_tile[opens]), torch.from_numpy(page_at[opens])[:, None]
    st.kv_index[rows, cols] = torch.from_numpy(heads + (new_slots[opens] // page)[:, None])
    tiles, keys = torch.from_numpy(dec.last_tile), torch.from_numpy(pos)[:, None].expand(dec.last_tile.shape)
    for bias in (st.bias, *(b for b in st._bias_cache.values())):
        bias[tiles, 0, keys] = 0.0
    st.key_len[tiles] += 1
    filled = int((pos + 1 == tile_kv).sum())
    plan.counts["full"] += filled
    plan.counts["masked"] -= filled
    dec.num_keys = num_keys.copy()
    return True


def _plan_long(items, kvh, tile_kv, tq, counts, page=1,
               group_cost_scores: float = DEFAULT_GROUP_COST_SCORES) -> list[LongGroup]:
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
    groups = _group_by_padded_cost([(keys, r1 - r0) for keys, _, _, r0, r1, _ in tiles], group_cost_scores)
    return [_long_group(tiles[i:j], tq, page) for i, j in groups]


def _group_by_padded_cost(tiles: list[tuple[int, int]],
                          group_cost_scores: float = DEFAULT_GROUP_COST_SCORES) -> list[tuple[int, int]]:
    """Cut (keys, rows) tiles, sorted by keys descending, into groups ``[i, j)`` at the least predicted cost.

    A group runs padded to its first tile's keys and its most rows; each group also costs a fixed
    ``group_cost_scores``. An exact dynamic program over the cut points (a step has tens of tiles).
    """
    n = len(tiles)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # group [i, j): padded to tiles[i]'s keys
            rows = max(rows, tiles[i][1])
            cost = best[i] + group_cost_scores + (j - i) * rows * tiles[i][0]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


def _long_group(tiles, tq, page=1) -> LongGroup:
    tq = min(tq, -(-max(r1 - r0 for *_, r0, r1, _ in tiles) // 8) * 8)  # rows: as many as the group's longest tile
    B, Lg = len(tiles), -(-tiles[0][0] // page) * page  # keys: whole pages
    q_tokens = torch.zeros(B, tq, dtype=torch.long)
    key_slots = torch.zeros(B, Lg, dtype=torch.long)
    mask = torch.zeros(B, 1, tq, Lg, dtype=torch.bool)
    mask[:, :, :, 0] = True  # padding rows read one key: finite, discarded
    out_tokens, out_from = [], []
    for i, (keys, base, r, r0, r1, a) in enumerate(tiles):
        n = r1 - r0
        q_tokens[i, :n] = base + torch.arange(r0, r1)
        key_slots[i, :keys] = r.key_slots[:keys]
        if page > 1:  # the rest of the last page (masked): its slots, so the page gather reads that page
            key_slots[i, keys: -(-keys // page) * page] = r.key_slots[keys - 1] + torch.arange(1, -keys % page + 1)
        mask[i, 0, :n] = False
        mask[i, 0, :n, :keys] = a
        out_tokens.append(q_tokens[i, :n])
        out_from.append(i * tq + torch.arange(n))
    return LongGroup(q_tokens, key_slots, mask, torch.cat(out_tokens), torch.cat(out_from), page)


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
