"""How the engine is driven and what it tells its callers, in one module both sides import: the commands
that go in (``AddRequest``, ``AbortRequest``, ``StopEngine``), a request's progress (``Update``), the
engine's fixed facts (``EngineInfo``), finished requests' timings, the gauges, and the messages out.

One loop (``drive``) steps the engine wherever it runs: in a thread of the server, in a process of its
own (``core``), in the bench replay and in ``LLM.generate``; only where its commands come from and where
its messages go differ. One update protocol: after each step the engine side builds a ``StepDone`` of the
step's new tokens and text per request (``StepPublisher``) and the server side adds them up and hands each
request's state to its client (``UpdateFanout``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .engine import Engine, RequestError, RequestOutput, StepOutput, check_prompt
from .sampling import SamplingParams
from .scheduler import Request, Status


@dataclass
class Update:
    """What a request has produced so far."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    text: str  # the output's text so far (cut at a stop string); a delta carries only the new characters
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list | None = None  # per output token: (logprob, [(token id, logprob), ...]) when asked for
    prompt_logprobs: list | None = None  # per prompt token (None for the first), once the prompt is through
    error: str | None = None  # the engine failed this request alone (finish reason "error")

    def extended(self, delta: "Update") -> "Update":
        """This update followed by ``delta`` (an ``update_of(req, since=...)``): the request's state after both."""
        logprobs = None if delta.logprobs is None else (self.logprobs or []) + delta.logprobs
        return Update(self.token_ids + delta.token_ids, delta.finished, delta.finish_reason, delta.num_prompt_tokens,
                      self.text + delta.text, delta.num_cached_tokens, logprobs,
                      self.prompt_logprobs if self.prompt_logprobs is not None else delta.prompt_logprobs,
                      delta.error)


def update_of(req: Request, since: int = 0, since_chars: int = 0) -> Update:
    """The request's state, or with ``since`` / ``since_chars`` only the output tokens (and logprobs) and
    text from there on: each step sends what is new, not the whole output again (quadratic over a long one)."""
    prompt_logprobs = None
    if req.params.prompt_logprobs is not None and req.output_ids and since == 0:
        prompt_logprobs = list(req.prompt_logprobs)
    return Update(req.output_ids[since:], req.status is Status.FINISHED, req.finish_reason, len(req.prompt_ids),
                  req.text.shown[since_chars:] if req.text is not None else "", req.num_cached_tokens,
                  req.output_logprobs[since:] if req.params.logprobs is not None else None, prompt_logprobs,
                  req.error)


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
    scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None

    @classmethod
    def of(cls, req: Request) -> "FinishRecord":
        return cls(req.finish_reason, len(req.prompt_ids), len(req.output_ids), req.arrival, req.scheduled_time,
                   req.first_token_time, req.finish_time)


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


# -- messages between the server and the engine process (core.py) --

@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float | None = None  # perf_counter time it arrived, when that was before it reached the engine


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class StopEngine:
    """Finish what is running, then stop."""


@dataclass(frozen=True)
class EngineReady:
    info: EngineInfo
    tokenizer: object
    dtype: str
    snapshot: dict


@dataclass(frozen=True)
class EngineFailed:
    """The engine could not be built (a one-line error)."""

    message: str


@dataclass(frozen=True)
class StepDone:
    updates: list[tuple[str, Update]]  # (request id, its new tokens since the last update)
    seconds: float
    num_tokens: int
    finished: list[FinishRecord]
    snapshot: dict | None  # the gauges, at most every SNAPSHOT_EVERY_S and with every step that finishes one


@dataclass(frozen=True)
class EngineIdle:
    snapshot: dict


@dataclass(frozen=True)
class RequestRejected:
    request_id: str
    message: str


@dataclass(frozen=True)
class EngineCrashed:
    message: str


@dataclass(frozen=True)
class EngineStopped:
    """The engine process finished its work and ends."""


# -- the one update protocol: StepDone out of the engine side, request states into the clients' queues --

SNAPSHOT_EVERY_S = 0.2  # the gauges travel with a step at most this often, or when it finishes a request


