"""`bench kernels` on a GPU/NPU: the device backend's Meta-Attention against the SDPA loop (run here on CPU, where
the device backend is torch and varlen FlashAttention, CUDA only, is left out)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from xytune.bench.kernels import bench_attention_on_device, mixed_batch, render
from xytune.kernels.meta_attention import TREE
from xytune.profiler.devices import get_device
from xytune.runtime.model.attention import meta_tiles_from_table


def test_the_device_bench_times_meta_against_the_loop_with_equal_outputs():
    tiles = meta_tiles_from_table(None, "float32")
    rows = bench_attention_on_device(get_device("cpu"), tiles, sizes=(3, 6), dtype=torch.float32, repeats=2)
    assert [r["requests"] for r in rows] == [3, 6]
    for r in rows:
        assert r["backend"] == "torch" and "varlen_ms" not in r
        assert r["max_abs_err"] < 1e-4  # float32 Meta-Attention against the float32 loop
        assert r["vs_loop"] == pytest.approx(r["loop_ms"] / r["meta_ms"])
    out = io.StringIO()
    render(rows, [], Console(file=out, width=200), {"attention": "float32", "gemm": ""})
    assert "synchronised calls" in out.getvalue() and "varlen FA ms" in out.getvalue()


def test_the_device_bench_batches_leave_the_tree_out():
    """varlen FlashAttention has no tree mask: its batches are causal only, the CPU bench's keep their tree."""
    assert not any(r.mask == TREE for r in mixed_batch(16, 9, 3, 64, torch.float32, 0, tree=False)[0])
    assert any(r.mask == TREE for r in mixed_batch(16, 9, 3, 64, torch.float32, 0)[0])
