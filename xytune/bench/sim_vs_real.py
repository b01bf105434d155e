"""``xytune bench sim-vs-real``: the serving simulator against the real engine, one trace, side by side.

The same prompts, arrivals, policies and SLOs go through ``bench engines``
(the real in-process engine, timed) and through the simulator on the same
cost table (``xytune tune``'s model of the machine); the report is the
simulator's error per rate on the latency percentiles and on capacity.
The goals (issue "Autotune the serving settings"): capacity within one rate
step, and TTFT/TPOT p50 and p90 within 15% at the rates below the knee
(where the real engine meets the SLOs).

The simulator predicts the machine as it was when the table's steps were
timed. A VM's speed drifts, sometimes by more than the goal between the
calibration and a run and within a run, so before the first real run and
after every one the bench also times a second of fixed steps
(``machine_speed``: their time over what the same probe took right after
the fit) and simulates the trace a second time with each rate's
decode-only and prefill steps scaled by the mean of the probes on either
side of its runs, per kind: the first errors say how well the table
predicts this machine now, the second how well the simulator's model of
steps and scheduling does once the machine's speed is taken out.
"""

from __future__ import annotations

from rich.table import Table

from xytune.bench import engines as engines_bench
from xytune.bench.serve import BenchPrompt, capacity
from xytune.runtime.engine.simulator import step_model
from xytune.runtime.engine.step_calibration import STEPS_PER_LOAD, StepGrid, calibrate_engine_steps, machine_speed
from xytune.runtime.llm import LLM
from xytune.tune import ATTAINMENT, Candidate, Simulator, Workload

METRICS = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms")
LATENCY_GOAL = 0.15


def candidate_of(overrides: dict, max_num_batched_tokens: int, tbt_slo_ms: float | None) -> Candidate:
    """The simulator's setting for one ``bench engines`` variant (LLM keyword overrides)."""
    return Candidate(overrides["policy"], overrides.get("max_num_batched_tokens", max_num_batched_tokens), 256,
                     tbt_slo_ms=tbt_slo_ms)


def real_spread(row: dict) -> dict:
    """Per latency metric, how far the real engine's own repeats of one rate lie apart (max - min over the
    pooled figure); empty for a single run. On a machine whose speed drifts from minute to minute this is the
    floor under the simulator's error: the same trace, run twice, differs by this much."""
    runs = row.get("repeats") or []
    if len(runs) < 2:
        return {}
    return {m: (max(r[m] for r in runs) - min(r[m] for r in runs)) / row[m]
            if row.get(m) and all(r.get(m) is not None for r in runs) else None for m in METRICS}


def compare(real: dict, simulated: dict) -> dict:
    """Per variant and rate, the simulator's relative error on each latency metric; capacity in rate steps."""
    rates = real["rates"]
    out = {}
    for rv, sv in zip(real["variants"], simulated["variants"]):
        rows = []
        for r, s in zip(rv["rows"], sv["rows"]):
            errors = {m: (s[m] - r[m]) / r[m] if r.get(m) and s.get(m) is not None else None for m in METRICS}
            rows.append({"rate": r["request_rate"], "machine_speed": r.get("machine_speed"),
                         "below_knee": r["slo_attainment"] >= ATTAINMENT,
                         "attainment": (r["slo_attainment"], s["slo_attainment"]), "errors": errors,
                         "real_spread": real_spread(r), "real": {m: r.get(m) for m in METRICS},
                         "sim": {m: s.get(m) for m in METRICS}})
        rc, sc = real["capacity"][rv["name"]], simulated["capacity"][sv["name"]]
        steps = None if rc is None or sc is None else abs(rates.index(rc) - rates.index(sc))
        below = [abs(e) for row in rows if row["below_knee"] for e in row["errors"].values() if e is not None]
        spread = [e for row in rows if row["below_knee"] for e in row["real_spread"].values() if e is not None]
        out[rv["name"]] = {"rows": rows, "capacity": (rc, sc), "capacity_rate_steps": steps,
                           "max_error_below_knee": max(below) if below else None,
                           "max_real_spread_below_knee": max(spread) if spread else None,
                           "capacity_goal_met": (rc is None and sc is None) or steps is not None and steps <= 1,
                           "latency_goal_met": bool(below) and max(below) <= LATENCY_GOAL}
    return out


