"""The step's attention description built from block tables, checked against the slot formula."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_cost_model, synthetic_rows

from xytune.kernels.meta_attention import TREE, plan_meta_attention, run_meta_attention_torch
from xytune.profiler.geometry import PRESETS
from xytune.profiler.table import canonical_json
from xytune.runtime.model.attention import (
    AttentionBatch,
    AttentionPaths,
    make_attention,
    make_meta_attention,
    reference_attention,
)


def _chunks(seed: int, block_size: int = 16):
    """Decodes, prefill chunks (fresh and after a cached prefix) and a verify tree over random block tables."""
    g = np.random.default_rng(seed)
    free = list(g.permutation(400))
    chunks = []
    for before, n, tree in [(130, 1, None), (0, 37, None), (7, 1, None), (45, 20, None), (60, 3, [-1, 0, 0]),
                            (15, 1, None), (16, 1, None)]:
        table = [int(free.pop()) for _ in range(-(-(before + n) // block_size))]
        chunks.append((table, before, n, tree) if tree else (table, before, n))
    return chunks


def _slots(table, count, block_size=16):
    return [table[i // block_size] * block_size + i % block_size for i in range(count)]


def test_build_gives_every_request_its_block_table_slots():
    chunks = _chunks(0)
    batch = AttentionBatch.build(16, chunks)
    expected_new = []
    for (table, before, n, *tree), req in zip(chunks, batch.requests):
        assert req.key_slots.tolist() == _slots(table, before + n)
        assert (req.q_len, req.context_len) == (n, before)
        assert req.mask == (TREE if tree else "causal")
        expected_new += _slots(table, before + n)[before:]
    assert batch.slot_mapping.tolist() == expected_new
    lens = [before + 1 for _, before, n, *_ in chunks if n == 1]
    assert batch.decode_rows.tolist() == [0, 38, 62, 63]
    assert batch.decode_slots.shape == (4, max(lens))
    for i, (table, before, n, *_) in enumerate(c for c in chunks if c[2] == 1):
        assert batch.decode_slots[i, : before + 1].tolist() == _slots(table, before + 1)
        bias = batch.decode_bias[i, 0]
        assert (bias[: before + 1] == 0).all() and torch.isinf(bias[before + 1:]).all()
    assert [(p.token_start, p.num_tokens, p.context_before) for p in batch.prefills] == [(1, 37, 0), (39, 20, 45),
                                                                                          (59, 3, 60)]
    assert batch.prefills[2].parents == [-1, 0, 0]
    assert batch.pages_aligned


def test_a_batch_without_decodes_pads_nothing():
    batch = AttentionBatch.build(16, [([3, 9], 0, 20)])
    assert batch.decode_slots.shape == (0, 0) and batch.decode_bias.shape == (0, 1, 0)
    assert batch.slot_mapping.tolist() == _slots([3, 9], 20)


def test_meta_attention_and_the_reference_agree_on_a_built_batch():
    """The vouched-for page layout plans the same attention as the checked one, and both match the reference."""
    chunks = _chunks(1)
    batch = AttentionBatch.build(16, chunks)
    gen = torch.Generator().manual_seed(0)
    T = sum(c[2] for c in chunks)
    q = torch.randn(T, 9, 64, generator=gen)
    k, v = torch.randn(3, 400 * 16, 64, generator=gen), torch.randn(3, 400 * 16, 64, generator=gen)
    vouched = plan_meta_attention(batch.requests, 9, 3, k.shape[1], 8, 64, 16, pages_aligned=True)
    checked = plan_meta_attention(batch.requests, 9, 3, k.shape[1], 8, 64, 16)
    assert vouched.short.page == checked.short.page == 16
    out = run_meta_attention_torch(vouched, q, k, v, 0.125)
    # the two plans gather keys into different layouts, so the GEMMs may sum in another order (6e-5 seen once)
    torch.testing.assert_close(out, run_meta_attention_torch(checked, q, k, v, 0.125), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, reference_attention(q, k, v, batch, 0.125), rtol=1e-4, atol=1e-4)


def test_decode_steps_advance_the_previous_plan_and_attend_as_a_fresh_plan_does():
    """Consecutive decode steps of the same requests reuse one plan (updated in place), across new pages; a new
    key tile, another set of requests or no request ids plan afresh. Every step equals a fresh plan's output."""
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(3, 120 * 16, 32, generator=gen), torch.randn(3, 120 * 16, 32, generator=gen)
    tables = [list(range(b, b + 20)) for b in (100, 0, 60, 20, 40)]  # 20 pages each, out of order in the pool
    tables[1].reverse()
    start = [13, 15, 30, 47, 61]  # keys before each request's token: new pages every 16, a new 64-key tile every 64
    lengths = list(start)
    advancing, fresh = make_meta_attention(tile_q=16, tile_kv=64), make_meta_attention(tile_q=16, tile_kv=64)
    reused, previous = [], None
    for step in range(36):
        ids = tuple(range(5)) if step != 20 else (0, 1, 2, 3, 9)  # step 20: one request is someone else
        chunks = [(t, n, 1) for t, n in zip(tables, lengths)]
        batch = AttentionBatch.build(16, chunks, request_ids=ids)
        q = torch.randn(5, 9, 32, generator=gen)
        out = advancing(q, k, v, batch, 0.2)
        torch.testing.assert_close(out, fresh(q, k, v, AttentionBatch.build(16, chunks), 0.2), rtol=0, atol=1e-6)
        torch.testing.assert_close(out, reference_attention(q, k, v, batch, 0.2), rtol=1e-4, atol=1e-4)
        reused.append(batch._meta_plan is previous)
        previous = batch._meta_plan
        lengths = [n + 1 for n in lengths]
    # planned afresh: the first step, a step whose token opens a new key tile for some request, and the two
    # steps around the change of requests at step 20
    new_tile = [s for s in range(1, 36) if any((n + s) % 64 == 0 for n in start)]
    assert [i for i, r in enumerate(reused) if not r] == sorted({0, 20, 21, *new_tile}), reused
    assert sum(reused) >= 28


