"""Where a batch-1 decode step's time goes, and what streaming the weights does to the rest of it.

The engine decodes one request; the step, the model's forward, its weight GEMMs, its attention and its
RMSNorms are timed by wrapping them (each wrapper adds about a microsecond per call). Then the same steps run
with every GEMM handing back an output it computed before (no weight is read): the forward's other work
alone, on warm caches. The difference between the two "rest of the forward" figures is what the GEMMs'
weight streams cost the small operations that follow them (their data and code evicted from the caches).
The two variants take turns, repeated.

    python scripts/decode_step_split.py [--dtype bfloat16] [--quantization none] [--profile TABLE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

import numpy as np

from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM
from xytune.runtime.model import llama
from xytune.runtime.model.linear import Linear

PARTS = ("step", "forward", "gemms", "attention", "norms")


def instrument(llm: LLM, spent: dict) -> dict:
    """Wrap the parts in timers; returns what is needed to swap the GEMMs for cached outputs."""
    real_call, model = Linear.__call__, llm.model
    state = {"cached": False, "outputs": {}}

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            return out
        return run

    def gemm(self, x):
        if not state["cached"]:
            return real_call(self, x)
        key = (id(self), x.shape[0])
        if key not in state["outputs"]:
            state["outputs"][key] = real_call(self, x).clone()
        return state["outputs"][key]

    Linear.__call__ = timed("gemms", gemm)
    model.attention = timed("attention", model.attention)
    llama.rms_norm = timed("norms", llama.rms_norm)
    model.forward = timed("forward", model.forward)
    return state


def timed_steps(llm: LLM, spent: dict, steps: int) -> dict:
    engine = llm.engine
    for _ in range(3):
        engine.step()
    spent.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    spent["step"] = time.perf_counter() - start
    return {part: spent[part] / steps for part in PARTS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(dtype=args.dtype, quantization=args.quantization, profile=args.profile, kv_cache_gb=0.25)
    spent: dict = defaultdict(float)
    state = instrument(llm, spent)
    params = SamplingParams(max_tokens=(args.steps + 3) * 2 * args.repeats + 8, temperature=0, ignore_eos=True)
    req = llm.engine.add_request(list(range(200, 232)), params)
    while req.num_computed < len(req.prompt_ids):
        llm.engine.step()
    runs = {"weights streamed": [], "GEMMs cached": []}
    for _ in range(args.repeats):  # the variants take turns
        for variant in runs:
            state["cached"] = variant == "GEMMs cached"
            runs[variant].append(timed_steps(llm, spent, args.steps))
    print(f"{args.dtype}, quantization {args.quantization}, table {args.profile or 'none'}; ms per step, median "
          f"of {args.repeats} (min-max)")
    for variant, samples in runs.items():
        cells = []
        for part in (*PARTS, "rest of forward"):
            values = [s["forward"] - s["gemms"] - s["attention"] - s["norms"] if part == "rest of forward"
                      else s[part] for s in samples]
            cells.append(f"{part} {np.median(values) * 1e3:.2f} ({min(values) * 1e3:.2f}-{max(values) * 1e3:.2f})")
        print(f"{variant:17s} " + ", ".join(cells))


if __name__ == "__main__":
    main()
