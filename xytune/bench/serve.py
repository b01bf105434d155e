"""``xytune bench serve``: load an OpenAI-compatible server with Poisson arrivals and measure latency SLOs.

Works against any server that streams ``/v1/completions`` (xytune, vLLM,
SGLang...). Per request it records time to first token (TTFT), time per
output token after the first (TPOT) and the inter-token latencies (ITL);
per rate it reports percentiles, throughput, goodput (requests/s meeting both
SLOs) and, over a sweep, the capacity: the highest rate at which at least 90%
of requests meet both SLOs.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.table import Table


@dataclass
class BenchPrompt:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def synthetic_prompts(n: int, input_len: int, output_len: int, vocab: int, seed: int,
                      spread: float = 0.5) -> list[BenchPrompt]:
    """Seeded random-token prompts, lengths uniform in ``len * [1 - spread, 1 + spread]``."""
    rng = np.random.default_rng(seed)

    def length(mean):
        return max(1, int(rng.integers(int(mean * (1 - spread)), int(mean * (1 + spread)) + 1)))

    return [BenchPrompt(rng.integers(100, vocab - 100, size=length(input_len)).tolist(), length(output_len))
            for _ in range(n)]


def file_prompts(path: Path, n: int, default_max_tokens: int) -> list[BenchPrompt]:
    """JSONL lines with "prompt" (text or token ids) and optional "max_tokens"."""
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(BenchPrompt(row["prompt"], int(row.get("max_tokens", default_max_tokens))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{i + 1}: each line needs a JSON object with a \"prompt\"") from None
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return (out * (n // len(out) + 1))[:n]


async def _one(client, url: str, model: str, p: BenchPrompt, ignore_eos: bool) -> RequestResult:
    body = {"model": model, "prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    res, last, chunks = RequestResult(ok=False), None, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                if not data["choices"] or not data["choices"][0].get("text"):
                    continue
                chunks += 1
                if last is None:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
        res.latency_s = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as exc:  # a failed request is counted, not fatal to the run
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_rate(url: str, model: str, prompts: list[BenchPrompt], rate: float, seed: int, api_key: str | None,
                   ignore_eos: bool, timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` with Poisson arrivals at ``rate`` requests/s; returns results and the wall time."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(prompts)) if np.isfinite(rate) else np.zeros(len(prompts))
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for p, gap in zip(prompts, gaps):
            await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(_one(client, url, model, p, ignore_eos)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], wall_s: float, rate: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict:
    ok = [r for r in results if r.ok]

    def pct(values, scale=1e3):
        if not values:
            return {"p50": None, "p90": None, "p99": None, "mean": None}
        a = np.asarray(values) * scale
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

    good = [r for r in ok if r.ttft_s * 1e3 <= slo_ttft_ms and r.tpot_s * 1e3 <= slo_tpot_ms]
    return {
        "rate": rate, "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall_s, "request_throughput": len(ok) / wall_s,
        "output_throughput": sum(r.output_tokens for r in ok) / wall_s,
        "ttft_ms": pct([r.ttft_s for r in ok]), "tpot_ms": pct([r.tpot_s for r in ok if r.output_tokens > 1]),
        "itl_ms": pct([x for r in ok for x in r.itl_s]),
        "slo_attainment": len(good) / len(results) if results else 0.0, "goodput": len(good) / wall_s,
    }


def capacity(rows: list[dict], attainment: float = 0.9) -> float | None:
    """Highest swept rate at which at least ``attainment`` of requests met both SLOs."""
    ok = [r["rate"] for r in rows if r["slo_attainment"] >= attainment]
    return max(ok) if ok else None


def render(rows: list[dict], cap: float | None, slo_ttft_ms: float, slo_tpot_ms: float, console) -> None:

    t = Table("rate req/s", "done", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
              "ITL p50/p99 ms", "SLO met", "goodput",
              title=f"SLOs: TTFT <= {slo_ttft_ms:g} ms, TPOT <= {slo_tpot_ms:g} ms")

    def f(d, keys):
        return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in keys)

    for r in rows:
        t.add_row(f"{r['rate']:g}", f"{r['completed']}/{r['requests']}", f"{r['request_throughput']:.2f}",
                  f"{r['output_throughput']:.1f}", f(r["ttft_ms"], ("p50", "p90", "p99")),
                  f(r["tpot_ms"], ("p50", "p90", "p99")), f(r["itl_ms"], ("p50", "p99")),
                  f"{r['slo_attainment']:.0%}", f"{r['goodput']:.2f}")
    console.print(t)
    if len(rows) > 1:
        console.print(f"capacity (>= 90% of requests meet both SLOs): "
                      f"{'none of the swept rates' if cap is None else f'{cap:g} req/s'}")
