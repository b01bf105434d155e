"""The serving simulator: the engine's own Scheduler on a virtual clock, each step as long as the table says.

Vidur-like, but nothing of the scheduling is re-implemented: requests,
policies, the block manager with its prefix cache, preemption and
speculative verify all run the runtime's code. Only the model is replaced:
a step advances the clock by the table's step model (``step_model``) and
emits placeholder tokens; a draft of ``k`` tokens is accepted token by token
with a given probability. The scheduler's own step predictor learns from
the simulated step times, as the real engine's learns from measured ones.

The simulator needs only a cost table, so settings for a GPU or NPU can be
searched on any machine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from xytune.profiler.cost_model import CostModel

from ..model.attention import AttentionPaths, meta_tile_sizes
from .block_manager import BlockAllocator
from .engine import SpecStats, StepStats, check_prompt
from .sampling import SamplingParams
from .scheduler import Request, Scheduler, SchedulerConfig, SchedulerOutput
from .speculative import Draft, SpeculativeConfig
from .step_predictor import STEP_TERMS, AttentionRequests, StepPredictor, attention_pairs, decode_terms


def step_model(cost_model: CostModel, dtype: str, fit: dict | None = None) -> tuple[StepPredictor, str]:
    """The step-time model the simulator advances its clock by, and where it came from.

    A table with an engine-step fit (``xytune calibrate-steps``; a full ``xytune profile`` makes one) predicts
    whole steps as they ran on its machine (``fit``: one made apart from the table, on this machine now).
    Without one, a step is its GEMM rows plus its attention at the table's measured cost per (query, key)
    pair: norms, sampling and host work are missing, so steps come out faster than they run, which a one-line
    warning says.
    """
    fit = fit or cost_model.engine_steps(dtype)
    if fit is not None:
        model = StepPredictor.from_fit(cost_model, dtype, fit,
                                       tile_kv=meta_tile_sizes(cost_model, dtype)["tile_kv"])
        return model, f"engine-step fit ({fit['steps']} steps, median error {fit['median_ape']:.0%})"
    model = StepPredictor(cost_model, dtype)
    per_pair = cost_model.attention_seconds_per_pair(dtype) or 0.0
    model.coef = np.array([1.0, per_pair * cost_model.geometry.num_layers * 1e6] + [0.0] * (len(STEP_TERMS) - 2))
    warnings.warn("the table has no engine-step fit (run `xytune calibrate-steps` on the machine that made it): "
                  "simulated steps count its GEMM and attention rows only, so they are faster than real ones",
                  stacklevel=2)
    return model, "GEMM and attention rows only (no engine-step fit)"


class BlockPool:
    """What the scheduler needs of a KV cache (the block allocator and its geometry), without the tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block.")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class TraceRequest:
    """One request of a workload: when it arrives (seconds from the start), its prompt and how many tokens it
    generates (it runs to ``max_tokens``, as the bench traces' ``ignore_eos`` requests do)."""

    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class SimulatedRequest:
    """A finished request's times, in seconds from the start of its replay."""

    arrival_s: float
    first_token_s: float
    finish_s: float
    input_tokens: int
    output_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def itl_s(self) -> list[float]:
        return np.diff(self.token_times_s).tolist()


@dataclass
class SimulationResult:
    requests: list[SimulatedRequest]
    duration_s: float
    steps: list[StepStats]


