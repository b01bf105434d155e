"""Meta-Attention's plan for a decode step: planned afresh against advanced from the previous step.

Run: ``python scripts/decode_plan.py`` (a few seconds). For 16-128 decoding requests of 128-512 keys in a
paged cache (SmolLM2-135M's 9 heads over 3 KV heads), it times the whole per-step host work of both ways,
the two taking turns, and prints medians with their spread over five rounds.
"""

from __future__ import annotations

import time

import numpy as np

from xytune.kernels.meta_attention import advance_decode_plan, plan_meta_attention
from xytune.runtime.model.attention import AttentionBatch

BLOCK, HEADS, KV_HEADS, STEPS = 16, 9, 3, 15


def decode_steps(num_requests: int, seed: int):
    """``STEPS`` consecutive decode steps of the same requests: their batches, one key longer each step."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(128, 512, num_requests)
    pages = -(-(lengths + STEPS) // BLOCK)
    first = np.cumsum(pages) - pages
    tables = [list(range(f, f + p)) for f, p in zip(first, pages)]
    ids = tuple(range(num_requests))
    steps = [AttentionBatch.build(BLOCK, [(t, int(n) + s, 1) for t, n in zip(tables, lengths)], request_ids=ids)
             for s in range(STEPS)]
    return steps, int(pages.sum()) * BLOCK


def fresh(steps, slots):
    for b in steps:
        plan_meta_attention(b.requests, HEADS, KV_HEADS, slots, 16, 256, 64, 512, BLOCK, pages_aligned=True)


def advanced(steps, slots):
    plan = plan_meta_attention(steps[0].requests, HEADS, KV_HEADS, slots, 16, 256, 64, 512, BLOCK,
                               pages_aligned=True)
    for b in steps[1:]:
        keys = np.fromiter((r.num_keys for r in b.requests), dtype=np.int64, count=len(b.requests))
        if not advance_decode_plan(plan, keys, b.slot_mapping.numpy()):
            plan = plan_meta_attention(b.requests, HEADS, KV_HEADS, slots, 16, 256, 64, 512, BLOCK,
                                       pages_aligned=True)


def main() -> None:
    print(f"{'requests':>8} {'fresh ms/step':>14} {'advanced ms/step':>17} {'ratio (spread)':>20}")
    for n in (16, 32, 64, 128):
        steps, slots = decode_steps(n, seed=n)
        times = {"fresh": [], "advanced": []}
        for _ in range(5):
            for name, fn in (("fresh", fresh), ("advanced", advanced)):
                t0 = time.perf_counter()
                fn(steps, slots)
                times[name].append((time.perf_counter() - t0) / STEPS * 1e3)
        ratios = np.array(times["fresh"]) / np.array(times["advanced"])
        print(f"{n:>8} {np.median(times['fresh']):>14.3f} {np.median(times['advanced']):>17.3f} "
              f"{np.median(ratios):>9.1f}x ({ratios.min():.1f}-{ratios.max():.1f})")


if __name__ == "__main__":
    main()
