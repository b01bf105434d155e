"""What whole engine steps take on this machine, fitted once and stored with the cost table.

The cost table times GEMMs and attention alone. A step of the engine also
runs norms, rotary, sampling and the scheduler's own Python, and on a small
CPU those are a large share. The serving simulator (``xytune tune``) must
predict whole steps from the table alone, possibly on another machine, so
the machine that made the table runs a fixed mix of real steps once (large
and small prefill chunks, decode batches of 1 to 64 at growing contexts,
mixed steps) and the step predictor's terms are fitted to their wall time,
scheduling and bookkeeping included. The fit goes into the table's metadata
under ``engine_steps``, per dtype.
"""

from __future__ import annotations

import time

import numpy as np

from xytune.profiler.table import read_table, write_table

from .engine import Engine
from .protocol import run_to_completion
from .sampling import SamplingParams
from .step_predictor import STEP_TERMS, StepPredictor

# (prompt lengths drawn from, requests, new tokens each, token budget): big chunks, decode batches, mixed steps
CALIBRATION_PHASES = (
    ((256, 1536), 6, 2, 2048),
    ((32, 512), 1, 24, 2048),
    ((32, 512), 4, 24, 2048),
    ((32, 512), 16, 24, 2048),
    ((32, 512), 64, 16, 2048),
    ((128, 384), 32, 32, 512),
    ((16, 96), 24, 48, 256),
)


def _timed_steps(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, float]]:
    """Run the prompts to completion one step at a time: ``(index into step_stats, wall seconds)`` per step."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
    for p in prompts:
        engine.add_request(p, params)
    timed = []
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        timed.append((len(engine.step_stats) - 1, seconds))
    return timed


def calibrate_engine_steps(engine: Engine, seed: int = 0) -> dict:
    """Fit the step predictor's terms to whole steps of ``engine`` (which needs a cost table); its scheduler
    settings are restored afterwards. Returns what ``engine_steps`` stores for the engine's dtype."""
    if engine.predictor is None:
        raise ValueError("calibrating engine steps needs the engine's cost table (profile=TABLE).")
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    config = engine.scheduler.config
    predictor = StepPredictor(engine.predictor.cost_model, engine.predictor.dtype)
    # warm up: compiled kernels, mapped memory and packed weights are the steady state a server runs in
    run_to_completion(engine, [engine.add_request(rng.integers(100, vocab - 100, 200).tolist(),
                                                  SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False))
                               for _ in range(4)])
    rows = []
    try:
        for (lo, hi), count, new_tokens, budget in CALIBRATION_PHASES:
            engine.scheduler.reconfigure(policy="chunked", max_num_batched_tokens=budget,
                                         max_num_seqs=max(config.max_num_seqs, count))
            prompts = [rng.integers(100, vocab - 100, int(rng.integers(lo, hi + 1))).tolist() for _ in range(count)]
            first = len(engine.step_stats)
            for index, seconds in _timed_steps(engine, prompts, new_tokens):
                if index < first:
                    continue  # a step that failed and was retried request by request records nothing
                s = engine.step_stats[index]
                rows.append((predictor.features(s.num_tokens, s.num_logit_rows, s.attention_pairs), seconds))
    finally:
        engine.scheduler.config = config
    coef = predictor.fit(rows)
    fitted = np.array([float(f @ coef) for f, _ in rows])
    actual = np.array([a for _, a in rows])
    ape = np.abs(fitted - actual) / actual
    return {"coef": dict(zip(STEP_TERMS, map(float, coef))), "steps": len(rows),
            "median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90)),
            "max_tokens_per_step": int(max(s.num_tokens for s in engine.step_stats)),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def calibrate_table(path: str, model: str | None = None, device: str | None = None, dtypes: list[str] | None = None,
                    threads: int | None = None, progress=None) -> dict[str, dict]:
    """Fit whole engine steps for each of ``dtypes`` (default: the table's) on this machine and store the fits in
    the table at ``path`` (``engine_steps``). The table must describe this device (its fingerprint is checked
    as a server's is) and ``model`` must have its geometry (default: the table's model)."""
    from ..llm import LLM  # the engine's whole stack; imported here so the simulator does not load it

    table = read_table(path)
    geometry = table.meta["geometry"]
    dtypes = dtypes or list(table.meta.get("sweep", {}).get("dtypes") or sorted(set(table.rows["dtype"])))
    device = device or table.meta.get("fingerprint", {}).get("backend", "cpu")
    fits = {}
    for dtype in dtypes:
        if progress:
            progress(f"calibrating whole engine steps in {dtype}...")
        llm = LLM(model=model or geometry["name"], dtype=dtype, device=device, profile=str(path), threads=threads,
                  kv_cache_gb=2.0, quantization="none")
        if llm.model.config.hidden_size != geometry["hidden_size"] or llm.model.config.num_layers != geometry[
                "num_layers"]:
            raise ValueError(f"{path} was profiled for {geometry['name']}; the model given has another geometry.")
        fits[dtype] = {**calibrate_engine_steps(llm.engine), "model": llm.model_name}
        del llm
    table = read_table(path)  # re-read: nothing else of the table changes
    table.meta["engine_steps"] = {**(table.meta.get("engine_steps") or {}), **fits}
    write_table(path, table)
    return fits
