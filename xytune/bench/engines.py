"""``xytune bench engines``: scheduling policies side by side on the engine alone.

The trace of ``bench servers`` (the same seeded prompts and Poisson
arrivals) is replayed in real time against one in-process engine per policy,
with no HTTP server and no benchmark client sharing the CPU. On a small
machine those two wake up inside the engine's steps at random, and the
noise they add can be larger than the differences between policies; here
what is left is the policy.

Each engine is built once, warmed up on a few of the trace's prompts (so the
variant that runs first does not pay alone for compiling kernels, mapping
memory and fitting its step predictor) and keeps its state from rate to
rate, as a server would; at every rate the policies take turns. A request's TTFT counts from the moment it was due, not from
when the loop got to it (a request that arrives during a step waits for
it, as it would behind a server), and TPOT from the engine's own
timestamps of its first and last token.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from xytune.bench.serve import BenchPrompt, RequestResult, arrival_times, capacity, summarize
from xytune.runtime.engine.engine import Engine
from xytune.runtime.engine.protocol import AddRequest, RequestRejected, StepDone, StopEngine, drive
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.engine.scheduler import POLICIES
from xytune.runtime.llm import LLM


def replay(engine, prompts: list[BenchPrompt], rate: float, seed: int) -> tuple[list[RequestResult], float]:
    """Run ``prompts`` (token ids) through ``engine`` with Poisson arrivals at ``rate``; results and wall time."""
    due = arrival_times(len(prompts), rate, seed)  # the arrivals bench serve sends
    start = time.perf_counter()
    sent, finished = 0, []

    def receive(wait_s: float) -> list:
        """The requests due by now; an idle engine sleeps until the next one is."""
        nonlocal sent
        now = time.perf_counter() - start
        if sent < len(prompts) and wait_s > 0 and due[sent] > now:
            time.sleep(min(float(due[sent]) - now, wait_s))
            now = time.perf_counter() - start
        commands = []
        while sent < len(prompts) and due[sent] <= now:
            p = prompts[sent]
            params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
            # it waited for the step that was running when it arrived
            commands.append(AddRequest(f"bench-{sent}", p.prompt, params, arrival=start + float(due[sent])))
            sent += 1
        return commands + ([StopEngine()] if sent == len(prompts) else [])

    def publish(msg) -> None:
        if isinstance(msg, StepDone):
            finished.extend(msg.finished)
        elif isinstance(msg, RequestRejected):
            raise RuntimeError(msg.message)

    drive(engine, receive, publish)
    wall = time.perf_counter() - start
    results = [RequestResult(ok=True, ttft_s=r.first_token_time - r.arrival, latency_s=r.finish_time - r.arrival,
                             output_tokens=r.num_output_tokens, input_tokens=r.num_prompt_tokens) for r in finished]
    return results, wall


def step_summary(steps) -> dict:
    """How a policy cut the work into steps: counts, prefill tokens per step that had any, step times."""
    prefill = np.array([s.num_prefill_tokens for s in steps])
    seconds = np.array([s.seconds for s in steps])
    mixed = prefill > 0

    def median_ms(mask):
        return float(np.median(seconds[mask]) * 1e3) if mask.any() else None

    return {"steps": len(steps), "steps_with_prefill": int(mixed.sum()),
            "prefill_tokens_per_prefill_step": float(prefill[mixed].mean()) if mixed.any() else None,
            "decode_only_step_ms_p50": median_ms(~mixed), "prefill_step_ms_p50": median_ms(mixed),
            "busy_s": float(seconds.sum())}


def parse_policies(spec: str) -> dict[str, dict]:
    """``xy,chunked@256`` -> {variant name: LLM keyword overrides}; ``@N`` sets that variant's token budget."""
    variants = {}
    for name in (p.strip() for p in spec.split(",")):
        if not name:
            continue
        policy, _, budget = name.partition("@")
        if policy not in POLICIES or (budget and (not budget.isdigit() or int(budget) < 1)) or name in variants:
            raise ValueError(f"--policies takes distinct names out of {', '.join(POLICIES)}, each optionally "
                             f"@N with N a positive token budget, not {spec!r}.")
        variants[name] = {"policy": policy, **({"max_num_batched_tokens": int(budget)} if budget else {})}
    if not variants:
        raise ValueError("--policies names no policy.")
    return variants