class SimulatedEngine:
    """One simulated server: its scheduler, block pool and step predictor persist from replay to replay."""

    def __init__(self, cost_model: CostModel, dtype: str, scheduler_config: SchedulerConfig, num_blocks: int,
                 block_size: int = 16, max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 speculative: SpeculativeConfig | None = None, acceptance_rate: float = 0.0, draft_rate: float = 1.0,
                 seed: int = 0, truth: StepPredictor | None = None):
        """``acceptance_rate``: the chance each draft token is accepted given its parent was; ``draft_rate``: the
        share of decode steps whose request finds a draft. ``truth``: the step-time model (``step_model``)."""
        if not 0.0 <= acceptance_rate <= 1.0 or not 0.0 <= draft_rate <= 1.0:
            raise ValueError("acceptance_rate and draft_rate must be within [0, 1].")
        self.truth = truth if truth is not None else step_model(cost_model, dtype)[0]
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.vocab_size = cost_model.geometry.vocab_size
        self.max_model_len = max_model_len or self.pool.capacity_tokens
        self.predictor = StepPredictor.from_table(cost_model, dtype,
                                                  tile_kv=meta_tile_sizes(cost_model, dtype)["tile_kv"])
        self.acceptance_rate, self.draft_rate = acceptance_rate, draft_rate
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        paths = AttentionPaths.from_table(cost_model, dtype, cost_model.geometry.num_layers)
        self.scheduler = Scheduler(scheduler_config, self.pool, self.predictor, speculative, self.max_model_len,
                                   clock=lambda: self.now, proposer=self._propose, attention=AttentionRequests(paths))
        self.spec = SpecStats()
        # per step kind (step_calibration.STEP_KINDS), a factor on the step model's time: a machine measured that
        # much slower than when the table's steps were timed (machine_speed); None: as the table has it
        self.speed: dict[str, float] | None = None
        self.steps: list[StepStats] = []
        self._token_times: dict[int, list[float]] = {}  # id(request) -> when each of its tokens came out

    def _propose(self, token_ids: list[int], cfg: SpeculativeConfig, budget: int) -> Draft | None:
        """A chain of ``num_speculative_tokens`` placeholder tokens (within ``budget``) for ``draft_rate`` of
        the decode steps: what the n-gram proposer finds depends on text the simulator does not have."""
        k = min(budget, cfg.num_speculative_tokens)
        if k < 1 or self.rng.random() >= self.draft_rate:
            return None
        return Draft([0] * k, list(range(k)))

    def _accepted(self, k: int) -> int:
        """Draft tokens accepted in a row, each with ``acceptance_rate`` once its parent was."""
        n = 0
        while n < k and self.rng.random() < self.acceptance_rate:
            n += 1
        return n

    def replay(self, trace: list[TraceRequest]) -> SimulationResult:
        """Run the trace to its end; times count from the start of this replay. The prefix cache starts cold."""
        for t in trace:
            check_prompt(t.prompt_ids, self.max_model_len, self.vocab_size)
        self.pool.allocator.reset_prefix_cache()
        start, first_step = self.now, len(self.steps)
        pending = sorted(trace, key=lambda t: t.arrival_s)
        i, done = 0, []
        while i < len(pending) or self.scheduler.has_work():
            while i < len(pending) and start + pending[i].arrival_s <= self.now:  # arrived during the last step
                t = pending[i]
                params = SamplingParams(max_tokens=t.max_tokens, ignore_eos=True, detokenize=False)
                self.scheduler.add(Request(f"sim-{i}", list(t.prompt_ids), params, arrival=start + t.arrival_s))
                i += 1
            work = self.scheduler.schedule() if self.scheduler.has_work() else SchedulerOutput([])
            if not work.scheduled:
                if i == len(pending):
                    raise RuntimeError("the simulated KV cache cannot hold the next waiting request; give it "
                                       "more blocks.")
                self.now = max(self.now, start + pending[i].arrival_s)  # idle until the next arrival
                continue
            for req in self._step(work):
                times = self._token_times.pop(id(req))
                done.append(SimulatedRequest(req.arrival - start, req.first_token_time - start,
                                             req.finish_time - start, len(req.prompt_ids), len(req.output_ids),
                                             [t - start for t in times], req.num_preemptions))
        return SimulationResult(done, self.now - start, self.steps[first_step:])

    def _step(self, work: SchedulerOutput) -> list[Request]:
        """Advance the clock by the step's predicted time and the requests by what it would compute (as
        ``Engine._update_from_output`` does); returns the requests that finished."""
        scheduled = work.scheduled
        logits = sum(n if r.draft is not None else int(r.num_computed + n == r.num_tokens) for r, n in scheduled)
        tokens = sum(n for _, n in scheduled)
        pairs = attention_pairs([(r.num_computed, n) for r, n in scheduled])
        decode_keys = [r.num_computed + 1 for r, n in scheduled if n == 1]
        host = self.scheduler.attention.count(tuple(id(r) for r, _ in scheduled), len(decode_keys) == len(scheduled))
        seconds = self.truth.predict(tokens, logits, pairs, decode_keys, *host)
        num_decode, num_verify = work.num_decode_tokens, work.num_verify_tokens
        if self.speed is not None:
            seconds *= self.speed["decode" if tokens == num_decode + num_verify else "prefill"]
        self.now += seconds
        predicted = self.predictor.observe(tokens, logits, seconds, pairs, decode_keys, *host)
        self.steps.append(StepStats(tokens, tokens - num_decode - num_verify, num_decode, seconds, predicted,
                                    num_verify, logits, pairs,
                                    *decode_terms(decode_keys, self.predictor.tile_kv, padded=not host[1]), *host))
        finished = []
        for req, n in scheduled:
            if req.draft is not None:
                accepted = self._accepted(len(req.draft))
                req.num_computed += 1 + accepted
                self.spec.proposed += len(req.draft)
                self.spec.accepted += accepted
                self.spec.verify_steps += 1
                self.spec.emitted += accepted + 1
                count = accepted + 1
            else:
                req.num_computed += n
                count = int(req.num_computed == req.num_tokens)  # a prefill chunk short of the prompt samples none
            if count:
                req.first_token_time = req.first_token_time or self.now
                times = self._token_times.setdefault(id(req), [])
                for _ in range(count):
                    req.output_ids.append(int(self.rng.integers(self.vocab_size)))
                    times.append(self.now)
                    if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                        finished.append(req)
                        break
            self.scheduler.blocks.cache_computed_blocks(req)
            req.draft = None
        for req in finished:
            self.scheduler.finish(req, "length")
        return finished
