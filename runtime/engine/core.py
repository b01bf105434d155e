"""The engine in a process of its own (the engine core), so HTTP work never stalls a step.

In one process the HTTP loop and the engine thread share the GIL: a torch call
that returns waits for the loop's Python (JSON, SSE, detokenizing many streams)
to let go, so steps slow down under load by more than any step predictor sees.
Here the server process only parses, formats and streams; the core process
owns the model, the KV cache and the scheduler, makes the output text (the
engine cuts it at stop strings) and runs steps back to back. One pipe joins
them: requests, aborts and the stop go in; per step, the new tokens and text,
finished requests' timings and a snapshot of the gauges come out.
``EngineProcess`` has the interface of ``AsyncEngine``, so the server takes
either.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import threading

from ..llm import LLM
from .protocol import (
    AbortRequest,
    AddRequest,
    EngineCrashed,
    EngineFailed,
    EngineIdle,
    EngineInfo,
    EngineReady,
    EngineStopped,
    RequestRejected,
    StepDone,
    StopEngine,
    UpdateFanout,
    drive,
    engine_snapshot,
)
from .sampling import SamplingParams


class EngineStartError(RuntimeError):
    """The core could not build its engine; the message is the engine's own one-line error."""


def _core_main(conn, llm_kwargs: dict) -> None:
    """The core process: build the engine, then run the engine loop on the pipe's commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains and then stops the core over the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        llm = LLM(**llm_kwargs)
    except Exception as exc:  # noqa: BLE001 - sent to the server, which prints it as one line
        conn.send(EngineFailed(str(exc) or type(exc).__name__))
        return
    engine = llm.engine
    conn.send(EngineReady(EngineInfo.of(engine), llm.tokenizer, str(llm.dtype).replace("torch.", ""),
                          engine_snapshot(engine)))

    def receive(wait_s: float) -> list:
        commands = []
        while conn.poll(wait_s):
            commands.append(conn.recv())
            wait_s = 0
        return commands

    try:
        drive(engine, receive, conn.send)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server is gone
    except BaseException as exc:  # noqa: BLE001 - every waiting client hears of it instead of hanging
        conn.send(EngineCrashed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(EngineStopped())


class EngineProcess:
    """The server side of the core: submits, aborts, and fans the core's updates out to asyncio queues."""

    def __init__(self, llm_kwargs: dict, metrics=None, start_timeout_s: float = 600):
        self.llm_kwargs, self.metrics, self.start_timeout_s = llm_kwargs, metrics, start_timeout_s
        self.error: BaseException | None = None
        self.info: EngineInfo | None = None
        self.tokenizer = None
        self.dtype: str | None = None
        self.fanout = UpdateFanout(metrics)
        self._send_lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the core and wait until its engine is built; raise EngineStartError if it cannot be."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_core_main, args=(child, self.llm_kwargs), name="xytune-engine-core",
                                 daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(self.start_timeout_s):
            self._proc.kill()
            raise EngineStartError(f"the engine process did not start within {self.start_timeout_s:.0f} s.")
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineStartError(f"the engine process exited with code {self._proc.exitcode}.") from None
        if isinstance(msg, EngineFailed):
            self._proc.join(5)
            raise EngineStartError(msg.message)
        self.info, self.tokenizer, self.dtype, self.fanout.snapshot = msg.info, msg.tokenizer, msg.dtype, msg.snapshot
        self._reader = threading.Thread(target=self._read, name="xytune-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout_s: float = 60) -> None:
        """Let the core finish what it holds, then end it."""
        if self._proc is None:
            return
        try:
            self._send(StopEngine())
        except (OSError, ValueError):
            pass
        if self._reader is not None:
            self._reader.join(timeout_s)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()

    @property
    def num_active(self) -> int:
        return self.fanout.num_active

    def snapshot(self) -> dict:
        return self.fanout.snapshot

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Validate and send a request; its updates arrive on the returned queue."""
        if self.error is not None:
            raise RuntimeError(f"engine failed: {self.error}")
        self.info.validate_prompt(prompt_ids, params)
        queue = self.fanout.register(request_id)
        self._send(AddRequest(request_id, list(prompt_ids), params))
        return queue

    def abort(self, request_id: str) -> None:
        if self.fanout.drop(request_id) and self.error is None:
            self._send(AbortRequest(request_id))

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        """The reader thread: one message per step from the core."""
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, StepDone):
                    self.fanout.on_step(msg)
                elif isinstance(msg, EngineIdle):
                    self.fanout.snapshot = msg.snapshot
                elif isinstance(msg, RequestRejected):
                    self.fanout.fail(msg.request_id, RuntimeError(msg.message))
                elif isinstance(msg, EngineCrashed):
                    raise RuntimeError(msg.message)
                elif isinstance(msg, EngineStopped):
                    return
        except BaseException as exc:  # noqa: BLE001 - a dead core fails every waiting request, never hangs it
            self.error = exc if not isinstance(exc, EOFError) else RuntimeError("the engine process exited")
            self.fanout.fail_all(self.error)