def test_the_engine_runs_the_sdpa_loop_for_the_step_classes_the_table_says(tmp_path):
    """Per step class, the path the table measured faster: the loop's output equals the reference's, and a
    table whose loop rows are faster than Meta-Attention plus its plan sends that class to the loop."""
    chunks = _chunks(2)
    batch = AttentionBatch.build(16, chunks)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(c[2] for c in chunks), 9, 64, generator=gen)
    k, v = torch.randn(3, 400 * 16, 64, generator=gen), torch.randn(3, 400 * 16, 64, generator=gen)
    loop = make_attention(AttentionPaths.everywhere("loop"))
    torch.testing.assert_close(loop(q, k, v, batch, 0.125), reference_attention(q, k, v, batch, 0.125),
                               rtol=1e-4, atol=1e-4)

    template = synthetic_rows(PRESETS["smollm2-135m"], lambda *a: 1e-5, primitives=("p",)).iloc[0].to_dict()

    def rows(target, seconds):  # one shape of the class: Meta-Attention's best tile, its plan, the loop
        shape = canonical_json({"m": 8, "n": 256, "k": 64, "heads": 9, "kv_heads": 3})
        return pd.DataFrame([{**template, "op": "attention", "target": target, "shape": shape, "primitive": prim,
                              "median_s": s, "config": canonical_json(cfg)} for prim, s, cfg in seconds])

    decode = rows("attention.decode", [("meta.attention_short", 1e-3, {"tile_q": 8, "tile_kv": 64}),
                                       ("meta.plan", 3e-3, {}), ("torch.sdpa_loop", 2e-3, {})])
    # prefill: the loop is faster than one layer of Meta-Attention alone (2 ms), and than with its plan's share
    prefill = rows("attention.prefill", [("meta.attention_long", 2e-3, {"prefill_tile": 64}),
                                         ("meta.plan", 3e-3, {}), ("torch.sdpa_loop", 1.5e-3, {})])
    gemm = synthetic_rows(PRESETS["smollm2-135m"], lambda *a: 1e-5, primitives=("p",))
    model = synthetic_cost_model(tmp_path / "t.parquet", pd.concat([gemm, decode, prefill], ignore_index=True))
    paths = AttentionPaths.from_table(model, "float32", num_layers=30)
    assert {paths.path(True, n) for n in (1, 8, 100)} == {"meta"} and {paths.path(False, n) for n in (1, 8, 100)} \
        == {"loop"}
    # one layer: the plan is no longer spread over 30, and Meta-Attention's decode (1 + 3 ms) loses too
    assert AttentionPaths.from_table(model, "float32", num_layers=1).only == "loop"
    assert model.attention_ratios("attention.decode", "float32", 30) == {8: 2e-3 / (1e-3 + 3e-3 / 30)}
    assert AttentionPaths.from_table(None, "float32", 30).only == "meta"  # no table: Meta-Attention


