"""Accuracy and decode speed of the quantized GEMM formats against float32 (issue: weight-quantized GEMMs).

Accuracy: greedy agreement with the float32 engine over the first 64 tokens of 20 prompts (the 20 lines of the
Zen of Python, which ships with every Python as ``this``), and perplexity of the model on the whole Zen text
(from its prompt logprobs). Speed: decode tokens per second of one 128-token greedy generation, the formats
taking turns, repeated. No cost table: every GEMM runs in the format asked for.

    python scripts/quantized_accuracy.py [--dtype float32|bfloat16] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import platform
import this  # noqa: F401  (prints the Zen on import; its text is rot13 in this.s)
import time

import numpy as np
import torch

from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM

# name -> LLM options; int4 takes the GGUF's own Q4_1 blocks, "int4-requant" re-quantizes their float weights
FORMATS = {"none": {"quantization": "none", "gemm": "plain"}, "int8": {"quantization": "int8"},
           "int4": {"quantization": "int4"}, "int4-requant": {"quantization": "int4", "int4_from_checkpoint": False}}


def zen() -> list[str]:
    return [line for line in codecs.decode(this.s, "rot13").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="activations and float weights (the reference is float32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lines = zen()
    text = "\n".join(lines)
    llms = {f: LLM(dtype=args.dtype, **options) for f, options in FORMATS.items()}
    if args.dtype != "float32":  # the agreement is always against the float32 model
        llms = {"float32": LLM(dtype="float32", gemm="plain"), **llms}
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    tokens = {f: [list(o.outputs[0].token_ids) for o in llm.generate(lines, greedy)] for f, llm in llms.items()}
    ppl_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    result = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "dtype": args.dtype,
              "formats": {}}
    for f, llm in llms.items():
        lps = [lp for lp in llm.generate(text, ppl_params)[0].prompt_logprobs if lp is not None]
        nll = -float(np.mean([lp[0] if isinstance(lp, tuple) else lp for lp in lps]))
        agree = [next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), len(ref))
                 for mine, ref in zip(tokens[f], tokens["float32" if "float32" in tokens else "none"])]
        result["formats"][f] = {"weight_mib": {k: v / 2**20 for k, v in llm.weight_bytes.items()},
                                "perplexity": math.exp(nll), "greedy_prefix_mean": float(np.mean(agree)),
                                "greedy_all_64": int(sum(a == 64 for a in agree)), "decode_tok_s": []}
    decode = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    for _ in range(args.repeats):  # the formats take turns
        for f, llm in llms.items():
            start = time.perf_counter()
            out = llm.generate(lines[0], decode)[0]
            result["formats"][f]["decode_tok_s"].append(len(out.outputs[0].token_ids) / (time.perf_counter() - start))
    for f, r in result["formats"].items():
        s = r["decode_tok_s"]
        print(f"{f:12s} weights {sum(r['weight_mib'].values()):7.1f} MiB  perplexity {r['perplexity']:7.3f}  "
              f"greedy prefix {r['greedy_prefix_mean']:5.1f}/64 (all 64: {r['greedy_all_64']}/20)  "
              f"decode {np.median(s):6.1f} tok/s (min {min(s):.1f}, max {max(s):.1f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
