"""``xytune bench floor``: a batch-1 decode step against its physical floor.

A decode step of one request reads every weight once: it can go no faster than the bytes of the weights it
reads at M=1 over the machine's copy bandwidth (measured here as the profiler measures it, bytes read plus
bytes written per second, on a buffer larger than the last-level cache, so it is memory's and not the
cache's). Beside the whole step (the engine loop's period, scheduling and
sampling included) the bench times the step's weight GEMMs alone, the same kernels on the same weights, so
the gap splits into what the GEMMs lose to the floor and what the rest of the step adds. The weight formats
take turns, repeat after repeat, so drift hits them alike.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from rich.table import Table

from xytune.profiler.devices import get_device, llc_bytes
from xytune.profiler.peaks import measure_copy_bandwidth
from xytune.profiler.primitives import weight_format_of
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM, model_linears
from xytune.runtime.model.linear import Linear

GOAL = 1.3  # issue 18: a batch-1 decode step within 1.3x of the floor


def format_at_m1(lin: Linear) -> str:
    """The weight format a linear layer runs at M=1: SmoothGEMM's plan where it plans, else the one held."""
    if lin.planner is not None:
        return weight_format_of(lin.planner.plan(1).segments[0].primitive)
    return next(iter(lin.quantized)) if lin.weight is None else "float"


def bytes_read_at_m1(llm: LLM) -> int:
    """Bytes a batch-1 decode step reads: each GEMM weight in the format it runs at M=1, one embedding row, the
    norms (the KV cache of a short context is left out: a few KiB)."""
    total = 0
    for lin in model_linears(llm.model):
        total += lin.weight_bytes[format_at_m1(lin)]
    model = llm.model
    total += model.embed.shape[1] * model.embed.element_size()
    total += sum(t.numel() * t.element_size() for layer in model.layers for t in (layer.ln1, layer.ln2))
    return total


def gemms_alone_s(llm: LLM, repeats: int = 20) -> float:
    """Median seconds of one pass over every weight GEMM of the model at M=1 (activations in its dtype)."""
    linears = model_linears(llm.model)
    xs = {lin.in_features: torch.randn(1, lin.in_features, dtype=llm.dtype) for lin in linears}
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        for lin in linears:
            lin(xs[lin.in_features])
        times.append(time.perf_counter() - start)
    return float(np.median(times[3:]))


def decode_step_s(llm: LLM, steps: int, prompt_len: int = 32) -> float:
    """Median engine-loop period of a lone request's decode steps (start of one step to the start of the
    next), after its prefill and a few warm steps."""
    eng = llm.engine
    vocab = llm.model.config.vocab_size
    prompt = np.random.default_rng(0).integers(100, vocab - 100, prompt_len).tolist()
    req = eng.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    while req.num_computed < len(req.prompt_ids):
        eng.step()
    for _ in range(4):
        eng.step()
    times, start = [], time.perf_counter()
    for _ in range(steps):
        eng.step()
        now = time.perf_counter()
        times.append(now - start)
        start = now
    eng.abort(req.request_id)
    return float(np.median(times))


def run_bench(dtype: str, quantizations: list[str], steps: int = 48, repeats: int = 3,
              profile: str | None = None, threads: int | None = None) -> dict:
    device = get_device("cpu", threads=threads)
    # a buffer twice the last-level cache (at least 256 MiB): memory's bandwidth, not the cache's
    buffer_bytes = max(256 * 2**20, 2 * llc_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quick table's mismatch notes: the figures say what ran
        llms = {q: LLM(dtype=dtype, quantization=q, profile=profile, threads=threads, kv_cache_gb=0.25)
                for q in quantizations}
    samples: dict[str, dict[str, list[float]]] = {q: {"step_s": [], "gemms_s": []} for q in quantizations}
    bandwidths = []
    for _ in range(repeats):
        bandwidths.append(measure_copy_bandwidth(device, nbytes=buffer_bytes))
        for q, llm in llms.items():
            samples[q]["step_s"].append(decode_step_s(llm, steps))
            samples[q]["gemms_s"].append(gemms_alone_s(llm))
    copy_bw = float(np.median(bandwidths))
    rows = []
    for q, llm in llms.items():
        nbytes = bytes_read_at_m1(llm)
        floor_s = nbytes / copy_bw
        step, gemms = samples[q]["step_s"], samples[q]["gemms_s"]
        rows.append({"quantization": q, "bytes_read": nbytes, "floor_s": floor_s,
                     "step_s": float(np.median(step)), "step_range_s": [min(step), max(step)],
                     "gemms_s": float(np.median(gemms)), "gemms_range_s": [min(gemms), max(gemms)],
                     "step_over_floor": float(np.median(step)) / floor_s,
                     "gemms_over_floor": float(np.median(gemms)) / floor_s,
                     "int4_from_checkpoint": llm.int4_from_checkpoint})
    return {"dtype": dtype, "threads": torch.get_num_threads(), "copy_bytes_per_s": copy_bw,
            "copy_bytes_per_s_range": [min(bandwidths), max(bandwidths)], "buffer_bytes": buffer_bytes,
            "steps": steps, "repeats": repeats, "goal": GOAL, "rows": rows}


def render(results: dict, console) -> None:
    bw = results["copy_bytes_per_s"]
    lo, hi = results["copy_bytes_per_s_range"]
    console.print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write, {results['buffer_bytes'] / 2**20:.0f} MiB; "
                  f"{lo / 1e9:.1f}-{hi / 1e9:.1f}), {results['dtype']} activations, {results['threads']} threads, "
                  f"medians of {results['repeats']} turns", highlight=False)
    table = Table(title="batch-1 decode step against reading the weights once")
    for col in ("weights", "MiB read", "floor ms", "GEMMs alone ms", "step ms", "GEMMs / floor", "step / floor"):
        table.add_column(col, justify="left" if col == "weights" else "right")
    for r in results["rows"]:
        g_lo, g_hi = r["gemms_range_s"]
        s_lo, s_hi = r["step_range_s"]
        table.add_row(r["quantization"], f"{r['bytes_read'] / 2**20:.1f}", f"{r['floor_s'] * 1e3:.2f}",
                      f"{r['gemms_s'] * 1e3:.2f} ({g_lo * 1e3:.2f}-{g_hi * 1e3:.2f})",
                      f"{r['step_s'] * 1e3:.2f} ({s_lo * 1e3:.2f}-{s_hi * 1e3:.2f})",
                      f"{r['gemms_over_floor']:.2f}x", f"{r['step_over_floor']:.2f}x")
    console.print(table)
    best = min(results["rows"], key=lambda r: r["step_over_floor"])
    met = "met" if best["step_over_floor"] <= results["goal"] else "not met"
    console.print(f"goal: a step within {results['goal']}x of its floor: {met} (best: {best['quantization']}, "
                  f"{best['step_over_floor']:.2f}x)", highlight=False)
