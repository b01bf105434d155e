"""What whole engine steps take on this machine, fitted once and stored with the cost table.

The cost table times GEMMs and attention alone. A step of the engine also
runs norms, rotary, sampling and the scheduler's own Python, and on a small
CPU those are a large share. The serving simulator (``xytune tune``) must
predict whole steps from the table alone, possibly on another machine, so
the machine that made the table runs real steps once and the step
predictor's terms are fitted to their wall time, scheduling and bookkeeping
included. The fit goes into the table's metadata under ``engine_steps``, per
dtype.

Two kinds of steps are fitted together. A grid of step shapes varied one at
a time (decode batches at short and long contexts, prefill chunks of every
size, a long prompt's chunks at growing context, decodes beside a chunk)
tells the terms apart: under load alone, prefill tokens, attention pairs and
decodes grow together and the fit could trade one for another. Closed-loop
loads (new prompts joining while others decode) then weigh in the mixes a
server really sees. Every step runs as a server's loop runs it
(``ServingLoop``): tokens detokenized, updates published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from xytune.profiler.devices import IDENTITY_KEYS, get_device
from xytune.profiler.table import read_table, write_table

from .engine import Engine, StepOutput, StepStats
from .protocol import StepPublisher
from .sampling import SamplingParams
from .step_predictor import STEP_TERMS, StepPredictor

# (requests kept in flight, token budget): a client holding that many requests open, as a server under load sees
# them: new prompts join while others decode, so steps mix chunks and decodes of every age
CALIBRATION_LOADS = ((1, 512), (4, 512), (16, 512), (48, 512), (8, 2048), (32, 2048))
STEPS_PER_LOAD = 32
PROBES_AT_FIT = 3  # speed probes right after a fit; their median per step kind is stored with it
GRID_MAX_TOKENS = 256  # a grid request's limit: it still decodes when the last of its batch is prefilled
GRID_BUDGET = 2048
PROMPT_TOKENS = (16, 1024)  # prompt lengths, log-uniform
NEW_TOKENS = (8, 160)  # generated tokens, log-uniform


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


class ServingLoop:
    """The engine stepped as a server's loop steps it (``protocol.drive``): every request detokenizes its tokens
    and each step's updates are published, so a fitted step costs what a serving step costs."""

    def __init__(self, engine: Engine):
        self.engine, self.publisher = engine, StepPublisher()

    def add(self, rng: np.random.Generator, prompt_tokens: int, max_tokens: int) -> str:
        vocab = self.engine.model.config.vocab_size
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return self.engine.add_request(rng.integers(100, vocab - 100, prompt_tokens).tolist(), params).request_id

    def step(self) -> StepOutput:
        out = self.engine.step()
        self.publisher.publish(self.engine, out)
        return out

    def timed_step(self, timed: list) -> None:
        """One step, appended to ``timed`` as ``(index into step_stats, seconds)`` (a retried step records none)."""
        before, start = len(self.engine.step_stats), time.perf_counter()
        self.step()
        if len(self.engine.step_stats) > before:
            timed.append((len(self.engine.step_stats) - 1, time.perf_counter() - start))

    def prefill_all(self) -> None:
        """Run (untimed) until every request has its prompt in the cache and is decoding."""
        sched = self.engine.scheduler
        while sched.waiting or any(r.remaining > 1 for r in sched.running):
            self.step()

    def abort_all(self) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self.publisher.forget(rid)


def _closed_loop(loop: ServingLoop, rng: np.random.Generator, in_flight: int, steps: int) -> list[tuple[int, float]]:
    """Keep ``in_flight`` requests open for ``steps`` steps: ``(index into step_stats, seconds)`` per step, each
    from the start of one step to the start of the next (the loop's period, bookkeeping included)."""
    engine = loop.engine
    timed, open_ids = [], set()
    start = time.perf_counter()
    for _ in range(steps):
        while len(open_ids) < in_flight:
            open_ids.add(loop.add(rng, _log_uniform(rng, *PROMPT_TOKENS), _log_uniform(rng, *NEW_TOKENS)))
        before = len(engine.step_stats)
        out = loop.step()
        open_ids -= {r.request_id for r in out.finished}
        now = time.perf_counter()
        if len(engine.step_stats) > before:  # a step retried request by request records nothing
            timed.append((len(engine.step_stats) - 1, now - start))
        start = now
    loop.abort_all()
    return timed


