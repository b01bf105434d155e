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

import numpy as np
import torch

from .kv_cache import KVCache, block_hashes, blocks_needed
from .sampling import SamplingParams
from .speculative import Draft, SpeculativeConfig, propose_ngram
from .step_predictor import attention_pairs


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
    text: str | None = None  # set when a stop string cut the output
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
                 speculative: SpeculativeConfig | None = None, max_model_len: int | None = None):
        if config.policy == "xy" and predictor is None:
            raise ValueError("the xy policy needs a cost table (a StepPredictor).")
        self.config, self.kv, self.predictor = config, kv, predictor
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

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` blocks for ``num_tokens`` tokens; False when the pool is short."""
        need = blocks_needed(num_tokens, self.kv.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.kv.allocator.num_free:
            return False
        req.blocks.extend(self.kv.allocator.allocate(need))
        return True

    def preempt(self, req: Request) -> None:
        self.kv.allocator.free(req.blocks)
        req.blocks, req.num_computed, req.block_hashes, req.draft = [], 0, [], None
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.insert(0, req)
        self.waiting.sort(key=lambda r: r.arrival)

    def finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, time.perf_counter()
        self.kv.allocator.free(req.blocks)
        req.blocks = []
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def attach_cached_prefix(self, req: Request) -> None:
        """Start a request on the cached blocks of its longest cached prefix (at least one token stays to run)."""
        alloc, bs = self.kv.allocator, self.kv.block_size
        if not alloc.enable_prefix_caching or req.blocks or req.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        hashes = block_hashes(req.all_ids, bs, (req.num_tokens - 1) // bs)
        req.blocks = alloc.lookup(hashes)
        req.block_hashes = hashes[: len(req.blocks)]
        req.num_computed = len(req.blocks) * bs

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the request's newly full, computed blocks with the prefix cache."""
        alloc, bs = self.kv.allocator, self.kv.block_size
        if not alloc.enable_prefix_caching:
            return
        full = min(req.num_computed, req.num_tokens) // bs
        done = len(req.block_hashes)
        if full > done:
            parent = req.block_hashes[-1] if done else None
            new = block_hashes(req.all_ids, bs, full, start=done, parent=parent)
            for i, h in enumerate(new, start=done):
                alloc.register(req.blocks[i], h)
            req.block_hashes.extend(new)

    def _make_room(self, req: Request, num_tokens: int, scheduled: list) -> bool:
        """Grow ``req``, preempting newer unscheduled running requests while the pool is short."""
        taken = {id(r) for r, _ in scheduled}
        while not self._grow(req, num_tokens):
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
        return propose_ngram(req.all_ids, self.speculative, room)

    def step_deadline(self, scheduled: list, now: float | None = None, recent_step_s: float | None = None) -> float:
        """Seconds this step may take without pushing any decoding request's TPOT past the SLO.

        The step SLO (``step_slo_s``, the TPOT SLO unless a TBT SLO was given) is an average over a request's
        tokens. A request that has ``n`` tokens, ``E`` seconds after its first, and ``H`` more to come
        (``_horizon``) ends at ``(E + S + (H - 1) * s) / (n + H - 1)`` per token if this step takes ``S`` and the rest take the
        recent step time ``s``; the step may take the largest ``S`` that keeps that within the SLO for every
        decoder (at least the SLO itself, at most 8x). With ``s`` at the SLO this is the plain pace rule
        (token ``n + 1`` is due at ``n`` SLOs after the first); fast decode steps leave slack that lets a
        prompt's prefill through in a few large steps instead of starving it in small ones.
        """
        tbt = self.config.step_slo_s
        now = time.perf_counter() if now is None else now
        if recent_step_s is None:
            recent_step_s = self.recent_step_seconds()
        allowed, decoders = [], 0
        for r, _ in scheduled:
            if r.first_token_time is None or not r.output_ids:
                continue
            decoders += 1
            if self._lost(r, now):
                continue
            n = len(r.output_ids)
            h = self._horizon(r)
            allowed.append(tbt * (n + h - 1) - (now - r.first_token_time) - (h - 1) * recent_step_s)
        if not allowed:  # nobody decoding: the SLO; only decoders that missed their SLOs: nothing to protect
            return 8 * tbt if decoders else tbt
        deadline = min(max(tbt, min(allowed)), 8 * tbt)
        # a prompt that has waited half its TTFT SLO gets a longer step: the decoders absorb one slow token
        waiting = [r.arrival for r in self.waiting] + [r.arrival for r in self.running if r.first_token_time is None]
        if waiting and now - min(waiting) > self.config.ttft_slo_ms / 2e3:
            deadline = max(deadline, 2 * tbt)
        return deadline

    @staticmethod
    def _horizon(r: Request, unknown_length: int = 16) -> int:
        """Tokens the request still has to produce, as far as the pace rule may count on them.

        With ``ignore_eos`` and no stop strings or stop tokens it runs to ``max_tokens``, so its TPOT is an
        average over all of them and the slack of the whole remainder is real; otherwise it may stop at any
        token, and only the next ``unknown_length`` are counted.
        """
        remaining = max(1, r.params.max_tokens - len(r.output_ids))
        p = r.params
        if p.ignore_eos and not p.stop and not p.stop_token_ids:
            return remaining
        return min(unknown_length, remaining)

    def _lost(self, r: Request, now: float) -> bool:
        """Has this decoder already missed its SLOs, whatever the next steps do?

        Its first token came after the TTFT SLO, or more time has passed since its first token than the
        TPOT SLO allows for all of its tokens up to ``max_tokens``, so its TPOT ends over the SLO even if
        every step from now took no time. Pacing steps for such a request only shrinks them for everyone:
        under overload that cuts throughput and makes the next requests late too. It still decodes in
        every step; it just sets no deadline.
        """
        if r.first_token_time - r.arrival > self.config.ttft_slo_ms / 1e3:
            return True
        return now - r.first_token_time > self.config.step_slo_s * max(1, r.params.max_tokens - 1)

    def recent_step_seconds(self) -> float:
        """Median measured time of the last 16 steps (the SLO itself until there are any)."""
        records = list(self.predictor.records)[-16:] if self.predictor is not None else []
        if not records:
            return self.config.step_slo_s
        return float(np.median([actual for _, _, actual in records]))

    def _prefill_budget(self, scheduled: list, budget: int) -> int:
        """xy: the most prefill tokens whose step the predictor keeps within the step deadline, nudged to
        efficient M. Where even the decodes alone are predicted over the step SLO, no step size can meet it:
        the step then takes the prefill that maximises throughput (``_throughput_budget``)."""
        busy = sum(n for _, n in scheduled)  # decode and verify tokens, each with a logits row
        decode_pairs = attention_pairs([(r.num_computed, n) for r, n in scheduled])
        head = next((r for r in sorted(self.running, key=lambda r: r.arrival) if r.remaining > 1), None)
        context = head.num_computed if head is not None else 0  # the next chunk most likely extends this prompt

        def predicted(p: int) -> float:
            pairs = decode_pairs + (attention_pairs([(context, p)]) if p else 0.0)
            return self.predictor.predict(busy + p, busy + (1 if p else 0), pairs)

        if predicted(0) > self.config.step_slo_s:
            return self._throughput_budget(busy, budget, predicted)
        slo = self.step_deadline(scheduled)

        lo, hi = 0, budget
        while lo < hi:  # predicted step time grows with tokens: binary search the largest that fits
            mid = (lo + hi + 1) // 2
            if predicted(mid) <= slo:
                lo = mid
            else:
                hi = mid - 1
        lo = self._nudge(busy, lo)
        # Never starve prompts: when the SLO leaves no room, a step still takes one aligned chunk.
        return max(lo, min(budget, self.config.align))

    def _throughput_budget(self, busy: int, budget: int, predicted, within: float = 0.01) -> int:
        """The largest prefill (in ``align`` steps, up to ``budget``) whose step is within ``within`` of the
        most tokens per predicted second: on a machine too slow for the SLO, serve as much as it can."""
        align = self.config.align
        sizes = sorted({*range(align, budget + 1, align), budget})
        rate = {p: (busy + p) / max(predicted(p), 1e-12) for p in sizes}
        best = max(rate.values())
        return max(p for p, r in rate.items() if r >= best * (1 - within))

    def _nudge(self, busy: int, prefill: int, gain: float = 0.03) -> int:
        """Trim the prefill tokens so the step's token count lands where the GEMM table is more efficient.

        Looks up to two alignment units down for a total M whose table GEMM time per token beats that of
        the SLO-sized step by at least ``gain`` (a step just past a tile boundary pays for a nearly empty
        tile); otherwise keeps the SLO-sized count.
        """
        if prefill <= self.config.align:
            return prefill
        per_token = lambda p: self.predictor.table_seconds(busy + p, 1) / (busy + p)  # noqa: E731
        base = per_token(prefill)
        best, best_cost = prefill, base
        for p in range(prefill - 1, max(self.config.align, prefill - 2 * self.config.align) - 1, -1):
            if (c := per_token(p)) < best_cost:
                best, best_cost = p, c
        return best if best_cost < base * (1 - gain) else prefill

    def schedule(self) -> SchedulerOutput:
        """The next step's work under the policy, within the token budget, the sequence limit and the KV pool."""
        return SchedulerOutput(self._schedule())

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        policy = self.config.policy
        has_prefill = bool(self.waiting) or any(r.remaining > 1 for r in self.running)
        if policy == "prefill-first" and has_prefill:
            return self._schedule_prefills(budget, scheduled, align=False)
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
            budget = min(budget, self._prefill_budget(scheduled, budget))
        return self._schedule_prefills(budget, scheduled, align=policy == "xy")

    def _slo_order(self, queue: list[Request], now: float | None = None) -> list[Request]:
        """Prompts that can still meet the TTFT SLO first (oldest first), then those that already missed it.

        Under overload, serving a prompt that is already late only makes the next ones late too; it is not
        dropped, it runs as soon as the prompts that can still make it are through.
        """
        now = time.perf_counter() if now is None else now
        limit = self.config.ttft_slo_ms / 1e3
        return sorted(queue, key=lambda r: now - r.arrival > limit)  # stable: FCFS within each half

    def _schedule_prefills(self, budget: int, scheduled: list, align: bool) -> list[tuple[Request, int]]:
        """Prefill chunks, oldest first, within ``budget`` tokens and the KV pool."""
        prefilling = [r for r in sorted(self.running, key=lambda r: r.arrival) if r.remaining > 1]
        queue = prefilling + list(self.waiting)
        if self.config.policy == "xy":
            queue = self._slo_order(queue)
        for req in queue:
            if budget == 0:
                break
            if req.status is Status.WAITING and len(self.running) >= self.config.max_num_seqs:
                break
            if req.status is Status.WAITING:
                self.attach_cached_prefix(req)
            n = min(req.remaining, budget)
            free_tokens = (len(req.blocks) + self.kv.allocator.num_free) * self.kv.block_size - req.num_computed
            if free_tokens < n and req.status is Status.RUNNING:
                self._make_room(req, req.num_computed + n, scheduled)
                free_tokens = len(req.blocks) * self.kv.block_size - req.num_computed \
                    + self.kv.allocator.num_free * self.kv.block_size
            n = min(n, free_tokens)
            if align and n < req.remaining and n >= self.config.align:
                n -= n % self.config.align  # a chunk that does not finish the prompt ends on a tile boundary
            if n <= 0 or not self._grow(req, req.num_computed + n):
                if req.status is Status.WAITING:  # hand cached blocks back while it waits
                    self.kv.allocator.free(req.blocks)
                    req.blocks, req.num_computed, req.block_hashes = [], 0, []
                break  # wait for blocks; FCFS order is kept
            if req.status is Status.WAITING:
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed
                    self.kv.allocator.record_query(len(req.prompt_ids), req.num_computed)
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
                req.scheduled_time = time.perf_counter()
            scheduled.append((req, n))
            budget -= n
        return scheduled