def test_a_step_takes_the_path_measured_faster_at_the_request_count_nearest_its_own(tmp_path):
    """A table where the loop wins for one request and Meta-Attention for 32: a lone decode loops, a batch of
    many runs Meta-Attention, and the engine's attention does what the paths say, with the reference's output."""
    template = synthetic_rows(PRESETS["smollm2-135m"], lambda *a: 1e-5, primitives=("p",)).iloc[0].to_dict()
    rows = []
    for requests, meta_s, loop_s in ((1, 1e-4, 4e-5), (32, 1e-3, 3e-3)):
        shape = canonical_json({"m": requests, "n": 256, "k": 64, "heads": 9, "kv_heads": 3})
        for prim, s, cfg in (("meta.attention_short", meta_s, {"tile_q": 8, "tile_kv": 64}), ("meta.plan", 3e-4, {}),
                             ("torch.sdpa_loop", loop_s, {})):
            rows.append({**template, "op": "attention", "target": "attention.decode", "shape": shape,
                         "primitive": prim, "median_s": s, "config": canonical_json(cfg)})
    gemm = synthetic_rows(PRESETS["smollm2-135m"], lambda *a: 1e-5, primitives=("p",))
    model = synthetic_cost_model(tmp_path / "t.parquet", pd.concat([gemm, pd.DataFrame(rows)], ignore_index=True))
    assert model.attention_ratios("attention.decode", "float32", 30) == pytest.approx(
        {1: 4e-5 / (1e-4 + 1e-5), 32: 3e-3 / (1e-3 + 1e-5)}, rel=1e-12)
    paths = AttentionPaths.from_table(model, "float32", 30)
    assert paths.prefill == ()  # none measured: Meta-Attention
    # log(ratio) runs from log(0.36) at 1 request to log(2.97) at 32, linear in log(requests): 0 at 5.3 requests
    assert [paths.path(True, n) for n in (1, 2, 5, 6, 32, 500)] == ["loop", "loop", "loop", "meta", "meta", "meta"]
    assert paths.path(False, 1) == "meta" and paths.only is None
    assert paths.describe() == ("decode: loop for 1-5, meta for 6-256 requests; "
                                "with prompt tokens: meta for 1-256 requests")

    attention = make_attention(paths)
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(3, 400 * 16, 64, generator=gen), torch.randn(3, 400 * 16, 64, generator=gen)
    for count, path in ((1, "loop"), (8, "meta")):
        chunks = [(list(range(r * 10, r * 10 + 8)), 100 + r, 1) for r in range(count)]
        batch = AttentionBatch.build(16, chunks)
        q = torch.randn(count, 9, 64, generator=gen)
        torch.testing.assert_close(attention(q, k, v, batch, 0.125), reference_attention(q, k, v, batch, 0.125),
                                   rtol=1e-4, atol=1e-4)
        assert hasattr(batch, "_sdpa_masks") == (path == "loop") and hasattr(batch, "_meta_plan") == (path == "meta")