class StepPublisher:
    """The engine side: each step as a ``StepDone`` of every touched request's new tokens since the last."""

    def __init__(self):
        self._sent: dict[str, tuple[int, int]] = {}  # output tokens and text characters published, per request
        self._snapshot_at = 0.0

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def publish(self, engine: Engine, step: StepOutput) -> StepDone:
        updates = []
        for req in step.updated:
            tokens, chars = self._sent.get(req.request_id, (0, 0))
            updates.append((req.request_id, update_of(req, tokens, chars)))
            self._sent[req.request_id] = len(req.output_ids), len(req.text.shown) if req.text is not None else 0
        for req in step.finished:
            self._sent.pop(req.request_id, None)
        stats = engine.step_stats[-1] if engine.step_stats else None
        # The gauges (the cost-model error is a median over thousands of steps) at most 5x/s, and with every
        # step that finishes a request: a client that has its response then reads /metrics that count it.
        snapshot = None
        if step.finished or time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
            snapshot, self._snapshot_at = engine_snapshot(engine), time.monotonic()
        return StepDone(updates, stats.seconds if stats else 0.0, stats.num_tokens if stats else 0,
                        [FinishRecord.of(req) for req in step.finished], snapshot)


class UpdateFanout:
    """The server side: adds each request's new tokens to what it had and puts the result on its client's
    asyncio queue (from any thread); counts finished requests and steps in the metrics."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self.snapshot: dict | None = None
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._so_far: dict[str, Update] = {}

    @property
    def num_active(self) -> int:
        return len(self._queues)

    def register(self, request_id: str) -> asyncio.Queue:
        """The queue a new request's updates will arrive on (call on the client's event loop)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (queue, asyncio.get_running_loop())
        return queue

    def drop(self, request_id: str) -> bool:
        """Stop delivering to a request (aborted, or its client gone); False if it was not live."""
        self._so_far.pop(request_id, None)
        return self._queues.pop(request_id, None) is not None

    def fail(self, request_id: str, error: BaseException) -> None:
        self._deliver(request_id, error)
        self.drop(request_id)

    def fail_all(self, error: BaseException) -> None:
        for rid in list(self._queues):
            self.fail(rid, error)

    def on_step(self, msg: StepDone) -> None:
        self.snapshot = msg.snapshot or self.snapshot
        for rid, delta in msg.updates:
            if rid not in self._queues:  # aborted: its client is gone
                self._so_far.pop(rid, None)
                continue
            update = self._so_far[rid].extended(delta) if rid in self._so_far else delta
            self._so_far[rid] = update
            self._deliver(rid, update)
            if update.finished:
                self.drop(rid)
        if self.metrics is not None:
            self.metrics.on_step(msg.seconds, msg.num_tokens)
            for rec in msg.finished:
                self.metrics.on_finish(rec)

    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            queue, loop = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)


# -- the one engine loop --

IDLE_WAIT_S = 0.5  # how long an idle engine waits for commands before it reports its gauges again


def drive(engine: Engine, receive, publish=None) -> None:
    """Step ``engine`` until a ``StopEngine`` arrives and the work it holds is done.

    Between steps ``receive(wait_s)`` hands over the commands that came in, waiting up to ``wait_s`` when the
    engine has nothing to do (0 when it has). ``publish`` (optional) gets each step's ``StepDone``, an
    ``EngineIdle`` when idle, and a ``RequestRejected`` for a request the engine cannot take: that request
    alone fails.
    """
    publisher, stopping = StepPublisher(), False
    while True:
        for cmd in receive(0.0 if engine.has_work() else IDLE_WAIT_S):
            if isinstance(cmd, AddRequest):
                try:
                    engine.add_request(cmd.prompt_ids, cmd.params, request_id=cmd.request_id, arrival=cmd.arrival)
                except Exception as exc:  # noqa: BLE001 - refused (or a bug it hit): that request alone fails
                    if publish is not None:
                        publish(RequestRejected(cmd.request_id, str(exc) if isinstance(exc, RequestError)
                                                else f"the engine could not take this request: {exc!r}"))
            elif isinstance(cmd, AbortRequest):
                engine.abort(cmd.request_id)
                publisher.forget(cmd.request_id)
            elif isinstance(cmd, StopEngine):
                stopping = True
        if engine.has_work():
            step = engine.step()
            if publish is not None:
                publish(publisher.publish(engine, step))
        elif stopping:
            return
        elif publish is not None:
            publish(EngineIdle(engine_snapshot(engine)))


def run_to_completion(engine: Engine, reqs: list[Request]) -> list[RequestOutput]:
    """Run the requests already added (and any others the engine holds) to the end: ``LLM.generate``."""
    drive(engine, lambda wait_s: [StopEngine()])
    return [engine.output(r) for r in reqs]
