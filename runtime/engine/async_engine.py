"""AsyncEngine: the engine stepped by one background thread, results streamed to asyncio callers.

The HTTP server lives on an asyncio loop; the model runs in a thread so the
loop stays responsive. The thread runs the one engine loop (``drive``): its
commands come through a lock-protected inbox, and every step is published as
the engine process publishes it (a ``StepDone`` of new tokens and text) and
fanned out to the requests' asyncio queues by the same ``UpdateFanout``.
Aborts (client gone) free the request's KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import threading

from .engine import Engine
from .protocol import (
    AbortRequest,
    AddRequest,
    EngineInfo,
    RequestRejected,
    StepDone,
    StopEngine,
    UpdateFanout,
    drive,
    engine_snapshot,
)
from .sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.fanout = UpdateFanout(metrics)
        self._inbox: list = []  # commands for the engine thread
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xytune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what the engine holds, then end the thread."""
        self._command(StopEngine())
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
        self._command(AddRequest(request_id, list(prompt_ids), params))
        return queue

    def abort(self, request_id: str) -> None:
        if self.fanout.drop(request_id):
            self._command(AbortRequest(request_id))

    def _command(self, cmd) -> None:
        with self._wake:
            self._inbox.append(cmd)
            self._wake.notify()

    def _receive(self, wait_s: float) -> list:
        with self._wake:
            if not self._inbox and wait_s > 0:
                self._wake.wait(timeout=wait_s)
            commands, self._inbox = self._inbox, []
        return commands

    def _publish(self, msg) -> None:
        if isinstance(msg, StepDone):
            self.fanout.on_step(msg)
        elif isinstance(msg, RequestRejected):
            self.fanout.fail(msg.request_id, RuntimeError(msg.message))

    def _run(self) -> None:
        try:
            drive(self.engine, self._receive, self._publish)
        except BaseException as exc:  # noqa: BLE001 - every waiting client hears of it instead of hanging
            self.error = exc
            self.fanout.fail_all(exc)
