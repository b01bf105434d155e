"""Decode attention for a few requests: short-tile GEMMs in bf16 against float32 (``float32_short_tiles``).

Run from the repository root: ``python scripts/small_batch_attention.py``. Captured bf16 decode steps of
1, 2, 4 and 8 requests (64-token prompts); each variant is timed in alternating rounds, medians printed:
the step's 30 attention calls alone, and the whole forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode_floor as trial  # noqa: E402  (loads the model)

ALWAYS = 1 << 30  # float32_short_tiles past any step's tile count: every short tile in float32


def set_float32_tiles(args, limit: int) -> None:
    """Make the captured step's plan (one attention call) and set its float32 short-tile limit."""
    trial.attention_only(args)
    args[2]._meta_plan.float32_short_tiles = limit


def main() -> None:
    steps = {b: trial.capture_decode_step(b) for b in (1, 2, 4, 8)}
    variants = {"bf16": 0, "float32": ALWAYS}
    results: dict = {}
    with torch.inference_mode():
        for _ in range(5):
            for b, args in steps.items():
                for name, limit in variants.items():
                    set_float32_tiles(args, limit)
                    results.setdefault((b, name, "attention"), []).append(
                        trial.median_ms(lambda: trial.attention_only(args), n=5))
                    results.setdefault((b, name, "forward"), []).append(
                        trial.median_ms(lambda: trial.model.forward(*args), n=5))
    for b in steps:
        cells = [f"{part} {name} {np.median(results[b, name, part]):.2f} ms"
                 for part in ("attention", "forward") for name in variants]
        print(f"batch {b}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
