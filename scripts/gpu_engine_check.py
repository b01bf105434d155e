#!/usr/bin/env python3
"""Greedy output of the xytune engine against Hugging Face transformers on one device, float32.

The default model's GGUF cannot travel to a bare GPU machine, so this writes a tiny random-weight Llama
(config.json + model.safetensors + a tokenizer.json trained here with ``tokenizers``) into a work folder,
then compares, prompt by prompt, the token ids of

- transformers' ``generate`` (greedy, float32, on the device), the reference, and
- ``xytune.LLM(folder, dtype="float32", device=...)`` in several variants: Meta-Attention (Triton on
  CUDA), the same with 7-token prefill chunks (mixed prefill/decode steps), the reference attention with
  plain GEMMs, and, unless --no-smooth, Meta-Attention + SmoothGEMM planned from a small cost table of
  this very model profiled here with ``xytune profile``.

Each variant prints PASS (every prompt's tokens equal) or FAIL (with the first differing position and
the transformers logit gap between the two tokens there: a gap near 0 means a numerical near-tie, as
TF32 inside a float32 kernel can flip). Timings of every load and generate are printed and written to
--json. Exit code 0 when every variant passes, 1 otherwise, 2 when something could not run.

    python3 scripts/gpu_engine_check.py --device cuda --json $OUT/engine_check.json
    python3 scripts/gpu_engine_check.py --device cpu --threads 1    # the same check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]
CORPUS = ["the quick brown fox jumps over the lazy dog"] * 20 + TEXT_PROMPTS + [
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "def add(a, b):\n    return a + b\n",
]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_tiny_model(folder: Path, args) -> dict:
    """A random Llama with a trained byte-level BPE tokenizer, saved the way Hugging Face saves one."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.tokenizer_vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size()  # the model's vocabulary is the tokenizer's: every sampled id decodes

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=vocab,
        max_position_embeddings=1024, initializer_range=args.init_std, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(str(folder), safe_serialization=True)
    return {"vocab_size": vocab, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads, "layers": args.layers,
            "params": sum(p.numel() for p in hf.parameters())}


def make_prompts(folder: Path, vocab: int, seed: int) -> list[list[int]]:
    """Text prompts through the saved tokenizer, plus id prompts of 1, 70 (past one 64-row query tile)
    and 300 tokens (past Meta-Attention's default 256-key split: split-KV tasks merged by log-sum-exp)."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in TEXT_PROMPTS]
    gen = torch.Generator().manual_seed(seed)
    for n in (1, 70, 300):
        prompts.append(torch.randint(2, vocab, (n,), generator=gen).tolist())
    return prompts


def hf_reference(folder: Path, prompts, new_tokens: int, device: str):
    """transformers' greedy continuations (one prompt at a time, no padding), float32 on ``device``."""
    import torch
    import transformers

    t0 = time.perf_counter()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    sync(device)
    load_s = time.perf_counter() - t0
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
    sync(device)
    gen_s = time.perf_counter() - t0
    return hf, outs, {"load_s": load_s, "generate_s": gen_s, "tokens": sum(len(o) for o in outs)}


def logit_gap(hf, prompt, common: list[int], want: int, got: int, device: str) -> float:
    """transformers' logit of its own token minus that of xytune's, at the first differing position."""
    import torch

    with torch.inference_mode():
        z = hf(torch.tensor([prompt + common], device=device)).logits[0, -1].float()
    return float(z[want] - z[got])


