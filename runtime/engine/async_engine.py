"""AsyncEngine: the engine stepped by one background thread, results streamed to asyncio callers.

The HTTP server lives on an asyncio loop; the model runs in a thread so the
loop stays responsive. Requests are handed over through a lock-protected
inbox; every step is published as the engine process publishes it (a
``StepDone`` of new tokens) and fanned out to the requests' asyncio queues
by the same ``UpdateFanout``. Aborts (client gone) free the request's KV
blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import threading

from .engine import Engine
from .protocol import EngineInfo, StepPublisher, UpdateFanout, engine_snapshot
from .sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.fanout = UpdateFanout(metrics)
        self._inbox: list[tuple[list[int], SamplingParams, str]] = []
        self._aborts: list[str] = []
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
        return self.fanout.num_active

    @property
    def info(self) -> EngineInfo:
        return EngineInfo.of(self.engine)

    def snapshot(self) -> dict:
        return engine_snapshot(self.engine)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Validate and enqueue a request; its updates arrive on the returned queue."""
        if self.error is not None:
            raise RuntimeError(f"engine failed: {self.error}")
        self.engine.validate_prompt(prompt_ids, params)
        queue = self.fanout.register(request_id)
        with self._wake:
            self._inbox.append((list(prompt_ids), params, request_id))
            self._wake.notify()
        return queue

    def abort(self, request_id: str) -> None:
        if self.fanout.drop(request_id):
            with self._wake:
                self._aborts.append(request_id)
                self._wake.notify()

    def _loop(self) -> None:
        engine, publisher = self.engine, StepPublisher()
        try:
            while True:
                with self._wake:
                    while self._running and not self._inbox and not self._aborts and not engine.has_work():
                        self._wake.wait(timeout=0.5)
                    if not self._running and not engine.has_work() and not self._inbox:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                for prompt_ids, params, rid in inbox:
                    try:
                        engine.add_request(prompt_ids, params, request_id=rid)
                    except Exception as exc:  # noqa: BLE001 - a bug one request hits fails that request alone
                        self.fanout.fail(rid, RuntimeError(f"the engine could not take this request: {exc!r}"))
                for rid in aborts:
                    engine.abort(rid)
                    publisher.forget(rid)
                if engine.has_work():
                    self.fanout.on_step(publisher.publish(engine, engine.step()))
        except BaseException as exc:  # noqa: BLE001 - every waiting client hears of it instead of hanging
            self.error = exc
            self.fanout.fail_all(exc)
