"""The engine's decode step alone: median of 40 consecutive steps at 1, 8 and 32 requests (64-token prompts).

Run: ``python scripts/decode_step.py`` with each build to compare (the restructure of issue 14 was checked
this way, the builds taking turns). Prints the installed xytune's path and one median per batch size.
"""

from __future__ import annotations

import time

import numpy as np

import xytune
from xytune.runtime.engine.protocol import run_to_completion
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM


def main() -> None:
    engine = LLM(model="smollm2-135m", dtype="bfloat16", threads=2).engine
    medians = {}
    for batch in (1, 8, 32):
        g = np.random.default_rng(batch)
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(g.integers(100, 49000, size=64).tolist(), params) for _ in range(batch)]
        while any(r.num_computed < len(r.prompt_ids) for r in reqs):
            engine.step()
        for _ in range(5):
            engine.step()
        seconds = []
        for _ in range(40):
            start = time.perf_counter()
            engine.step()
            seconds.append(time.perf_counter() - start)
        medians[batch] = float(np.median(seconds)) * 1e3
        run_to_completion(engine, reqs)
    print(xytune.__file__, " ".join(f"batch {b}: {ms:.2f} ms" for b, ms in medians.items()))


if __name__ == "__main__":
    main()
