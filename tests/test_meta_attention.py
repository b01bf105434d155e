"""Meta-Attention (torch backend) against a float64 reference on random mixed batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xytune.kernels.meta_attention import (
    CAUSAL,
    NO_MASK,
    TREE,
    AttnRequest,
    plan_meta_attention,
    run_meta_attention_torch,
)


def reference_mask(r: AttnRequest) -> torch.Tensor:
    """Which keys each new token may read, written from the definitions alone (not with ``allowed()``, the
    code under test): key ``j`` sits at position ``j``; query ``i`` sits at ``context_len + i``."""
    mask = torch.zeros(r.q_len, r.num_keys, dtype=torch.bool)
    for i in range(r.q_len):
        for j in range(r.num_keys):
            if r.mask == NO_MASK or j < r.context_len:
                mask[i, j] = True
            elif r.mask == CAUSAL:
                mask[i, j] = j <= r.context_len + i
            else:  # a tree: itself and its ancestors among the new tokens
                node, new = i, j - r.context_len
                while node >= 0 and node != new:
                    node = r.parents[node]
                mask[i, j] = node == new
    return mask


def reference(requests, q, k_cache, v_cache, scale):
    """Per request, per head, in float64 with an independently built mask."""
    H, kvh = q.shape[1], k_cache.shape[0]
    g = H // kvh
    out, base = torch.empty_like(q, dtype=torch.float64), 0
    for r in requests:
        allowed = reference_mask(r)
        for h in range(H):
            k = k_cache[h // g, r.key_slots].double()
            v = v_cache[h // g, r.key_slots].double()
            s = q[base: base + r.q_len, h].double() @ k.T * scale
            s = s.masked_fill(~allowed, float("-inf"))
            out[base: base + r.q_len, h] = s.softmax(-1) @ v
        base += r.q_len
    return out


def random_batch(kinds, num_heads, num_kv_heads, head_dim, seed, slots=4096, page=None):
    """K/V scattered slot by slot, or (``page``) in whole pages of a paged cache, as the engine's block tables."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(slots, generator=gen)
    pages = torch.randperm(slots // page, generator=gen) if page else None
    used, requests = 0, []
    for kind, q_len, ctx in kinds:
        L = ctx + q_len
        if page:
            n = -(-L // page)
            key_slots = (pages[used: used + n, None] * page + torch.arange(page)).reshape(-1)[:L]
            used += n
        else:
            key_slots = perm[used: used + L]
            used += L
        if kind == TREE:
            parents = tuple(int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(q_len))
            requests.append(AttnRequest(q_len, ctx, key_slots, TREE, parents))
        else:
            requests.append(AttnRequest(q_len, ctx, key_slots, kind))
    T = sum(r.q_len for r in requests)
    q = torch.randn(T, num_heads, head_dim, generator=gen)
    k = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    v = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    return requests, q, k, v


MIXED = [
    (CAUSAL, 37, 0),  # prefill
    (CAUSAL, 20, 45),  # prefill with a cached prefix / a later chunk
    (CAUSAL, 1, 130),  # decode
    (CAUSAL, 1, 7),
    (TREE, 5, 60),  # tree verify
    (CAUSAL, 4, 33),  # chain verify
    (NO_MASK, 6, 10),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (32, 4, 128), (16, 2, 128)])
@pytest.mark.parametrize("tiles", [(16, 32, 16), (64, 128, 64), (8, 16, 8)])  # tile_q, tile_kv, prefill_tile
@pytest.mark.parametrize("page", [None, 16])
def test_mixed_batch_matches_float64(heads, kv_heads, head_dim, tiles, page):
    requests, q, k, v = random_batch(MIXED, heads, kv_heads, head_dim, seed=heads + tiles[0], page=page)
    plan = plan_meta_attention(requests, heads, kv_heads, k.shape[1], *tiles)
    # whole pages are gathered when the keys sit in pages and the key tile holds whole pages
    assert plan.short.page == (16 if page and tiles[1] % 16 == 0 else 1)
    assert all(g.page == (page or 1) for g in plan.long)
    out = run_meta_attention_torch(plan, q, k, v, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, head_dim ** -0.5), rtol=1e-4, atol=1e-4)
    assert plan.counts["masked"] > 0
    if tiles[2] <= 16:  # small tiles cut the 37-token prefill's causal corner off
        assert plan.counts["skipped"] > 0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 6e-3)])
@pytest.mark.parametrize("tile_kv", [32, 512])  # split key ranges (merged by segment) and whole ones
@pytest.mark.parametrize("small_tiles", [0, 10_000])  # short tiles' GEMMs in the input dtype, or in float32
def test_reduced_precision_stays_close_to_float64(dtype, tol, tile_kv, small_tiles):
    """GEMMs in the input dtype (or float32 for a few short tiles), softmax statistics in float32: within a
    few ulps of the dtype."""
    requests, q, k, v = random_batch(MIXED, 9, 3, 64, seed=7, page=16)
    plan = plan_meta_attention(requests, 9, 3, k.shape[1], tile_q=8, tile_kv=tile_kv, float32_short_tiles=small_tiles)
    assert plan.short.split == (tile_kv == 32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = run_meta_attention_torch(plan, q, k, v, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, 0.125), rtol=0, atol=tol)