@dataclass(frozen=True)
class StepGrid:
    """Step shapes varied one at a time: decode batches x prompt contexts; decode batches of short requests
    beside one long one (whose tiles pad the short ones': ``decode_terms``); prefill chunks (one prompt each,
    context 0); a long prompt in chunks (tokens fixed, context growing); a decode batch beside each of a few
    chunk sizes."""

    # up to the batches a server near its capacity decodes: a fit whose grid stopped at 32 ran 10-16% high on
    # decodes of 48 requests (model-167 Xeon), where a few percent compound into latency near the knee
    decode_batches: tuple[int, ...] = (1, 4, 16, 32, 48)
    decode_contexts: tuple[int, ...] = (32, 384, 1024)
    decode_steps: int = 4  # decode steps timed per (batch, context), and per skewed batch
    skewed_decodes: tuple[tuple[int, int, int], ...] = ((15, 32, 384), (15, 64, 1024), (31, 128, 512))
    # (short requests, their context, the long one's context)
    prefill_chunks: tuple[int, ...] = (16, 64, 256, 1024, 2048)
    prefill_repeats: int = 3
    long_prompt: tuple[int, int] | None = (2048, 512)  # (prompt tokens, chunk)
    mixed_batches: tuple[int, ...] = (4, 24)
    mixed_chunks: tuple[int, ...] = (64, 512)
    mixed_context: int = 256


FULL_GRID = StepGrid()
# a quarter of the prompt tokens: a first look at a new machine, or a test
QUICK_GRID = StepGrid(decode_batches=(1, 8), decode_contexts=(32, 512), decode_steps=2,
                      skewed_decodes=((7, 32, 512),), prefill_chunks=(16, 256, 1024), prefill_repeats=1,
                      long_prompt=(1024, 512), mixed_batches=(4,), mixed_chunks=(64,))
# a few seconds of steps, half decode-only, half with prompt tokens, for ``machine_speed``
SPEED_PROBE_GRID = StepGrid(decode_batches=(1, 8), decode_contexts=(64,), decode_steps=3, skewed_decodes=(),
                            prefill_chunks=(64, 256), prefill_repeats=2, long_prompt=None, mixed_batches=(4,),
                            mixed_chunks=(64, 256))


