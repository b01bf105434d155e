"""Requests and the first scheduler: decode tokens first, then prefill chunks (vLLM v1 style).

A step is a flat list of ``(request, num_new_tokens)``. Limits follow vLLM:
``max_num_batched_tokens`` per step and ``max_num_seqs`` running requests.
When KV blocks run out, the newest running request is preempted: its blocks
are freed and it is recomputed later from its prompt plus what it has
generated, so nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

import torch

from ..model.tokenizer import OutputText
from .block_manager import BlockManager
from .kv_cache import KVCache
from .policies import XYPolicy
from .sampling import SamplingParams
from .speculative import Draft, SpeculativeConfig, propose_ngram
from .step_predictor import AttentionRequests


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: OutputText | None = None  # the output's text, made as tokens arrive (None: params.detokenize off)
    error: str | None = None  # why the engine failed this request (finish reason "error")
    scheduled_time: float | None = None  # when it last left the waiting queue for a step (queue-time metric)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    block_hashes: list[int] = field(default_factory=list)  # of its full, computed blocks (prefix cache)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    draft: Draft | None = None  # speculative tokens to verify in this step
    output_logprobs: list = field(default_factory=list)  # per output token (params.logprobs): (logprob, top)
    prompt_logprobs: list = field(default_factory=lambda: [None])  # per prompt token after the first: the same

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed


POLICIES = ("chunked", "prefill-first", "xy")


@dataclass
class SchedulerConfig:
    """``chunked``: decodes, then prefill chunks within a fixed token budget (vLLM v1 / Sarathi).
    ``prefill-first``: waiting prompts run as prefill-only steps that pause decoding (classic vLLM).
    ``xy``: decodes, then as many prefill tokens as keep the predicted step within the step SLO,
    chunks cut on ``align``-token boundaries unless they finish a prompt (XY-Serve).

    The step SLO is ``tbt_slo_ms`` when given, else the TPOT SLO ``tpot_slo_ms`` (the average per-token
    time the requests are held to): what a step may take follows from the SLO being served and the
    machine's measured step times, not from a figure tuned on another machine."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    policy: str = "chunked"
    tbt_slo_ms: float | None = None
    align: int = 16
    ttft_slo_ms: float = 2000.0  # xy: a prompt waiting half of this gets longer steps
    tpot_slo_ms: float = 200.0

    def __post_init__(self):
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1.")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1.")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}.")
        if (self.tbt_slo_ms is not None and self.tbt_slo_ms <= 0) or self.ttft_slo_ms <= 0 \
                or self.tpot_slo_ms <= 0 or self.align < 1:
            raise ValueError("tbt_slo_ms, tpot_slo_ms and ttft_slo_ms must be positive and align at least 1.")

    @property
    def step_slo_s(self) -> float:
        """Seconds: the TBT SLO when one was given, else the TPOT SLO."""
        return (self.tbt_slo_ms if self.tbt_slo_ms is not None else self.tpot_slo_ms) / 1e3


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work: ``(request, new tokens)`` in batch order. A request with a draft verifies its pending
    token and the draft tree in one chunk; the others run a decode token or a prefill chunk."""

    scheduled: list[tuple[Request, int]]

    @property
    def num_verify_tokens(self) -> int:
        return sum(n for r, n in self.scheduled if r.draft is not None)

    @property
    def num_decode_tokens(self) -> int:
        """Tokens that follow an output token (a prompt's last token, say after a prefix-cache hit, is prefill)."""
        return sum(1 for r, n in self.scheduled if n == 1 and r.draft is None and r.output_ids)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCache, predictor=None,
                 speculative: SpeculativeConfig | None = None, max_model_len: int | None = None,
                 clock=time.perf_counter, proposer=propose_ngram, attention: AttentionRequests | None = None):
        """``clock``: seconds now (the serving simulator passes its virtual clock); ``proposer``: the draft of a
        decoding request, ``(token ids, SpeculativeConfig, budget) -> Draft | None`` (the simulator's drafts
        stand in for n-gram hits on text it does not have); ``attention``: how the model's attention handles a
        step's requests (the step predictor counts them; default Meta-Attention throughout).

        ``kv`` needs only ``allocator``, ``block_size`` and ``capacity_tokens``: the simulator's block pool
        has no tensors."""
        if config.policy == "xy" and predictor is None:
            raise ValueError("the xy policy needs a cost table (a StepPredictor).")
        self.config, self.kv, self.predictor = config, kv, predictor
        self.attention = attention or AttentionRequests()
        self.clock, self.proposer = clock, proposer
        self.blocks = BlockManager(kv.allocator, kv.block_size)
        self.xy = XYPolicy(self)
        self.speculative = speculative
        self.max_model_len = max_model_len or kv.capacity_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def reconfigure(self, **changes) -> None:
        """New scheduling settings for a loaded engine, from the next step on (checked as a new config is)."""
        config = dataclasses.replace(self.config, **changes)
        if config.policy == "xy" and self.predictor is None:
            raise ValueError("the xy policy needs a cost table (a StepPredictor).")
        self.config = config

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, req: Request) -> None:
        self.blocks.release(req)
        req.draft = None
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.insert(0, req)
        self.waiting.sort(key=lambda r: r.arrival)

    def finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, self.clock()
        self.blocks.release(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _make_room(self, req: Request, num_tokens: int, scheduled: list) -> bool:
        """Grow ``req``, preempting newer unscheduled running requests while the pool is short."""
        taken = {id(r) for r, _ in scheduled}
        while not self.blocks.grow(req, num_tokens):
            victims = [r for r in self.running if r is not req and id(r) not in taken and r.arrival >= req.arrival]
            if not victims:
                return False
            self.preempt(max(victims, key=lambda r: r.arrival))
        return True

    def _propose(self, req: Request, budget: int) -> Draft | None:
        """An n-gram draft for a decoding request, within the step budget, max_tokens and the context."""
        if self.speculative is None or req.params.reshapes_logits or req.params.logprobs is not None:
            return None  # penalties and logprobs are per sampled position: plain decoding
        room = min(budget, req.params.max_tokens - len(req.output_ids) - 1,
                   self.max_model_len - req.num_tokens - 1)
        return self.proposer(req.all_ids, self.speculative, room)

    def schedule(self) -> SchedulerOutput:
        """The next step's work under the policy, within the token budget, the sequence limit and the KV pool."""
        return SchedulerOutput(self._schedule())

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        policy = self.config.policy
        has_prefill = bool(self.waiting) or any(r.remaining > 1 for r in self.running)
        if policy == "prefill-first" and has_prefill:
            prefills = self._schedule_prefills(budget, scheduled, align=False)
            if prefills:
                return prefills
            # no prompt can start (max_num_seqs running, or no KV blocks free): decode, or nothing would ever
            # finish to make room
        for req in sorted(self.running, key=lambda r: r.arrival):  # decodes first
            if budget == 0:
                break
            if req.status is Status.RUNNING and req.remaining == 1:
                req.draft = self._propose(req, budget - 1)
                n = 1 + (len(req.draft) if req.draft else 0)
                if req.draft and not self._make_room(req, req.num_computed + n, scheduled):
                    req.draft, n = None, 1  # no room for the tree: plain decode
                if self._make_room(req, req.num_computed + n, scheduled):
                    scheduled.append((req, n))
                    budget -= n
                elif req.status is Status.RUNNING:
                    self.preempt(req)
        if policy == "xy" and scheduled:  # with nobody decoding there is no token pace to protect
            budget = min(budget, self.xy.prefill_budget(scheduled, budget))
        return self._schedule_prefills(budget, scheduled, align=policy == "xy")

    def _schedule_prefills(self, budget: int, scheduled: list, align: bool) -> list[tuple[Request, int]]:
        """Prefill chunks, oldest first, within ``budget`` tokens and the KV pool."""
        prefilling = [r for r in sorted(self.running, key=lambda r: r.arrival) if r.remaining > 1]
        queue = prefilling + list(self.waiting)
        if self.config.policy == "xy":
            queue = self.xy.slo_order(queue)
        for req in queue:
            if budget == 0:
                break
            if req.status is Status.WAITING and len(self.running) >= self.config.max_num_seqs:
                break
            if req.status is Status.WAITING:
                self.blocks.attach_cached_prefix(req)
            n = min(req.remaining, budget)
            if self.blocks.free_tokens(req) < n and req.status is Status.RUNNING:
                self._make_room(req, req.num_computed + n, scheduled)
            n = min(n, self.blocks.free_tokens(req))
            if align and n < req.remaining and n >= self.config.align:
                n -= n % self.config.align  # a chunk that does not finish the prompt ends on a tile boundary
            if n <= 0 or not self.blocks.grow(req, req.num_computed + n):
                if req.status is Status.WAITING:  # hand cached blocks back while it waits
                    self.blocks.release(req)
                break  # wait for blocks; FCFS order is kept
            if req.status is Status.WAITING:
                self.blocks.record_admission(req)
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
                req.scheduled_time = self.clock()
            scheduled.append((req, n))
            budget -= n
        return scheduled
