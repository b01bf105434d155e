"""The short class (decode, short verify): GQA-packed ``tile_q x tile_kv`` tiles, split-KV, and a decode
step's plan advanced from the previous step's."""

from __future__ import annotations

import numpy as np
import torch

from .tiles import CAUSAL, TREE, DecodeTiles, MetaAttentionPlan, ShortTiles


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
        bias, full = _multi_token_bias(reqs, req, chunk, L, ctx, R, real_row, g, tile_kv, tile_q)
    counts["full"] += int(full[head == 0].sum())
    counts["masked"] += int((~full[head == 0]).sum())
    num_segments = n * kvh
    out_index, src, split = _output_rows(n, kvh, R, base, g, H, tile_q, segment)
    t = torch.from_numpy
    return ShortTiles(
        q_index=t(q_index), kv_index=t(kv_index), bias=bias, segment=t(segment), num_segments=num_segments,
        key_len=t(key_len), out_index=t(out_index), out_from=t(src), split=split, page=page, decode=decode,
    )


def _multi_token_bias(reqs, req, chunk, L, ctx, R, real_row, g, tile_kv, tile_q):
    """Bias ``[N, tile_q, tile_kv]`` (0 / -inf) of tiles whose rows see different keys (causal chunks, verify
    trees), and which tiles are full (every real row sees every key)."""
    rows = np.arange(tile_q)
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
    return torch.from_numpy(np.where(allowed, np.float32(0), np.float32(-np.inf))), full


def _output_rows(n, kvh, R, base, g, H, tile_q, segment):
    """Where each real packed row is written (``out_index``), which tile row it comes from (``out_from``),
    and whether some segment spans several tiles (then rows come from the merged segments)."""
    rows = np.arange(tile_q)
    num_segments = n * kvh
    seg_req = np.repeat(np.arange(n), kvh)
    seg_head = np.tile(np.arange(kvh), n)
    seg_rows = rows[None, :] < R[seg_req][:, None]
    out_index = ((base[seg_req][:, None] + rows // g) * H + seg_head[:, None] * g + rows % g)[seg_rows]
    src = (np.arange(num_segments)[:, None] * tile_q + rows[None, :])[seg_rows]
    split = len(segment) > num_segments
    if not split:  # one tile per segment: rows are read straight from the (reordered) tiles
        tile_of = np.empty(num_segments, dtype=np.int64)
        tile_of[segment] = np.arange(len(segment))
        src = tile_of[src // tile_q] * tile_q + src % tile_q
    return out_index, src, split


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
