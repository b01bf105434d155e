"""A real ``xytune serve`` process on a free loopback port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
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
    proc = subprocess.Popen([sys.executable, "-m", "xytune.cli", "serve", "--port", str(port), "--dtype", "float32",
                             "--profile", str(REFERENCE_TABLE), "--allow-mismatch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()}")
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
