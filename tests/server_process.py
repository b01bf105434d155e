"""A real ``xytune serve`` process on a free loopback port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from conftest import REFERENCE_TABLE, require_default_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``xytune serve`` on a free loopback port (float32, the reference table), once /health answers."""
    require_default_model()
    port = free_port()
    # the server's output goes to a file: a pipe nobody reads fills up (64 KB) and blocks the server mid-request
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "xytune.cli", "serve", "--port", str(port), "--dtype", "float32",
                             "--profile", str(REFERENCE_TABLE), "--allow-mismatch", *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited: {log.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
