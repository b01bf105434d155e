"""Host-side time of one decode step outside the model: the attention batch, Meta-Attention's plan, the argmax.

Run from the repository root: ``python scripts/host_overhead.py``. Decodes over random block tables
with 50-1500 cached tokens each, at 32, 128 and 256 requests; medians of 15. Run it at two commits to
compare them (docs/benchmarks.md has both).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from xytune.kernels.meta_attention import plan_meta_attention
from xytune.profiler.devices import get_device
from xytune.profiler.host_memory import keep_freed_memory
from xytune.runtime.engine import sampling
from xytune.runtime.model.attention import AttentionBatch


def median_ms(fn, n: int = 15) -> float:
    return float(np.median(get_device("cpu").time_samples(fn, n))) * 1e3


def main() -> None:
    keep_freed_memory()  # as the engine does: large freed buffers stay with the process, no page faults
    vouch = {"pages_aligned": True} if "pages_aligned" in inspect.signature(plan_meta_attention).parameters else {}
    argmax = getattr(sampling, "row_argmax", lambda z: z.argmax(-1).tolist())
    for batch_size in (32, 128, 256):
        g = np.random.default_rng(0)
        chunks = []
        for _ in range(batch_size):
            context = int(g.integers(50, 1500))
            chunks.append((g.permutation(8000)[: context // 16 + 1].tolist(), context, 1))
        build = median_ms(lambda: AttentionBatch.build(16, chunks))
        batch = AttentionBatch.build(16, chunks)
        plan = median_ms(lambda: plan_meta_attention(batch.requests, 9, 3, 8000 * 16, 8, 512, 128, 1024, 16, **vouch))
        logits = torch.randn(batch_size, 49152)
        pick = median_ms(lambda: argmax(logits))
        print(f"{batch_size} requests: batch {build:.2f} ms, plan {plan:.2f} ms, greedy argmax {pick:.2f} ms, "
              f"total {build + plan + pick:.2f} ms")


if __name__ == "__main__":
    main()
