"""The Triton Meta-Attention kernel against the float64 reference.

Run by tests/test_meta_attention_triton.py in a process of its own: on CPU
under TRITON_INTERPRET=1 (which Triton must see before it is imported), on
a CUDA GPU as compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_meta_attention import MIXED, random_batch, reference  # noqa: E402

from xytune.kernels.meta_attention import CAUSAL, TREE  # noqa: E402


def _run(batch, heads, kv_heads, head_dim, seed, **tiles):
    from xytune.kernels.meta_attention.triton_backend import plan_triton, run_meta_attention_triton

    requests, q, k, v = random_batch(batch, heads, kv_heads, head_dim, seed=seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    plan = plan_triton(requests, heads, kv_heads, device=dev, **tiles)
    out = run_meta_attention_triton(plan, q, k, v, head_dim ** -0.5)
    expected = reference(requests, q.cpu(), k.cpu(), v.cpu(), head_dim ** -0.5)
    return plan, out.cpu().double(), expected


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (16, 2, 128)])
def test_mixed_batch_matches_float64(heads, kv_heads, head_dim):
    plan, out, expected = _run(MIXED, heads, kv_heads, head_dim, seed=heads, block_m=16, block_n=16, kv_split=64)
    assert plan.split, "the 130-token decode should be split over several tasks"
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)


def test_tasks_are_longest_first_and_skip_the_causal_corner():
    from xytune.kernels.meta_attention.triton_backend import T_K0, T_K1, plan_triton

    requests, *_ = random_batch([(CAUSAL, 64, 0), (CAUSAL, 1, 300), (TREE, 5, 20)], 4, 4, 64, seed=1)
    plan = plan_triton(requests, 4, 4, block_m=16, block_n=16, kv_split=128)
    lengths = (plan.tasks[:, T_K1] - plan.tasks[:, T_K0]).tolist()
    assert lengths == sorted(lengths, reverse=True)
    # the 64-token prefill's row blocks read 16, 32, 48, 64 keys: nothing above the diagonal
    prefill = plan.tasks[plan.tasks[:, 2] == 0]
    assert sorted(set((prefill[:, T_K1]).tolist())) == [16, 32, 48, 64]


def test_long_trees_are_refused():
    from xytune.kernels.meta_attention.triton_backend import plan_triton

    requests, *_ = random_batch([(TREE, 70, 3)], 2, 2, 64, seed=2)
    with pytest.raises(ValueError, match="tree"):
        plan_triton(requests, 2, 2)
