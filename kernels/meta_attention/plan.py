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

import numpy as np

from .long import _plan_long
from .short import _plan_short
from .tiles import DEFAULT_FLOAT32_SHORT_TILES, DEFAULT_GROUP_COST_SCORES, AttnRequest, MetaAttentionPlan


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