def run(policies: dict[str, dict], llm_kwargs: dict, sim: Simulator, prompts: list[BenchPrompt],
        rates: list[float], seed: int, slo_ttft_ms: float, slo_tpot_ms: float, repeats: int = 1,
        progress=None, probe_speed: bool = True, recalibrate: StepGrid | None = None,
        steps_per_load: int = STEPS_PER_LOAD) -> dict:
    """The real engines (``bench engines``), then the simulator on the same trace; both results and the errors.
    ``probe_speed``: also probe the machine's speed on either side of every real run and simulate again at it.
    ``recalibrate``: first fit whole engine steps on this machine now over this grid (and ``steps_per_load``
    closed-loop steps per load) and simulate from that fit instead of the table's (the table file is left as
    it is)."""
    fresh_fit = None
    if recalibrate is not None:
        if progress:
            progress("fitting whole engine steps on this machine now...")
        engine = LLM(**{**llm_kwargs, "policy": "chunked"}).engine
        fresh_fit = calibrate_engine_steps(engine, steps_per_load=steps_per_load, grid=recalibrate)
        del engine
        sim = Simulator(sim.cost_model, sim.dtype, *step_model(sim.cost_model, sim.dtype, fresh_fit))
    probe = (lambda engine: machine_speed(engine, sim.truth)) if probe_speed else None
    real = engines_bench.run(policies, llm_kwargs, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms, progress, repeats,
                             speed_probe=probe)
    if progress:
        progress("simulating the same trace...")
    workload = Workload(prompts, seed, kv_cache_gb=llm_kwargs.get("kv_cache_gb", 1.0),
                        enable_prefix_caching=llm_kwargs.get("enable_prefix_caching", False))

    def simulate(at_measured_speed: bool) -> dict:
        variants = []
        for (name, overrides), rv in zip(policies.items(), real["variants"]):
            c = candidate_of(overrides, llm_kwargs["max_num_batched_tokens"], llm_kwargs.get("tbt_slo_ms"))
            speeds = {r["request_rate"]: r["machine_speed"] for r in rv["rows"]} if at_measured_speed else None
            variants.append({"name": name, "rows": sim.sweep(c, workload, rates, slo_ttft_ms, slo_tpot_ms, repeats,
                                                             speeds=speeds)})
        return {"rates": rates, "capacity": {v["name"]: capacity(v["rows"]) for v in variants},
                "variants": variants, "step_model": sim.source}

    simulated = simulate(False)
    result = {"real": real, "simulated": simulated, "errors": compare(real, simulated), "fresh_fit": fresh_fit}
    if probe_speed:
        result["simulated_at_measured_speed"] = at_speed = simulate(True)
        result["errors_at_measured_speed"] = compare(real, at_speed)
    return result


def pct(e: float | None) -> str:
    return "-" if e is None else f"{e:+.0%}"


def verdict(v: dict) -> str:
    """One variant's capacity and largest latency error below the knee, against the goals."""
    rc, sc = v["capacity"]
    worst = v["max_error_below_knee"]
    return (f"capacity real {rc if rc is not None else 'none'} / simulated {sc if sc is not None else 'none'} "
            f"req/s ({'within' if v['capacity_goal_met'] else 'NOT within'} one rate step); largest "
            f"latency error below the knee {'-' if worst is None else f'{worst:.0%}'} (goal "
            f"{LATENCY_GOAL:.0%}: {'met' if v['latency_goal_met'] else 'not met'})")


def render(result: dict, console) -> None:
    def pair(a, b):
        return "-/-" if a is None or b is None else f"{a:.0f}/{b:.0f}"

    console.print(f"simulator step model: {result['simulated']['step_model']}", highlight=False)
    for name, v in result["errors"].items():
        t = Table("rate req/s", "SLO met real/sim", "TTFT p50 ms real/sim", "err", "TTFT p90", "err",
                  "TPOT p50", "err", "TPOT p90", "err", title=f"{name}: simulator against the real engine")
        for row in v["rows"]:
            cells = []
            for m in METRICS:
                cells += [pair(row["real"][m], row["sim"][m]), pct(row["errors"][m])]
            ra, sa = row["attainment"]
            t.add_row(f"{row['rate']:g}" + ("" if row["below_knee"] else " (past knee)"), f"{ra:.0%}/{sa:.0%}", *cells)
        console.print(t)
        console.print(verdict(v), highlight=False)
        if (spread := v["max_real_spread_below_knee"]) is not None:
            console.print(f"the real engine's own repeats below the knee lie up to {spread:.0%} apart (the same "
                          "trace, run again on this machine)", highlight=False)
        if "errors_at_measured_speed" in result:
            render_at_speed(name, result["errors_at_measured_speed"][name], v, console)


def render_at_speed(name: str, v: dict, raw: dict, console) -> None:
    """The second simulation's errors: each rate's steps scaled by the machine's speed probed around its runs."""
    t = Table("rate req/s", "machine now / at the fit: decode / prefill steps", "TTFT p50 err", "TTFT p90 err",
              "TPOT p50 err", "TPOT p90 err", title=f"{name}: simulated at the machine's measured speed")
    for row in v["rows"]:
        speed = row["machine_speed"]
        t.add_row(f"{row['rate']:g}" + ("" if row["below_knee"] else " (past knee)"),
                  f"x{speed['decode']:.2f} / x{speed['prefill']:.2f}", *(pct(row["errors"][m]) for m in METRICS))
    console.print(t)
    console.print(f"at the measured speed: {verdict(v)} (from the table alone: "
                  f"{'met' if raw['latency_goal_met'] else 'not met'})", highlight=False)
