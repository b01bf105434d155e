"""What serving adds to a batch-1 decode step: a real ``xytune serve`` streaming one request against the same
engine stepped in this process, same weights, dtype and cost table, the two taking turns.

The served figure is the median gap between streamed chunks as the ``openai`` client sees them (the engine's
step plus its process hop, detokenizing, SSE and HTTP); the in-process one is the median ``Engine.step``.

    python scripts/served_overhead.py --profile TABLE [--dtype bfloat16] [--quantization int4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

from openai import OpenAI

from xytune.bench import servers
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM

NEW_TOKENS = 128


def fail(message: str) -> None:
    """Bad input or a server that cannot start: one line and exit 2, as the xytune commands do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
    server = servers.Variant("xytune", engine_args)
    try:
        servers.start(server, [])
    except RuntimeError as exc:
        fail(str(exc).splitlines()[-1])
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        model = client.models.list().data[0].id
        for _ in range(args.rounds):  # the two take turns: the machine's speed drifts
            served, alone = served_gap_ms(client, model), in_process_step_ms(llm)
            print(f"served chunk gap p50 {served:.1f} ms, in-process step p50 {alone:.1f} ms, "
                  f"served / in-process {served / alone:.2f}", flush=True)
    finally:
        servers.stop(server)


if __name__ == "__main__":
    main()
