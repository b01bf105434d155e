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

from xytune.profiler.devices import IDENTITY_KEYS, get_device
from xytune.profiler.table import read_table, write_table

from .engine import Engine
from .sampling import SamplingParams
from .step_predictor import STEP_TERMS, StepPredictor

# (requests kept in flight, token budget): a client holding that many requests open, as a server under load sees
# them: new prompts join while others decode, so steps mix chunks and decodes of every age
CALIBRATION_LOADS = ((1, 512), (4, 512), (16, 512), (48, 512), (8, 2048), (32, 2048))
STEPS_PER_LOAD = 48
PROMPT_TOKENS = (16, 1024)  # prompt lengths, log-uniform
NEW_TOKENS = (8, 160)  # generated tokens, log-uniform


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


def _closed_loop(engine: Engine, rng: np.random.Generator, in_flight: int, steps: int) -> list[tuple[int, float]]:
    """Keep ``in_flight`` requests open for ``steps`` steps: ``(index into step_stats, seconds)`` per step, each
    from the start of one step to the start of the next (the engine loop's period, bookkeeping included)."""
    vocab = engine.model.config.vocab_size
    timed, open_ids = [], set()
    start = time.perf_counter()
    for _ in range(steps):
        while len(open_ids) < in_flight:
            params = SamplingParams(max_tokens=_log_uniform(rng, *NEW_TOKENS), temperature=0, ignore_eos=True,
                                    detokenize=False)
            prompt = rng.integers(100, vocab - 100, _log_uniform(rng, *PROMPT_TOKENS)).tolist()
            open_ids.add(engine.add_request(prompt, params).request_id)
        before = len(engine.step_stats)
        out = engine.step()
        open_ids -= {r.request_id for r in out.finished}
        now = time.perf_counter()
        if len(engine.step_stats) > before:  # a step retried request by request records nothing
            timed.append((len(engine.step_stats) - 1, now - start))
        start = now
    for rid in open_ids:
        engine.abort(rid)
    return timed


def calibrate_engine_steps(engine: Engine, seed: int = 0, steps_per_load: int = STEPS_PER_LOAD) -> dict:
    """Fit the step predictor's terms to whole steps of ``engine`` (which needs a cost table) under closed-loop
    loads; its scheduler settings are restored afterwards. Returns what ``engine_steps`` stores for its dtype.

    The loads run twice and only the second pass is fitted: the first compiles kernels and maps memory for
    the step sizes the second will see, as a server that has run a while has.
    """
    if engine.predictor is None:
        raise ValueError("calibrating engine steps needs the engine's cost table (profile=TABLE).")
    config = engine.scheduler.config
    tile_kv = engine.predictor.tile_kv
    predictor = StepPredictor(engine.predictor.cost_model, engine.predictor.dtype, tile_kv=tile_kv)
    rows = []
    try:
        for measured in (False, True):
            rng = np.random.default_rng(seed)
            for in_flight, budget in CALIBRATION_LOADS:
                engine.scheduler.reconfigure(policy="chunked", max_num_batched_tokens=budget,
                                             max_num_seqs=max(config.max_num_seqs, in_flight))
                for index, seconds in _closed_loop(engine, rng, in_flight, steps_per_load):
                    s = engine.step_stats[index]
                    if measured:
                        rows.append((predictor.features(s.num_tokens, s.num_logit_rows, s.attention_pairs,
                                                        s.decode_tiles), seconds))
    finally:
        engine.scheduler.config = config
    coef = predictor.fit(rows)
    fitted = np.array([float(f @ coef) for f, _ in rows])
    actual = np.array([a for _, a in rows])
    ape = np.abs(fitted - actual) / actual
    return {"coef": dict(zip(STEP_TERMS, map(float, coef))), "steps": len(rows),
            "median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90)), "tile_kv": tile_kv,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def calibrate_table(path: str, model: str | None = None, device: str | None = None, dtypes: list[str] | None = None,
                    threads: int | None = None, progress=None, steps_per_load: int = STEPS_PER_LOAD) -> dict[str, dict]:
    """Fit whole engine steps for each of ``dtypes`` (default: the table's) on this machine and store the fits in
    the table at ``path`` (``engine_steps``). The table must describe this device (its fingerprint is checked
    as a server's is) and ``model`` must have its geometry (default: the table's model)."""
    from ..llm import LLM  # the engine's whole stack; imported here so the simulator does not load it

    if steps_per_load < 4:
        raise ValueError("steps_per_load must be at least 4.")
    table = read_table(path)
    geometry = table.meta["geometry"]
    dtypes = dtypes or list(table.meta.get("sweep", {}).get("dtypes") or sorted(set(table.rows["dtype"])))
    table_fp = table.meta.get("fingerprint", {})
    device = device or table_fp.get("backend", "cpu")
    # the fit is a fact about the machine that timed the rows: a table whose machine this one cannot be shown
    # to be (a differing identity key, or one the older table lacks) is refused, not given this machine's steps
    here = get_device(device, threads=threads).fingerprint()
    unsure = [f"{key}: table has {table_fp.get(key)!r}, this device has {here.get(key)!r}" for key in IDENTITY_KEYS
              if table_fp.get(key) != here.get(key)]
    if unsure:
        raise ValueError(f"{path} was profiled on a different device, or one it cannot be matched to "
                         f"({'; '.join(unsure)}); calibrate on the machine that made it, or profile this one.")
    fits = {}
    for dtype in dtypes:
        if progress:
            progress(f"calibrating whole engine steps in {dtype}...")
        llm = LLM(model=model or geometry["name"], dtype=dtype, device=device, profile=str(path), threads=threads,
                  kv_cache_gb=2.0, quantization="none")
        if llm.model.config.hidden_size != geometry["hidden_size"] or llm.model.config.num_layers != geometry[
                "num_layers"]:
            raise ValueError(f"{path} was profiled for {geometry['name']}; the model given has another geometry.")
        fits[dtype] = {**calibrate_engine_steps(llm.engine, steps_per_load=steps_per_load), "model": llm.model_name}
        del llm
    table = read_table(path)  # re-read: nothing else of the table changes
    table.meta["engine_steps"] = {**(table.meta.get("engine_steps") or {}), **fits}
    write_table(path, table)
    return fits
