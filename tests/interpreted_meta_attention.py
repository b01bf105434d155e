"""The Triton Meta-Attention kernel against the float64 reference.

Run by tests/test_meta_attention_triton.py in a process of its own: on CPU
under TRITON_INTERPRET=1 (which Triton must see before it is imported), on
a CUDA GPU as compiled kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from test_meta_attention import MIXED, random_batch, reference  # noqa: E402

from xytune.kernels.meta_attention import CAUSAL, NO_MASK, TREE, AttnRequest  # noqa: E402
from xytune.kernels.meta_attention.triton_backend import plan_triton, run_meta_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(batch, heads, kv_heads, head_dim, seed, **tiles):
    requests, q, k, v = random_batch(batch, heads, kv_heads, head_dim, seed=seed)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    plan = plan_triton(requests, heads, kv_heads, device=DEVICE, **tiles)
    out = run_meta_attention_triton(plan, q, k, v, head_dim ** -0.5)
    expected = reference(requests, q.cpu(), k.cpu(), v.cpu(), head_dim ** -0.5)
    return plan, out.cpu().double(), expected


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (16, 2, 128)])
def test_mixed_batch_matches_float64(heads, kv_heads, head_dim):
    plan, out, expected = _run(MIXED, heads, kv_heads, head_dim, seed=heads, block_m=16, block_n=16, kv_split=64)
    assert plan.split, "the 130-token decode should be split over several tasks"
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("head_dim", [80, 96, 8])
def test_head_dims_that_are_not_powers_of_two(head_dim):
    """80 and 96 (and 8, under tl.dot's 16) are padded inside the kernel, split or not."""
    for kv_split in (64, 4096):
        plan, out, expected = _run(MIXED, 6, 2, head_dim, seed=head_dim, block_m=16, block_n=16, kv_split=kv_split)
        assert plan.split == (kv_split == 64)
        torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)


def test_no_split_writes_from_the_kernel_without_a_merge(monkeypatch):
    """Every key range fits one task: no segment has two, so the log-sum-exp merge (scatter_reduce) never runs."""
    batch = [(CAUSAL, 40, 0), (CAUSAL, 1, 90), (TREE, 5, 20), (NO_MASK, 3, 7)]

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge ran on a plan with no split")

    monkeypatch.setattr(torch.Tensor, "scatter_reduce", no_merge)
    plan, out, expected = _run(batch, 8, 2, 64, seed=3, block_m=16, block_n=16, kv_split=512)
    assert not plan.split and plan.tasks.shape[0] == plan.num_segments
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)


def test_tasks_are_longest_first_and_skip_the_causal_corner():
    from xytune.kernels.meta_attention.triton_backend import T_K0, T_K1

    requests, *_ = random_batch([(CAUSAL, 64, 0), (CAUSAL, 1, 300), (TREE, 5, 20)], 4, 4, 64, seed=1)
    plan = plan_triton(requests, 4, 4, block_m=16, block_n=16, kv_split=128)
    lengths = (plan.tasks[:, T_K1] - plan.tasks[:, T_K0]).tolist()
    assert lengths == sorted(lengths, reverse=True)
    # the 64-token prefill's row blocks read 16, 32, 48, 64 keys: nothing above the diagonal
    prefill = plan.tasks[plan.tasks[:, 2] == 0]
    assert sorted(set((prefill[:, T_K1]).tolist())) == [16, 32, 48, 64]


@pytest.mark.parametrize("kv_split", [64, 4096])
def test_trees_longer_than_64_tokens(kv_split):
    """A 150-token draft tree needs three ancestor words; deep chains reach ancestors 64+ tokens back."""
    gen = torch.Generator().manual_seed(5)
    q_len, ctx = 150, 30
    parents = tuple([-1] + [i - 1 if i % 3 else int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, q_len)])
    requests, q, k, v = random_batch([(CAUSAL, 1, 40), (CAUSAL, 12, 0)], 4, 2, 32, seed=6)
    tree_slots = torch.arange(3000, 3000 + ctx + q_len)
    requests.append(AttnRequest(q_len, ctx, tree_slots, TREE, parents))
    q = torch.cat([q, torch.randn(q_len, 4, 32, generator=gen)])
    plan = plan_triton(requests, 4, 2, block_m=16, block_n=32, kv_split=kv_split, device=DEVICE)
    assert plan.tree_bits.shape == (q.shape[0], 3)
    out = run_meta_attention_triton(plan, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 32 ** -0.5)
    torch.testing.assert_close(out.cpu().double(), reference(requests, q, k, v, 32 ** -0.5), rtol=2e-4, atol=2e-4)


def test_head_offsets_past_two_to_the_31_elements():
    """KV head 2 starts 2**31 elements into the pool: 32-bit offsets would wrap (on CPU the pool is lazily
    zeroed virtual memory: only the pages the batch touches become real)."""
    kv_heads, slots, head_dim, head_stride = 3, 64, 16, 2 ** 30
    size = (kv_heads - 1) * head_stride + slots * head_dim
    if DEVICE == "cuda":
        if torch.cuda.mem_get_info()[0] < 2 * 4 * size:
            pytest.skip("this GPU has no 16 GiB free for an 8 GiB KV pool")
        pool = torch.zeros(size, device=DEVICE)
    else:
        try:
            pool = torch.from_numpy(np.zeros(size, dtype=np.float32))
        except MemoryError:
            pytest.skip("this machine cannot map 8 GiB of virtual memory")
    cache = pool.as_strided((kv_heads, slots, head_dim), (head_stride, head_dim, 1))
    gen = torch.Generator().manual_seed(7)
    cache.copy_(torch.randn(kv_heads, slots, head_dim, generator=gen))
    requests = [AttnRequest(3, 20, torch.randperm(slots, generator=gen)[:23]), AttnRequest(1, 40, torch.arange(41))]
    q = torch.randn(4, 6, head_dim, generator=gen)
    plan = plan_triton(requests, 6, kv_heads, block_m=16, block_n=16, kv_split=512, device=DEVICE)
    out = run_meta_attention_triton(plan, q.to(DEVICE), cache, cache, head_dim ** -0.5)
    dense = cache.cpu().contiguous()
    torch.testing.assert_close(out.cpu().double(), reference(requests, q, dense, dense, head_dim ** -0.5),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name,shape,config", [
    ("meta.attention_short", {"m": 6, "n": 80, "k": 32, "heads": 6, "kv_heads": 2}, {"tile_q": 16, "tile_kv": 64}),
    ("meta.attention_long", {"m": 2, "q": 24, "n": 40, "k": 32, "heads": 6, "kv_heads": 2},
     {"prefill_tile": 32, "sdpa_min_keys": 256}),
])
def test_profiler_times_the_triton_kernel_where_cuda_runs_it(monkeypatch, name, shape, config):
    """The attention rows of a CUDA table time the Triton kernel the engine runs there (here: interpreted,
    against what the same primitive computes on the torch backend)."""
    from xytune.profiler import primitives
    from xytune.profiler.devices import Device

    dev = Device("cuda" if DEVICE == "cuda" else "cpu")
    make = primitives.REGISTRY[name].make
    torch_out = make(shape, config, "float32", Device("cpu"))().cpu()
    monkeypatch.setattr(primitives, "backend_for", lambda device_type, dtype: "triton")
    triton_out = make(shape, config, "float32", dev)().cpu()
    torch.testing.assert_close(triton_out, torch_out, rtol=2e-4, atol=2e-4)
    plan = primitives.REGISTRY["meta.plan"].make(shape, {}, "float32", dev)()
    assert type(plan).__name__ == "TritonPlan"
