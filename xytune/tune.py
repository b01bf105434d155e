"""``xytune tune``: serving settings searched with the serving simulator, on a cost table alone.

Each candidate (policy, token budget, max_num_seqs, the xy policy's chunk
alignment and step target, speculative tokens) replays one workload at a
sweep of request rates in the simulator (``runtime/engine/simulator.py``);
its capacity is the highest rate at which at least 90% of requests meet both
SLOs, as ``xytune bench engines`` measures it on the real engine. Small
spaces are searched whole; large ones with Optuna's TPE sampler, seeded.
The results have the JSON shape of ``bench engines``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import optuna

from xytune.bench.engines import WARMUP_PROMPTS, step_summary
from xytune.bench.serve import BenchPrompt, RequestResult, arrival_times, capacity, summarize
from xytune.profiler.cost_model import CostModel
from xytune.profiler.primitives import DTYPES
from xytune.runtime.engine.kv_cache import bytes_per_block
from xytune.runtime.engine.scheduler import POLICIES, SchedulerConfig
from xytune.runtime.engine.simulator import SimulatedEngine, TraceRequest, step_model
from xytune.runtime.engine.speculative import SpeculativeConfig
from xytune.runtime.engine.step_predictor import StepPredictor

ATTAINMENT = 0.9  # the share of requests that must meet both SLOs at a rate the candidate can serve
GRID_LIMIT = 48  # spaces up to this many candidates are simulated whole; larger ones are sampled


class TuneError(ValueError):
    """Input the tuner cannot use; one sentence."""


@dataclass(frozen=True)
class Candidate:
    """One setting of the engine's scheduler, as ``xytune serve`` and ``LLM(...)`` take it."""

    policy: str = "chunked"
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    align: int = 16  # xy: prefill chunks that do not finish a prompt end on this many tokens
    tbt_slo_ms: float | None = None  # xy: its own step-time target (None: the TPOT SLO)
    num_speculative_tokens: int = 0  # 0: no speculative decoding

    @property
    def name(self) -> str:
        parts = [self.policy, f"budget {self.max_num_batched_tokens}", f"seqs {self.max_num_seqs}"]
        if self.policy == "xy":
            parts += [f"align {self.align}", f"step {self.tbt_slo_ms:g} ms" if self.tbt_slo_ms else "step = TPOT"]
        if self.num_speculative_tokens:
            parts.append(f"spec {self.num_speculative_tokens}")
        return ", ".join(parts)

    def scheduler_config(self, slo_ttft_ms: float, slo_tpot_ms: float) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.policy, self.tbt_slo_ms,
                               self.align, ttft_slo_ms=slo_ttft_ms, tpot_slo_ms=slo_tpot_ms)

    def serve_flags(self) -> list[str]:
        """The `xytune serve` flags of this setting."""
        flags = ["--policy", self.policy, "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                 "--max-num-seqs", str(self.max_num_seqs)]
        if self.policy == "xy":
            flags += ["--align", str(self.align)] + (["--tbt-slo-ms", f"{self.tbt_slo_ms:g}"] if self.tbt_slo_ms
                                                     else [])
        if self.num_speculative_tokens:
            flags += ["--speculative", "ngram", "--num-speculative-tokens", str(self.num_speculative_tokens)]
        return flags


@dataclass
class Workload:
    """What the simulated server is loaded with, and the server's memory."""

    prompts: list[BenchPrompt]  # token-id prompts, each run to its max_tokens
    seed: int = 0
    acceptance_rate: float = 0.0  # per draft token, when a candidate speculates
    kv_cache_gb: float = 1.0  # as `xytune serve --kv-cache-gb`
    block_size: int = 16
    enable_prefix_caching: bool = False

    def __post_init__(self):
        if not self.prompts:
            raise TuneError("the workload has no requests.")
        if not all(isinstance(p.prompt, list) for p in self.prompts):
            raise TuneError("the simulator takes token-id prompts; tokenize text prompts first.")
        if not 0.0 <= self.acceptance_rate <= 1.0:
            raise TuneError(f"--acceptance-rate must be within [0, 1], not {self.acceptance_rate:g}.")
        if self.kv_cache_gb <= 0:
            raise TuneError("--kv-cache-gb must be positive.")

    def trace(self, rate: float, seed: int, prompts: list[BenchPrompt] | None = None) -> list[TraceRequest]:
        """The prompts with the Poisson arrivals ``bench engines`` gives them at ``rate``."""
        prompts = self.prompts if prompts is None else prompts
        due = arrival_times(len(prompts), rate, seed)
        return [TraceRequest(float(t), p.prompt, p.max_tokens) for t, p in zip(due, prompts)]


@dataclass
class Simulator:
    """The table's side of a simulation: the cost model, the dtype served and the step-time model."""

    cost_model: CostModel
    dtype: str
    truth: StepPredictor | None = None  # from simulator.step_model, shared by every candidate
    source: str = ""

    def __post_init__(self):
        if self.dtype not in self.cost_model.dtypes:
            raise TuneError(f"the table has no {self.dtype} rows (it has {', '.join(self.cost_model.dtypes)}).")
        if self.truth is None:
            self.truth, self.source = step_model(self.cost_model, self.dtype)

    def engine(self, candidate: Candidate, workload: Workload, slo_ttft_ms: float, slo_tpot_ms: float
               ) -> SimulatedEngine:
        g = self.cost_model.geometry
        per_block = bytes_per_block(g.num_layers, workload.block_size, g.kv_heads_per_rank, g.head_dim,
                                    DTYPES[self.dtype])
        spec = SpeculativeConfig(num_speculative_tokens=candidate.num_speculative_tokens) \
            if candidate.num_speculative_tokens else None
        return SimulatedEngine(self.cost_model, self.dtype, candidate.scheduler_config(slo_ttft_ms, slo_tpot_ms),
                               int(workload.kv_cache_gb * 2**30 // per_block), workload.block_size,
                               enable_prefix_caching=workload.enable_prefix_caching, speculative=spec,
                               acceptance_rate=workload.acceptance_rate, seed=workload.seed, truth=self.truth)

    def sweep(self, candidate: Candidate, workload: Workload, rates: list[float], slo_ttft_ms: float,
              slo_tpot_ms: float, repeats: int = 1, stop_after_miss: bool = False,
              speeds: dict[float, dict[str, float]] | None = None) -> list[dict]:
        """One row per rate (``bench engines``' keys) for the candidate, its engine kept from rate to rate and
        warmed up first, as the real benchmark does. ``stop_after_miss``: stop at the first rate under the
        attainment (a search does not need the rates past a candidate's knee). ``speeds``: per rate, a factor on
        each kind of step's time (a machine measured that much slower than its table, ``machine_speed``)."""
        engine = self.engine(candidate, workload, slo_ttft_ms, slo_tpot_ms)
        engine.replay(workload.trace(math.inf, workload.seed, workload.prompts[:WARMUP_PROMPTS]))
        rows = []
        for rate in sorted(rates):
            engine.speed = (speeds or {}).get(rate)
            results, duration, steps = [], 0.0, []
            for rep in range(repeats):
                sim = engine.replay(workload.trace(rate, workload.seed + rep))
                results += [RequestResult(True, r.first_token_s - r.arrival_s, r.finish_s - r.arrival_s,
                                          r.output_tokens, r.input_tokens, r.itl_s) for r in sim.requests]
                duration += sim.duration_s
                steps += sim.steps
            rows.append({**summarize(results, duration, rate, slo_ttft_ms, slo_tpot_ms), "steps": step_summary(steps)})
            if stop_after_miss and rows[-1]["slo_attainment"] < ATTAINMENT:
                break
        return rows


@dataclass(frozen=True)
class SearchSpace:
    """The settings worth simulating on a table: every policy, token budgets and sequence limits within what
    the table measured (powers of two), and for xy the chunk alignments and step targets."""

    policies: tuple[str, ...]
    budgets: tuple[int, ...]
    seqs: tuple[int, ...]
    aligns: tuple[int, ...]
    step_targets_ms: tuple[float | None, ...]
    speculative_tokens: tuple[int, ...]

    @classmethod
    def for_table(cls, cost_model: CostModel, slo_tpot_ms: float, speculative_tokens: tuple[int, ...] = (0,)
                  ) -> "SearchSpace":
        sweep = cost_model.meta.get("sweep", {})
        max_m = max(sweep.get("buckets") or [4096])
        max_seqs = int(sweep.get("max_seqs") or 256)
        return cls(POLICIES, tuple(b for b in (128, 256, 512, 1024, 2048, 4096) if b <= max_m) or (max_m,),
                   tuple(n for n in (16, 32, 64, 128, 256) if n <= max_seqs) or (max_seqs,), (16, 64),
                   (None, slo_tpot_ms / 2), speculative_tokens)

    def candidates(self) -> list[Candidate]:
        out = []
        for policy, budget, n, spec in itertools.product(self.policies, self.budgets, self.seqs,
                                                         self.speculative_tokens):
            if budget < n:
                continue  # vLLM requires max_num_batched_tokens >= max_num_seqs
            if policy != "xy":
                out.append(Candidate(policy, budget, n, num_speculative_tokens=spec))
                continue
            for align, step in itertools.product(self.aligns, self.step_targets_ms):
                out.append(Candidate(policy, budget, n, align, step, spec))
        return out

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """One candidate drawn by Optuna (define-by-run: xy's own settings only for xy)."""
        policy = trial.suggest_categorical("policy", list(self.policies))
        budget = trial.suggest_categorical("max_num_batched_tokens", list(self.budgets))
        n = trial.suggest_categorical("max_num_seqs", list(self.seqs))
        spec = trial.suggest_categorical("num_speculative_tokens", list(self.speculative_tokens))
        if budget < n:
            raise optuna.TrialPruned()
        if policy != "xy":
            return Candidate(policy, budget, n, num_speculative_tokens=spec)
        align = trial.suggest_categorical("align", list(self.aligns))
        step = self.step_targets_ms[trial.suggest_categorical("step_target", list(range(len(self.step_targets_ms))))]
        return Candidate(policy, budget, n, align, step, spec)


@dataclass
class Scored:
    candidate: Candidate
    rows: list[dict]

    @property
    def capacity(self) -> float | None:
        return capacity(self.rows, ATTAINMENT)

    @property
    def key(self) -> tuple:
        """Higher is better: capacity, then the attainment and goodput at the first rate it missed."""
        cap = self.capacity or 0.0
        past = [r for r in self.rows if r["request_rate"] > cap]
        nxt = past[0] if past else self.rows[-1]
        return cap, round(nxt["slo_attainment"], 3), round(nxt["request_goodput"], 2)

    def at_capacity(self) -> dict:
        cap = self.capacity
        return next((r for r in self.rows if r["request_rate"] == cap), None) or max(
            self.rows, key=lambda r: r["slo_attainment"])


def default_rates(sim: Simulator, workload: Workload, slo_ttft_ms: float, slo_tpot_ms: float,
                  points: int = 10) -> list[float]:
    """A rate sweep around where vLLM's default settings (chunked, 2048 tokens, 256 sequences) stop meeting
    the SLOs on this table: double from 1/16 req/s until they miss, then ``points`` rates from a quarter of
    that to twice it, so candidates both worse and better than the default have room."""
    probe = Candidate("chunked", 2048, 256)
    rate = 1 / 16
    while rate < 4096:
        row = sim.sweep(probe, workload, [rate], slo_ttft_ms, slo_tpot_ms)[0]
        if row["slo_attainment"] < ATTAINMENT:
            break
        rate *= 2
    lo, hi = rate / 4, rate * 2
    return sorted({float(f"{x:.3g}") for x in np.geomspace(lo, hi, points)})


@dataclass
class TuneResult:
    ranked: list[Scored]  # best first
    rates: list[float]
    source: str  # where the step times came from
    trials: int

    @property
    def winner(self) -> Scored:
        return self.ranked[0]

    @property
    def met(self) -> bool:
        return self.winner.capacity is not None

    def why(self) -> str:
        """Why the winner won, in one sentence from the simulated figures."""
        w = self.winner
        if not self.met:
            best = w.at_capacity()
            return (f"no setting meets the SLOs for {ATTAINMENT:.0%} of requests at any swept rate; the closest, "
                    f"{w.candidate.name}, meets them for {best['slo_attainment']:.0%} at {best['request_rate']:g} "
                    f"req/s (TTFT p90 {_ms(best, 'p90_ttft_ms')}, TPOT p90 {_ms(best, 'p90_tpot_ms')})")
        cap = w.capacity
        ties = [s for s in self.ranked[1:] if s.key == w.key]
        text = f"{w.candidate.name} serves up to {cap:g} req/s within the SLOs"
        if ties:
            text += f" (tied with {len(ties)} other setting{'s' if len(ties) > 1 else ''} on every simulated figure)"
        runner = next((s for s in self.ranked[1:] if s.key != w.key), None)
        if runner is None:
            return text
        if (runner.capacity or 0) < cap:
            return f"{text}; the next best, {runner.candidate.name}, {runner.capacity or 0:g} req/s"
        _, att, good = w.key
        return (f"{text}, as does {runner.candidate.name}, but past that rate it keeps {att:.0%} of requests "
                f"within the SLOs (goodput {good:.2f} req/s) against {runner.key[1]:.0%} ({runner.key[2]:.2f})")


def _ms(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else f"{row[key]:.0f} ms"


def tune(sim: Simulator, workload: Workload, slo_ttft_ms: float, slo_tpot_ms: float, space: SearchSpace,
         rates: list[float] | None = None, trials: int = 40, seed: int = 0, progress=None) -> TuneResult:
    """Simulate the candidates (all of them when few, else ``trials`` drawn by Optuna's TPE) and rank them."""
    if slo_ttft_ms <= 0 or slo_tpot_ms <= 0:
        raise TuneError("--slo-ttft-ms and --slo-tpot-ms must be positive.")
    rates = rates or default_rates(sim, workload, slo_ttft_ms, slo_tpot_ms)
    scored: dict[Candidate, Scored] = {}

    def evaluate(c: Candidate) -> Scored:
        if c not in scored:
            if progress:
                progress(f"simulating {c.name} ({len(scored) + 1})...")
            scored[c] = Scored(c, sim.sweep(c, workload, rates, slo_ttft_ms, slo_tpot_ms, stop_after_miss=True))
        return scored[c]

    candidates = space.candidates()
    if not candidates:
        raise TuneError("the search space is empty (every token budget is below every max_num_seqs).")
    if len(candidates) <= GRID_LIMIT:
        for c in candidates:
            evaluate(c)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        for policy in ("chunked", "xy"):  # vLLM's defaults, and xy at the same limits
            if policy in space.policies and 2048 in space.budgets and 256 in space.seqs:
                study.enqueue_trial({"policy": policy, "max_num_batched_tokens": 2048, "max_num_seqs": 256,
                                     "num_speculative_tokens": space.speculative_tokens[0],
                                     "align": space.aligns[0], "step_target": 0})
        study.optimize(lambda trial: _objective(evaluate(space.suggest(trial))), n_trials=trials)
    ranked = sorted(scored.values(), key=lambda s: s.key, reverse=True)
    return TuneResult(ranked, rates, sim.source, len(scored))


def _objective(s: Scored) -> float:
    """One number for Optuna: capacity first, the attainment past it breaking ties."""
    cap, att, good = s.key
    return cap + 1e-3 * att + 1e-6 * good


def settings_json(result: TuneResult, table: str, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """The winner as ``export.TuneSettings`` reads it (``xytune export --from-tune``); the evidence under why."""
    c = result.winner.candidate
    return {"policy": c.policy, "max_num_batched_tokens": c.max_num_batched_tokens, "max_num_seqs": c.max_num_seqs,
            **({"num_speculative_tokens": c.num_speculative_tokens} if c.num_speculative_tokens else {}),
            **({"align": c.align, **({"tbt_slo_ms": c.tbt_slo_ms} if c.tbt_slo_ms else {})} if c.policy == "xy"
               else {}),
            "why": f"xytune tune: {result.why()}",
            "evidence": {"met": result.met, "table": table, "step_model": result.source, "slo_ttft_ms": slo_ttft_ms,
                         "slo_tpot_ms": slo_tpot_ms, "rates": result.rates,
                         "candidates": [{"setting": asdict(s.candidate), "capacity": s.capacity, "rows": s.rows}
                                        for s in result.ranked]}}


def plot_candidates(result: TuneResult, sim: Simulator, workload: Workload, slo_ttft_ms: float, slo_tpot_ms: float,
                    out, top: int = 3):
    """TTFT and TPOT p90 against rate for the ``top`` candidates over every swept rate, the SLOs drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in result.ranked[:top]:
        rows = sim.sweep(s.candidate, workload, result.rates, slo_ttft_ms, slo_tpot_ms)
        rates = [r["request_rate"] for r in rows]
        for ax, key in zip(axes, ("p90_ttft_ms", "p90_tpot_ms")):
            ax.plot(rates, [r[key] for r in rows], marker="o", label=s.candidate.name)
    for ax, slo, name in zip(axes, (slo_ttft_ms, slo_tpot_ms), ("TTFT", "TPOT")):
        ax.axhline(slo, color="red", linestyle="--", label=f"{name} SLO {slo:g} ms")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"predicted {name} p90 (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"xytune tune: simulated on the table ({result.source})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