def test_decode_heads_are_packed_into_one_tile():
    requests, q, k, v = random_batch([(CAUSAL, 1, 40)] * 6, 32, 4, 64, seed=1)
    plan = plan_meta_attention(requests, 32, 4, k.shape[1], tile_q=16, tile_kv=64)
    # 6 requests x 4 KV heads, 8 packed query heads each in one row block, one key block each
    assert not plan.long and plan.short.num_segments == 24 and plan.short.q_index.shape[0] == 24
    assert plan.short.bias.shape[1] == 1, "decode-only tiles need no per-row mask"
    out = run_meta_attention_torch(plan, q, k, v, 0.125)
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, 0.125), rtol=1e-4, atol=1e-4)


def test_long_contexts_split_into_key_tiles_longest_first():
    requests, q, k, v = random_batch([(CAUSAL, 1, 300), (CAUSAL, 1, 20), (CAUSAL, 1, 129)], 4, 4, 64, seed=3)
    plan = plan_meta_attention(requests, 4, 4, k.shape[1], tile_q=4, tile_kv=128)
    lengths = plan.short.key_len.tolist()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 128 and lengths[-1] == 2
    assert plan.short.split and plan.short.num_segments == 3 * 4
    assert plan.counts["full"] == 3 and plan.counts["masked"] == 3  # per KV head: 301 -> 2 full + 1, 21, 130 -> 1 + 1
    out = run_meta_attention_torch(plan, q, k, v, 0.125)
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, 0.125), rtol=1e-4, atol=1e-4)


def test_prefill_tiles_skip_the_causal_corner_and_group_by_key_length():
    requests, q, k, v = random_batch([(CAUSAL, 256, 0), (CAUSAL, 100, 28)], 4, 4, 64, seed=2)
    plan = plan_meta_attention(requests, 4, 4, k.shape[1], tile_q=16, tile_kv=64, prefill_tile=64)
    assert plan.short is None
    # 256-token prefill: q tiles read 64/128/192/256 keys, skipping 3+2+1 key blocks; the 100-token chunk after
    # 28 cached keys: q tiles read 92 and 128 keys, both touching 2 key blocks, so nothing skipped
    assert plan.counts["skipped"] == 6
    key_lens = [g.key_slots.shape[1] for g in plan.long]
    # tiles by keys: 256, 192 | 128, 128, 92, 64; padding 64 or 36 keys of 64 rows costs less than another group
    assert key_lens == [256, 128] and [g.q_tokens.shape[0] for g in plan.long] == [2, 4]
    out = run_meta_attention_torch(plan, q, k, v, 0.125)
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, 0.125), rtol=1e-4, atol=1e-4)


def test_pages_are_used_only_when_every_request_is_page_aligned():
    requests, q, k, v = random_batch([(CAUSAL, 1, 40), (CAUSAL, 30, 0)], 4, 2, 64, seed=5, page=16)
    assert plan_meta_attention(requests, 4, 2, k.shape[1], tile_kv=64).short.page == 16
    shifted = AttnRequest(1, 40, requests[0].key_slots + 1)  # key 0 at offset 1 of its page
    plan = plan_meta_attention([shifted, requests[1]], 4, 2, k.shape[1], tile_kv=64)
    assert plan.short.page == 1 and plan.long[0].page == 1
    out = run_meta_attention_torch(plan, q, k, v, 0.125)
    torch.testing.assert_close(out.double(), reference([shifted, requests[1]], q, k, v, 0.125), rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 600), st.integers(1, 64)), min_size=1, max_size=7),
       st.sampled_from([0, 1_000, 11_000, 200_000]))
def test_long_groups_are_the_cheapest_cut(tiles, group_cost):
    """The dynamic program against every way of cutting the sorted tiles into consecutive groups, for a
    range of measured group costs (the table's ``group_cost_scores``)."""
    import itertools

    from xytune.kernels.meta_attention.long import _group_by_padded_cost

    tiles = sorted(tiles, key=lambda t: -t[0])

    def cost(groups):
        return sum(group_cost + (j - i) * max(r for _, r in tiles[i:j]) * tiles[i][0] for i, j in groups)

    n = len(tiles)
    best = min(cost(list(zip((0, *cuts), (*cuts, n))))
               for k in range(n) for cuts in itertools.combinations(range(1, n), k))
    groups = _group_by_padded_cost(tiles, group_cost)
    assert groups[0][0] == 0 and groups[-1][1] == n and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert cost(groups) == best


def test_bad_tree_is_rejected():
    with pytest.raises(ValueError, match="parents"):
        AttnRequest(3, 4, torch.arange(7), TREE, (-1, 2, 0)).allowed()


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(st.tuples(st.sampled_from([CAUSAL, TREE, NO_MASK]), st.integers(1, 40), st.integers(0, 90)),
                   min_size=1, max_size=6),
    ratio=st.sampled_from([1, 3, 8]),
    head_dim=st.sampled_from([64, 128]),
    tile_q=st.sampled_from([8, 16, 64]),
    tile_kv=st.sampled_from([16, 64]),
    prefill_tile=st.sampled_from([4, 16, 64]),
    page=st.sampled_from([None, 8, 16]),
    seed=st.integers(0, 1000),
)
def test_property_random_batches(batch, ratio, head_dim, tile_q, tile_kv, prefill_tile, page, seed):
    kv_heads = 2
    requests, q, k, v = random_batch(batch, kv_heads * ratio, kv_heads, head_dim, seed, page=page)
    plan = plan_meta_attention(requests, kv_heads * ratio, kv_heads, k.shape[1], tile_q, tile_kv, prefill_tile,
                               page_size=page or 16)
    out = run_meta_attention_torch(plan, q, k, v, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), reference(requests, q, k, v, head_dim ** -0.5), rtol=1e-4, atol=1e-4)
