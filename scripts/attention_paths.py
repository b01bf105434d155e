"""Decode steps of 1 to 32 requests on each attention path: is the table's choice per request count the faster?

The engine decodes a batch of requests (prompts of ``--prompt-len`` random tokens); its attention is swapped
between the path the table chose for that many requests (``AttentionPaths``), Meta-Attention for every step
and the per-request SDPA loop for every step. The variants take turns, round after round, so a drifting
machine hits them alike; each figure is the median of the rounds' medians of 20 consecutive steps.

    python scripts/attention_paths.py --profile TABLE [--dtype bfloat16] [--batches 1,2,4,8,16,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM
from xytune.runtime.model.attention import AttentionPaths, make_attention


def median_step_ms(engine, steps: int = 20) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def positive_ints(text: str) -> list[int]:
    """``1,2,4``: a comma list of positive integers (argparse turns the ValueError into one line, exit 2)."""
    values = [int(x) for x in text.split(",")]
    if min(values) < 1:
        raise ValueError(text)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=positive_ints, default="1,2,4,8,16,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.prompt_len < 1 or args.rounds < 1:
        parser.error("--prompt-len and --rounds must be positive.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the table's notes on this machine
            llm = LLM(dtype=args.dtype, profile=args.profile, kv_cache_gb=0.5, enable_prefix_caching=False)
    except ValueError as exc:  # a missing or foreign table, an unknown dtype: what LLM says, in one line
        parser.exit(2, f"error: {exc}\n")
    engine, tiles = llm.engine, llm.meta_tiles
    variants = {"table": make_attention(llm.attention_paths, **tiles),
                "meta": make_attention(AttentionPaths.everywhere("meta"), **tiles),
                "loop": make_attention(AttentionPaths.everywhere("loop"), **tiles)}
    print(f"{args.dtype}, table {args.profile}: {llm.attention_paths.describe()}")
    print("requests  table's path  table ms  meta ms  loop ms  (medians of rounds, min-max)")
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        vocab = llm.model.config.vocab_size
        reqs = [engine.add_request(rng.integers(100, vocab - 100, args.prompt_len).tolist(), params)
                for _ in range(batch)]
        while any(r.num_computed < len(r.prompt_ids) for r in reqs):
            engine.step()
        ms = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, attention in variants.items():
                llm.model.attention = attention
                engine.step()  # the first step on a path plans afresh
                ms[name].append(median_step_ms(engine))
        llm.model.attention = variants["table"]
        for r in reqs:
            engine.abort(r.request_id)
        cells = "  ".join(f"{np.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})" for v in ms.values())
        print(f"{batch:8d}  {llm.attention_paths.path(True, batch):>12}  {cells}", flush=True)


if __name__ == "__main__":
    main()