WARMUP_PROMPTS = 8


def run(policies: dict[str, dict], llm_kwargs: dict, prompts: list[BenchPrompt], rates: list[float], seed: int,
        slo_ttft_ms: float, slo_tpot_ms: float, progress=None, repeats: int = 1,
        speed_probe: Callable[[Engine], dict[str, float]] | None = None) -> dict:
    """Capacity of each policy variant on one trace, in the result format of ``bench servers`` (so one renderer).

    ``policies``: variant name -> LLM keyword overrides (see ``parse_policies``).

    ``repeats``: each rate is replayed this many times (arrivals seeded ``seed``, ``seed + 1``, ...), the
    policies taking turns at every repeat, and a rate's figures pool all of its requests: on a machine
    whose speed drifts, one slow stretch then moves one share of a rate's requests, not all of them.

    ``speed_probe(engine)``: run before the first replay and after every one (``step_calibration.machine_speed``),
    so that each run lies between two probes. A VM's speed can move within a run; the mean of the probes on
    either side (per step kind) is the run's ``machine_speed``, and a rate's row carries the median over its
    runs; with ``repeats`` above 1 each run's entry in the row's ``repeats`` also keeps the two readings.
    """
    if progress:
        progress("loading one engine per policy...")
    engines = {name: LLM(**{**llm_kwargs, **overrides}).engine for name, overrides in policies.items()}
    for name, engine in engines.items():  # as a server that has seen traffic: kernels compiled, memory mapped,
        if progress:  # the step predictor fitted; the variant that runs first would otherwise pay for it alone
            progress(f"warming up {name}...")
        replay(engine, prompts[:WARMUP_PROMPTS], float("inf"), seed)
        engine.step_stats.clear()
    rows: dict[str, list[dict]] = {p: [] for p in policies}
    before = None
    if speed_probe is not None:
        if progress:
            progress("probing the machine's speed before the first run...")
        before = speed_probe(next(iter(engines.values())))
    for rate in rates:
        pooled = {p: ([], 0.0, []) for p in policies}
        each = {p: [] for p in policies}  # every repeat's own figures: how far the machine moves between runs
        for rep in range(repeats):
            for p, engine in engines.items():
                if progress:
                    progress(f"rate {rate:g} req/s on {p} ({rep + 1}/{repeats}): {len(prompts)} requests...")
                first_step = len(engine.step_stats)
                results, wall = replay(engine, prompts, rate, seed + rep)
                results_so_far, wall_so_far, steps = pooled[p]
                pooled[p] = (results_so_far + results, wall_so_far + wall, steps + engine.step_stats[first_step:])
                speed = {}
                if speed_probe is not None:
                    if progress:
                        progress(f"probing the machine's speed after {p} at {rate:g} req/s...")
                    after = speed_probe(engine)
                    speed = {"machine_speed": {kind: (before[kind] + after[kind]) / 2 for kind in before},
                             "machine_speed_before": before, "machine_speed_after": after}
                    before = after
                each[p].append({**summarize(results, wall, rate, slo_ttft_ms, slo_tpot_ms), **speed})
        for p, (results, wall, steps) in pooled.items():
            row = {**summarize(results, wall, rate, slo_ttft_ms, slo_tpot_ms), "steps": step_summary(steps)}
            if speed_probe is not None:
                row["machine_speed"] = {kind: float(np.median([r["machine_speed"][kind] for r in each[p]]))
                                        for kind in each[p][0]["machine_speed"]}
            rows[p].append({**row, "repeats": each[p]} if repeats > 1 else row)
    variants = []
    for p, engine in engines.items():
        err = engine.predictor.error_summary()["median_ape"] if engine.predictor is not None else None
        budget = engine.scheduler.config.max_num_batched_tokens
        variants.append({"name": p, "args": ["--policy", policies[p]["policy"], "--max-num-batched-tokens",
                                             str(budget)], "rows": rows[p],
                         "server": {"xytune_cost_model_step_error_ratio": err}})
    return {"rates": rates, "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "repeats": repeats,
            "capacity": {p: capacity(rows[p]) for p in policies}, "variants": variants}
