"""AsyncEngine: the engine stepped by one background thread, results streamed to asyncio callers.

The HTTP server lives on an asyncio loop; the model runs in a thread so the
loop stays responsive. Requests are handed over through a lock-protected
inbox, and every step pushes each touched request's progress into that
request's asyncio queue. Aborts (client gone) free the request's KV blocks
at the next step boundary.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from xytune.runtime.engine import Engine, check_prompt
from xytune.runtime.sampling import SamplingParams
from xytune.runtime.scheduler import Request, Status


@dataclass
class Update:
    """What a request has produced so far."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    stop_text: str | None  # the output cut at a stop string, once one matched
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list | None = None  # per output token: (logprob, [(token id, logprob), ...]) when asked for
    prompt_logprobs: list | None = None  # per prompt token (None for the first), once the prompt is through


    def extended(self, delta: "Update") -> "Update":
        """This update followed by ``delta`` (an ``update_of(req, since=...)``): the request's state after both."""
        logprobs = None if delta.logprobs is None else (self.logprobs or []) + delta.logprobs
        return Update(self.token_ids + delta.token_ids, delta.finished, delta.finish_reason, delta.num_prompt_tokens,
                      delta.stop_text, delta.num_cached_tokens, logprobs,
                      self.prompt_logprobs if self.prompt_logprobs is not None else delta.prompt_logprobs)


def update_of(req: Request, since: int = 0) -> Update:
    """The request's state, or with ``since`` only the output tokens (and logprobs) from that index on: the
    engine process sends each step's new tokens, not the whole output again (quadratic over a long one)."""
    prompt_logprobs = None
    if req.params.prompt_logprobs is not None and req.output_ids and since == 0:
        prompt_logprobs = list(req.prompt_logprobs)
    return Update(req.output_ids[since:], req.status is Status.FINISHED, req.finish_reason, len(req.prompt_ids),
                  req.text, req.num_cached_tokens,
                  req.output_logprobs[since:] if req.params.logprobs is not None else None, prompt_logprobs)


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs to know about the engine, fixed for its lifetime."""

    eos_ids: tuple[int, ...]
    max_model_len: int
    vocab_size: int
    num_blocks: int

    @classmethod
    def of(cls, engine: Engine) -> "EngineInfo":
        return cls(tuple(sorted(engine.eos_ids)), engine.max_model_len, engine.model.config.vocab_size,
                   engine.kv.num_blocks)

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """The engine's own checks (``Engine.validate_prompt``), made before a request is sent to it."""
        check_prompt(prompt_ids, self.max_model_len, self.vocab_size, params)


@dataclass(frozen=True)
class FinishRecord:
    """A finished request's timings, for the latency histograms."""

    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    arrival: float
    first_token_time: float | None
    finish_time: float | None

    @classmethod
    def of(cls, req: Request) -> "FinishRecord":
        return cls(req.finish_reason, len(req.prompt_ids), len(req.output_ids), req.arrival, req.first_token_time,
                   req.finish_time)


def engine_snapshot(engine: Engine) -> dict:
    """The engine's gauges (queue, KV, prefix cache, speculation, cost model) as plain numbers."""
    sched, kv, spec = engine.scheduler, engine.kv, engine.spec
    alloc = kv.allocator
    snap = {"waiting": len(sched.waiting), "running": len(sched.running), "kv_blocks_free": alloc.num_free,
            "kv_blocks_total": kv.num_blocks, "preemptions": sched.num_preemptions,
            "prefix_queried_tokens": alloc.queried_tokens, "prefix_hit_tokens": alloc.hit_tokens,
            "prefix_hit_rate": alloc.hit_rate, "spec_draft_tokens": spec.proposed,
            "spec_accepted_tokens": spec.accepted, "spec_acceptance_rate": spec.acceptance_rate,
            "spec_tokens_per_step": spec.tokens_per_step, "cost_error": None, "cost_scale": None}
    if engine.predictor is not None:
        snap["cost_error"] = engine.predictor.error_summary()["median_ape"]
        snap["cost_scale"] = engine.predictor.scale
    return snap


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self._inbox: list[tuple] = []  # (prompt_ids, params, request_id, queue, loop)
        self._aborts: list[str] = []
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="xytune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def num_active(self) -> int:
        return len(self._queues) + len(self._inbox)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo.of(self.engine)

    def snapshot(self) -> dict:
        return engine_snapshot(self.engine)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Validate and enqueue a request; its updates arrive on the returned queue."""
        self.engine.validate_prompt(prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            self._inbox.append((list(prompt_ids), params, request_id, queue, asyncio.get_running_loop()))
            self._wake.notify()
        return queue

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def _push(self, req: Request) -> None:
        entry = self._queues.get(req.request_id)
        if entry is None:
            return
        queue, loop = entry
        update = update_of(req)
        loop.call_soon_threadsafe(queue.put_nowait, update)
        if update.finished:
            self._queues.pop(req.request_id, None)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wake:
                    while self._running and not self._inbox and not self._aborts and not engine.has_work():
                        self._wake.wait(timeout=0.5)
                    if not self._running and not engine.has_work() and not self._inbox:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                for prompt_ids, params, rid, queue, loop in inbox:
                    self._queues[rid] = (queue, loop)
                    engine.add_request(prompt_ids, params, request_id=rid)
                for rid in aborts:
                    engine.abort(rid)
                    self._queues.pop(rid, None)
                if engine.has_work():
                    finished = engine.step()
                    for req in engine.sampled:
                        self._push(req)
                    for req in finished:
                        engine.requests.pop(req.request_id, None)
                    if self.metrics is not None and engine.step_stats:
                        self.metrics.on_step(engine.step_stats[-1].seconds)
                        for req in finished:
                            self.metrics.on_finish(FinishRecord.of(req))
        except BaseException as exc:  # surface the failure to every waiting client instead of hanging them
            self.error = exc
            for rid, (queue, loop) in list(self._queues.items()):
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            self._queues.clear()
