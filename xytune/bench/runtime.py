"""``xytune bench runtime``: the engine against Hugging Face transformers, side by side in one process.

Same model file, dtype and threads. Measurements alternate between the two
systems (xytune, transformers, xytune, ...) so a machine that speeds up or
slows down during the run affects both alike; each figure is a median.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import torch
from rich.table import Table

from xytune.profiler.geometry import smollm2_gguf_path
from xytune.runtime.engine.protocol import run_to_completion
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM


def _hf_model(llm_path, dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llm_path.parent), gguf_file=llm_path.name,
                                                              dtype=dtype)
    model.eval()
    return model


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(100, vocab - 100, size=length).tolist() for _ in range(n)]


def _ours_prefill(llm, ids) -> float:

    eng = llm.engine
    req = eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
    start = time.perf_counter()
    eng.step()
    seconds = time.perf_counter() - start
    run_to_completion(eng, [req])
    return seconds


def last_position_only(model) -> dict:
    """Forward kwargs that make a transformers model compute logits for the last position only, as its
    ``generate`` does for a prompt (the argument was renamed in transformers 4.50)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {"num_logits_to_keep": 1}


@torch.inference_mode()
def _hf_prefill(model, ids) -> float:
    """A prefill as transformers' ``generate`` runs it. Logits for every prompt row would add a
    49152-word head GEMM per row (about 12% of a 512-token prefill), work no serving engine does."""
    x = torch.tensor([ids])
    keep = last_position_only(model)
    start = time.perf_counter()
    model(x, use_cache=True, **keep)
    return time.perf_counter() - start


def _ours_decode(llm, prompts, steps: int) -> float:

    eng = llm.engine
    reqs = [eng.add_request(p, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)) for p in prompts]
    while any(r.num_computed < len(r.prompt_ids) for r in reqs):
        eng.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - start)
    run_to_completion(eng, reqs)
    return float(np.median(times))


@torch.inference_mode()
def _hf_decode(model, prompts, steps: int) -> float:
    out = model(torch.tensor(prompts), use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _ours_generate(llm, prompts, new_tokens: int) -> float:

    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - start


@torch.inference_mode()
def _hf_generate(model, prompts, new_tokens: int) -> float:
    x = torch.tensor(prompts)
    start = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run_bench(dtype: str = "bfloat16", threads: int | None = None, prefill_len: int = 512,
              batches: tuple[int, ...] = (1, 8, 32), context: int = 64, decode_steps: int = 16,
              gen_batch: int = 32, gen_tokens: int = 64, repeats: int = 3, seed: int = 0,
              gemm: str = "auto", attention: str = "meta", profile: str | None = None) -> dict:

    if threads:
        torch.set_num_threads(threads)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reference table from another CPU of the same kind is fine here
        llm = LLM("smollm2-135m", dtype=dtype, gemm=gemm, attention=attention, profile=profile,
                  allow_mismatch=True, enable_prefix_caching=False)
    hf = _hf_model(smollm2_gguf_path(), llm.dtype)
    vocab = llm.model.config.vocab_size
    rows = []

    def pair(name, unit, ours_fn, hf_fn, per):
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(ours_fn())
            theirs.append(hf_fn())
        o, t = float(np.median(ours)), float(np.median(theirs))
        if unit == "tokens/s":
            rows.append({"metric": name, "unit": unit, "xytune": per / o, "transformers": per / t, "speedup": t / o})
        else:
            rows.append({"metric": name, "unit": unit, "xytune": o * 1e3, "transformers": t * 1e3, "speedup": t / o})

    prompt = _random_prompts(1, prefill_len, vocab, seed)[0]
    _ours_prefill(llm, prompt[:32]), _hf_prefill(hf, prompt[:32])  # warm-up both
    pair(f"prefill {prefill_len} tokens", "tokens/s", lambda: _ours_prefill(llm, prompt),
         lambda: _hf_prefill(hf, prompt), prefill_len)
    for b in batches:
        prompts = _random_prompts(b, context, vocab, seed + b)
        pair(f"decode step, batch {b} (context {context})", "ms",
             lambda: _ours_decode(llm, prompts, decode_steps), lambda: _hf_decode(hf, prompts, decode_steps), 1)
    prompts = _random_prompts(gen_batch, context, vocab, seed + 99)
    pair(f"generate {gen_batch} x {gen_tokens} tokens", "tokens/s",
         lambda: _ours_generate(llm, prompts, gen_tokens), lambda: _hf_generate(hf, prompts, gen_tokens),
         gen_batch * gen_tokens)
    return {"dtype": str(llm.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gemm": llm.gemm, "attention": attention, "rows": rows}


def render(results: dict, console) -> None:

    t = Table("metric", "unit", "xytune", "transformers", "xytune speedup",
              title=f"SmolLM2-135M, {results['dtype']}, {results['threads']} threads, torch {results['torch']}, "
                    f"xytune gemm {results['gemm']}, attention {results.get('attention', 'reference')}")
    for r in results["rows"]:
        t.add_row(r["metric"], r["unit"], f"{r['xytune']:,.1f}", f"{r['transformers']:,.1f}", f"{r['speedup']:.2f}x")
    console.print(t)