def compare(hf, prompts, expected, got, device: str) -> dict:
    rows, ok = [], True
    for i, (p, e, g) in enumerate(zip(prompts, expected, got)):
        if e == g:
            rows.append({"prompt": i, "prompt_len": len(p), "match": True, "same_prefix": len(e)})
            continue
        ok = False
        first = next((j for j, (a, b) in enumerate(zip(e, g)) if a != b), min(len(e), len(g)))
        row = {"prompt": i, "prompt_len": len(p), "match": False, "same_prefix": first,
               "expected_len": len(e), "got_len": len(g)}
        if first < min(len(e), len(g)):
            row["hf_token"], row["xytune_token"] = e[first], g[first]
            try:
                row["hf_logit_gap"] = logit_gap(hf, p, e[:first], e[first], g[first], device)
            except Exception as exc:  # the gap is a diagnosis only
                row["hf_logit_gap"] = f"n/a ({type(exc).__name__})"
        rows.append(row)
    return {"pass": ok, "prompts": rows, "min_same_prefix": min(r["same_prefix"] for r in rows)}


def profile_tiny(folder: Path, device: str, workdir: Path, timeout_s: int,
                 threads: int | None = None, reuse: bool = False) -> tuple[Path | None, dict]:
    """A small cost table of the tiny model on ``device`` via the CLI (SmoothGEMM needs its exact shapes)."""
    table = workdir / f"tiny-{device.replace(':', '_')}.parquet"
    if reuse and table.is_file():
        log(f"reusing the cost table {table}")
        return table, {"reused": str(table)}
    cmd = [sys.executable, "-m", "xytune.cli", "profile", "--device", device, "--model", str(folder),
           "--dtypes", "float32", "--buckets", "1,4,16,64,256", "--trials", "4", "--budget-ms", "5",
           "-o", str(table), "--overwrite", "--no-progress"] + (["--threads", str(threads)] if threads else [])
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    try:
        # cwd: the work folder, so that a checkout's own xytune/ folder never shadows the installed package
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=workdir)
    except subprocess.TimeoutExpired:
        return None, {"profile_s": time.perf_counter() - t0, "error": f"timed out after {timeout_s} s"}
    info = {"profile_s": time.perf_counter() - t0, "rc": proc.returncode}
    log((proc.stdout + proc.stderr).strip()[-3000:])
    if proc.returncode != 0 or not table.is_file():
        info["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, info
    return table, info


def run_variant(name: str, folder: Path, prompts, new_tokens: int, device: str, chunk: int | None = None,
                **llm_kwargs):
    import torch  # noqa: F401

    from xytune import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), dtype="float32", device=device, kv_cache_gb=0.05, **llm_kwargs)
    sync(device)
    load_s = time.perf_counter() - t0
    if chunk is not None:
        llm.engine.scheduler.config.max_num_batched_tokens = chunk
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up (compiles)
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    gen_s = time.perf_counter() - t0
    got = [o.outputs[0].token_ids for o in outs]
    info = {"load_s": load_s, "generate_s": gen_s, "tokens": sum(len(g) for g in got),
            "tokens_per_s": sum(len(g) for g in got) / gen_s if gen_s > 0 else None,
            "attention": llm.attention, "gemm": llm.gemm, "meta_tiles": llm.meta_tiles, "chunk": chunk}
    return got, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--workdir", type=Path, default=None, help="where the tiny model goes [default: a temp dir]")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer-vocab", type=int, default=400)
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-smooth", action="store_true", help="skip the profiled Meta-Attention + SmoothGEMM variant")
    ap.add_argument("--profile-timeout", type=int, default=120)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the tiny model and its cost table already in --workdir (a second run, say with "
                         "TRITON_F32_DEFAULT=ieee)")
    ap.add_argument("--variants", default=None,
                    help="comma list out of meta, meta-chunk7, reference-plain, meta-smooth [default: all]")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    result: dict = {"device": device, "torch": torch.__version__, "variants": {}, "errors": []}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            log("FAIL: --device cuda but torch sees no CUDA GPU")
            return 2
        result["gpu"] = torch.cuda.get_device_name(0)
        result["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        log("FAIL: transformers is not installed")
        return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="xytune-engine-check-"))).resolve()
    folder = workdir / "tiny-llama"
    result["env"] = {k: os.environ[k] for k in ("TRITON_F32_DEFAULT", "TRITON_INTERPRET") if k in os.environ}
    log(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, workdir {workdir}")

    t0 = time.perf_counter()
    if args.reuse and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        result["model"] = {"vocab_size": cfg["vocab_size"], "reused": str(folder)}
    else:
        result["model"] = build_tiny_model(folder, args)
    prompts = make_prompts(folder, result["model"]["vocab_size"], args.seed)
    result["model"]["build_s"] = time.perf_counter() - t0
    result["prompt_lens"] = [len(p) for p in prompts]
    log(f"tiny model {result['model']}; prompts of {result['prompt_lens']} tokens, {args.new_tokens} new each")

    hf, expected, hf_info = hf_reference(folder, prompts, args.new_tokens, device)
    result["transformers_reference"] = hf_info
    log(f"transformers: load {hf_info['load_s']:.2f} s, generate {hf_info['generate_s']:.2f} s "
        f"({hf_info['tokens']} tokens, one prompt at a time)")

    variants = [("meta", dict()), ("meta-chunk7", dict(chunk=7)),
                ("reference-plain", dict(attention="reference", gemm="plain"))]
    wanted = [v.strip() for v in args.variants.split(",")] if args.variants else None
    if wanted is not None:
        unknown = set(wanted) - {n for n, _ in variants} - {"meta-smooth"}
        if unknown:
            log(f"unknown variant(s) {sorted(unknown)}")
            return 2
        variants = [(n, kw) for n, kw in variants if n in wanted]
    if not args.no_smooth and (wanted is None or "meta-smooth" in wanted):
        table, pinfo = profile_tiny(folder, device, workdir, args.profile_timeout, args.threads, args.reuse)
        result["tiny_profile"] = pinfo
        if table is None:
            result["errors"].append(f"profile of the tiny model failed: {pinfo.get('error')}")
            log(f"FAIL: profile of the tiny model: {pinfo.get('error')}")
        else:
            variants.append(("meta-smooth", dict(attention="meta", gemm="smooth", profile=str(table))))

    def dump() -> None:  # after every variant: a run stopped by a time limit still leaves what it found
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str))

    all_pass = not result["errors"]
    for name, kw in variants:
        dump()
        try:
            got, info = run_variant(name, folder, prompts, args.new_tokens, device, **kw)
            cmp = compare(hf, prompts, expected, got, device)
        except Exception as exc:
            all_pass = False
            tb = traceback.format_exc()
            result["variants"][name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "traceback": tb}
            log(f"FAIL {name}: crashed: {type(exc).__name__}: {exc}\n{tb}")
            continue
        result["variants"][name] = {**info, **cmp}
        all_pass &= cmp["pass"]
        tps = f"{info['tokens_per_s']:.0f} tok/s" if info["tokens_per_s"] else ""
        log(f"{'PASS' if cmp['pass'] else 'FAIL'} {name}: attention={info['attention']} gemm={info['gemm']} "
            f"load {info['load_s']:.2f} s, generate {info['generate_s']:.2f} s ({info['tokens']} tokens, {tps}); "
            f"shortest equal prefix {cmp['min_same_prefix']}/{args.new_tokens}")
        gaps = [r["hf_logit_gap"] for r in cmp["prompts"] if isinstance(r.get("hf_logit_gap"), float)]
        if gaps:
            log(f"    largest transformers logit gap at a first difference: {max(gaps):.4g} "
                f"({'small: numerical near-ties (TF32 or summation order), not a wrong result' if max(gaps) < 0.05 else 'large: look for a real error'})")
        for row in cmp["prompts"]:
            if not row["match"]:
                log(f"    prompt {row['prompt']} (len {row['prompt_len']}): differs at {row['same_prefix']}: "
                    f"transformers {row.get('hf_token')} vs xytune {row.get('xytune_token')}, "
                    f"transformers logit gap {row.get('hf_logit_gap')}")
    result["pass"] = all_pass
    log(f"ENGINE CHECK {'PASS' if all_pass else 'FAIL'} on {device}")
    dump()
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