def _grid(loop: ServingLoop, rng: np.random.Generator, grid: StepGrid) -> list[tuple[int, float]]:
    """The grid's steps (``StepGrid``), ``(index into step_stats, seconds)`` per step."""
    timed: list[tuple[int, float]] = []
    sched = loop.engine.scheduler
    sched.reconfigure(max_num_batched_tokens=GRID_BUDGET)
    decode_sets = [[context] * batch for context in grid.decode_contexts for batch in grid.decode_batches]
    decode_sets += [[short] * n + [long] for n, short, long in grid.skewed_decodes]
    for contexts in decode_sets:
        for context in contexts:  # generating past the prefill of the others (aborted once timed)
            loop.add(rng, context, GRID_MAX_TOKENS)
        loop.prefill_all()
        for _ in range(grid.decode_steps):
            loop.timed_step(timed)
        loop.abort_all()
    for chunk in grid.prefill_chunks:
        for _ in range(grid.prefill_repeats):
            loop.add(rng, chunk, 1)  # its one step prefills the prompt and samples its only token
            loop.timed_step(timed)
    for batch in grid.mixed_batches:
        for _ in range(batch):
            loop.add(rng, grid.mixed_context, GRID_MAX_TOKENS)
        loop.prefill_all()
        for chunk in grid.mixed_chunks:
            loop.add(rng, chunk, 1)  # joins the decodes for one step
            loop.timed_step(timed)
        loop.abort_all()
    if grid.long_prompt is not None:
        prompt, chunk = grid.long_prompt
        sched.reconfigure(max_num_batched_tokens=chunk)
        loop.add(rng, prompt, 1)
        for _ in range(-(-prompt // chunk)):
            loop.timed_step(timed)
    return timed


def step_features(predictor: StepPredictor, s: StepStats) -> np.ndarray:
    """The step predictor's terms of one recorded step."""
    return predictor.features(s.num_tokens, s.num_logit_rows, s.attention_pairs, s.decode_tiles, s.decode_keys,
                              s.planned_requests, s.looped_requests)


STEP_KINDS = ("decode", "prefill")  # decode-only steps (memory-bound on a CPU), steps with prompt tokens


def step_kind(s: StepStats) -> str:
    return "prefill" if s.num_prefill_tokens else "decode"


def speed_ratio(steps: list[tuple[StepStats, float]], fit: StepPredictor) -> dict[str, float]:
    """Per step kind (``STEP_KINDS``), the median over ``(step, seconds)`` of measured over ``fit``'s prediction:
    above 1, this machine now runs those steps slower than when the fit's steps were timed. A kind the steps lack
    takes the median over all of them."""
    ratios = {kind: [] for kind in STEP_KINDS}
    for s, seconds in steps:
        ratios[step_kind(s)].append(seconds / float(step_features(fit, s) @ fit.coef))
    every = [r for kind in STEP_KINDS for r in ratios[kind]]
    return {kind: float(np.median(ratios[kind] or every)) for kind in STEP_KINDS}


def probe_steps(engine: Engine, fit: StepPredictor, seed: int | None = None) -> dict[str, float]:
    """``speed_ratio`` of a few seconds of steps of every kind (``SPEED_PROBE_GRID``) against ``fit``, as read.
    The engine must be idle; its scheduler settings are restored afterwards (its live step predictor sees the
    probe's steps, as it sees any other). Prompts are fresh random tokens each time (``seed`` None), so a prefix
    cache cannot shorten the probe's prefills.

    The grid runs twice and only the second pass is read, as the fit reads only its own second pass: on a
    2-core Xeon the first probe after a 43 s replay once read 1.31 where the next three read 1.02-1.04."""
    if fit.coef is None:
        raise ValueError("probing the machine's speed needs a table with an engine-step fit (calibrate-steps).")
    config, loop = engine.scheduler.config, ServingLoop(engine)
    try:
        engine.scheduler.reconfigure(policy="chunked", max_num_seqs=max(config.max_num_seqs, 8))
        rng = np.random.default_rng(seed)
        _grid(loop, rng, SPEED_PROBE_GRID)  # settles the machine after whatever ran before; not read
        timed = _grid(loop, rng, SPEED_PROBE_GRID)
    finally:
        loop.abort_all()
        engine.scheduler.config = config
    return speed_ratio([(engine.step_stats[i], seconds) for i, seconds in timed], fit)


def machine_speed(engine: Engine, fit: StepPredictor, seed: int | None = None) -> dict[str, float]:
    """How fast this machine runs whole engine steps now against when ``fit`` (a table's engine-step fit, as the
    simulator uses it) was made, per step kind: above 1, slower now.

    A figure measured on a machine is a fact about that machine at that time; a VM whose speed drifts between
    the calibration and a run makes any prediction from the table off by the drift, and memory-bound decode
    steps and compute-bound prefills drift apart. Probing just before a run tells the drift apart from the
    simulator's own error. The probe's reading is divided by what the same probe read right after the fit
    (``probe_at_fit``): the fit's own error on the probe's few step shapes (about 10% on the model-167 Xeon)
    is not drift. A fit made before that was stored is read as is."""
    ratios = probe_steps(engine, fit, seed)
    at_fit = fit.probe_at_fit or {}
    return {kind: ratio / at_fit.get(kind, 1.0) for kind, ratio in ratios.items()}


def calibrate_engine_steps(engine: Engine, seed: int = 0, steps_per_load: int = STEPS_PER_LOAD,
                           grid: StepGrid = FULL_GRID) -> dict:
    """Fit the step predictor's terms to whole steps of ``engine`` (which needs a cost table): the grid and the
    closed-loop loads; its scheduler settings are restored afterwards. Returns what ``engine_steps`` stores
    for its dtype.

    Everything runs twice and only the second pass is fitted: the first compiles kernels and maps memory for
    the step sizes the second will see, as a server that has run a while has.
    """
    if engine.predictor is None:
        raise ValueError("calibrating engine steps needs the engine's cost table (profile=TABLE).")
    config = engine.scheduler.config
    tile_kv = engine.predictor.tile_kv
    predictor = StepPredictor(engine.predictor.cost_model, engine.predictor.dtype, tile_kv=tile_kv)
    rows, loop = [], ServingLoop(engine)
    try:
        for measured in (False, True):
            rng = np.random.default_rng(seed)
            engine.scheduler.reconfigure(policy="chunked", max_num_seqs=max(config.max_num_seqs,
                                                                            *grid.decode_batches, *grid.mixed_batches))
            timed = _grid(loop, rng, grid)
            for in_flight, budget in CALIBRATION_LOADS:
                engine.scheduler.reconfigure(policy="chunked", max_num_batched_tokens=budget,
                                             max_num_seqs=max(config.max_num_seqs, in_flight))
                timed += _closed_loop(loop, rng, in_flight, steps_per_load)
            if measured:
                rows += [(step_features(predictor, engine.step_stats[index]), seconds) for index, seconds in timed]
    finally:
        loop.abort_all()
        engine.scheduler.config = config
    coef = predictor.fit(rows)
    fitted = np.array([float(f @ coef) for f, _ in rows])
    actual = np.array([a for _, a in rows])
    ape = np.abs(fitted - actual) / actual
    # the speed probe's reading now, the reference later probes are divided by (``machine_speed``)
    readings = [probe_steps(engine, predictor) for _ in range(PROBES_AT_FIT)]
    probe_at_fit = {kind: float(np.median([r[kind] for r in readings])) for kind in STEP_KINDS}
    return {"coef": dict(zip(STEP_TERMS, map(float, coef))), "steps": len(rows),
            "median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90)), "tile_kv": tile_kv,
            "probe_at_fit": probe_at_fit, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def calibrate_table(path: str, model: str | None = None, device: str | None = None, dtypes: list[str] | None = None,
                    threads: int | None = None, progress=None, steps_per_load: int = STEPS_PER_LOAD,
                    quick: bool = False) -> dict[str, dict]:
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
        grid = QUICK_GRID if quick else FULL_GRID
        fits[dtype] = {**calibrate_engine_steps(llm.engine, steps_per_load=steps_per_load, grid=grid),
                       "model": llm.model_name, "grid": "quick" if quick else "full"}
        del llm
    table = read_table(path)  # re-read: nothing else of the table changes
    table.meta["engine_steps"] = {**(table.meta.get("engine_steps") or {}), **fits}
    write_table(path, table)
    return fits
