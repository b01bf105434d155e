"""What serving adds to a batch-1 decode step: a real ``xytune serve`` streaming one request against the same
engine stepped in this process, same weights, dtype and cost table, the two taking turns.

The served figure is the median gap between streamed chunks as the ``openai`` client sees them (the engine's
step plus its process hop, detokenizing, SSE and HTTP); the in-process one is the median ``Engine.step``.

    python scripts/served_overhead.py --profile TABLE [--dtype bfloat16] [--quantization int4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import httpx
from openai import OpenAI

from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM

NEW_TOKENS = 128


def fail(message: str) -> None:
    """Bad input or a server that cannot start: one line and exit 2, as the xytune commands do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "xytune.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            fail(f"the server exited: {log.read().strip().splitlines()[-1]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    fail("the server did not come up in 300 s")


def served_gap_ms(client: OpenAI, model: str) -> float:
    gaps, last = [], None
    stream = client.completions.create(model=model, prompt="The history of the city of Paris", stream=True,
                                       max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    for _ in stream:
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return statistics.median(gaps) * 1e3


def in_process_step_ms(llm: LLM) -> float:
    llm.engine.add_request(list(range(200, 209)), SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                                 ignore_eos=True))
    seconds = []
    while llm.engine.has_work():
        start = time.perf_counter()
        llm.engine.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:]) * 1e3  # past the prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.rounds < 1:
        fail("--rounds must be at least 1")
    engine_args = ["--dtype", args.dtype, "--quantization", args.quantization, "--policy", "xy",
                   "--profile", args.profile]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            llm = LLM(dtype=args.dtype, quantization=args.quantization, profile=args.profile, policy="xy",
                      kv_cache_gb=0.25)
        except (ValueError, OSError) as exc:
            fail(str(exc))
    proc, base = start_server(engine_args)
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        model = client.models.list().data[0].id
        for _ in range(args.rounds):  # the two take turns: the machine's speed drifts
            served, alone = served_gap_ms(client, model), in_process_step_ms(llm)
            print(f"served chunk gap p50 {served:.1f} ms, in-process step p50 {alone:.1f} ms, "
                  f"served / in-process {served / alone:.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
