"""The long class (prefill chunks): query tiles that read only the keys up to their last row, grouped by key
length at the least padded cost."""

from __future__ import annotations

import torch

from .tiles import DEFAULT_GROUP_COST_SCORES, LongGroup


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
