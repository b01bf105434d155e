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

from .engine import Engine
from .protocol import EngineInfo, FinishRecord, engine_snapshot, update_of
from .sampling import SamplingParams
from .scheduler import Request


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
                    step = engine.step()
                    for req in step.updated:
                        self._push(req)
                    if self.metrics is not None and engine.step_stats:
                        stats = engine.step_stats[-1]
                        self.metrics.on_step(stats.seconds, stats.num_tokens)
                        for req in step.finished:
                            self.metrics.on_finish(FinishRecord.of(req))
        except BaseException as exc:  # surface the failure to every waiting client instead of hanging them
            self.error = exc
            for rid, (queue, loop) in list(self._queues.items()):
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            self._queues.clear()
