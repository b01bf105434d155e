"""``xytune bench serve``: load an OpenAI-compatible server with Poisson arrivals and measure latency SLOs.

Works against any server that streams ``/v1/completions`` or ``/v1/chat/completions`` (xytune, vLLM,
SGLang...). Per request it records time to first token (TTFT), time per output token after the first
(TPOT), the inter-token latencies (ITL) and the end-to-end latency (E2EL); per rate it reports them under
the keys ``vllm bench serve`` writes (``median_ttft_ms``, ``p99_tpot_ms``, ``request_goodput``,
``total_token_throughput``...), so scripts that read vLLM's results read these, and, over a sweep, the
capacity: the highest rate at which at least 90% of requests meet both SLOs.
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
    input_tokens: int = 0
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


def arrival_times(n: int, rate: float, seed: int) -> np.ndarray:
    """Seconds from the start at which ``n`` requests arrive: a seeded Poisson process at ``rate`` requests/s
    (all at once for an infinite rate). Every benchmark and the simulator draw the same arrivals."""
    rng = np.random.default_rng(seed)
    if not np.isfinite(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def _request_body(endpoint: str, model: str, p: BenchPrompt, ignore_eos: bool) -> dict:
    body = {"model": model, "max_tokens": p.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    if endpoint == "/v1/chat/completions":
        return {**body, "messages": [{"role": "user", "content": p.prompt}]}
    return {**body, "prompt": p.prompt}


def _delta_text(endpoint: str, choice: dict) -> str | None:
    if endpoint == "/v1/chat/completions":
        return (choice.get("delta") or {}).get("content")
    return choice.get("text")


async def _one(client, url: str, endpoint: str, model: str, p: BenchPrompt, ignore_eos: bool) -> RequestResult:
    start = time.perf_counter()
    res, last, chunks = RequestResult(ok=False), None, 0
    try:
        async with client.stream("POST", f"{url}{endpoint}", json=_request_body(endpoint, model, p, ignore_eos)) as r:
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
                    res.input_tokens = data["usage"]["prompt_tokens"]
                if not data["choices"] or not _delta_text(endpoint, data["choices"][0]):
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
                   ignore_eos: bool, timeout_s: float, endpoint: str = "/v1/completions",
                   max_concurrency: int | None = None) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` with Poisson arrivals at ``rate`` requests/s; returns results and the wall time.

    ``max_concurrency`` (as in ``vllm bench serve``): a request that arrives while that many are in flight
    waits for one to finish; its latencies count from when it was sent.
    """
    gaps = np.diff(arrival_times(len(prompts), rate, seed), prepend=0.0)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    slots = asyncio.Semaphore(max_concurrency or len(prompts) or 1)

    async def limited(client, p):
        async with slots:
            return await _one(client, url, endpoint, model, p, ignore_eos)

    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for p, gap in zip(prompts, gaps):
            await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(limited(client, p)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


PERCENTILES = (90, 99)  # besides the median; vLLM's keys: p90_ttft_ms, p99_ttft_ms


def _latency_stats(name: str, seconds: list[float]) -> dict:
    """``mean_/median_/std_/pNN_{name}_ms`` as ``vllm bench serve`` names them (None without samples)."""
    keys = ["mean", "median", "std", *(f"p{q}" for q in PERCENTILES)]
    if not seconds:
        return {f"{k}_{name}_ms": None for k in keys}
    a = np.asarray(seconds) * 1e3
    values = [a.mean(), np.median(a), a.std(), *(np.percentile(a, q) for q in PERCENTILES)]
    return {f"{k}_{name}_ms": float(v) for k, v in zip(keys, values)}


def summarize(results: list[RequestResult], wall_s: float, rate: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict:
    """One rate's figures, flat, under ``vllm bench serve``'s keys, plus the SLO attainment."""
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s * 1e3 <= slo_ttft_ms and r.tpot_s * 1e3 <= slo_tpot_ms]
    input_tokens, output_tokens = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    return {
        "request_rate": rate, "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5], "duration": wall_s,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / wall_s, "output_throughput": output_tokens / wall_s,
        "total_token_throughput": (input_tokens + output_tokens) / wall_s,
        "request_goodput": len(good) / wall_s, "slo_attainment": len(good) / len(results) if results else 0.0,
        **_latency_stats("ttft", [r.ttft_s for r in ok]),
        **_latency_stats("tpot", [r.tpot_s for r in ok if r.output_tokens > 1]),
        **_latency_stats("itl", [x for r in ok for x in r.itl_s]),
        **_latency_stats("e2el", [r.latency_s for r in ok]),
    }


def detokenized(url: str, headers: dict, model: str, prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Token-id prompts as text, through the server's ``/detokenize`` (xytune's and vLLM's), for chat."""
    out = []
    for p in prompts:
        try:
            r = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": p.prompt}, headers=headers,
                           timeout=30)
            r.raise_for_status()
            out.append(BenchPrompt(r.json()["prompt"], p.max_tokens))
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise ValueError(f"chat with synthetic prompts needs the server's /detokenize ({exc}); "
                             "give --dataset FILE of text prompts instead") from None
    return out


def saved_result(rows: list[dict], cap: float | None, **settings) -> dict:
    """What ``--save-result`` writes: vLLM's metadata keys and, for one rate, that rate's figures at the top
    level as ``vllm bench serve`` has them; a sweep keeps every rate under ``rates`` and the capacity."""
    meta = {"date": time.strftime("%Y%m%d-%H%M%S"), "backend": "openai-chat" if settings["endpoint"].endswith(
        "chat/completions") else "openai", "model_id": settings.pop("model"), "burstiness": 1.0, **settings}
    if len(rows) == 1:
        return {**meta, **rows[0]}
    return {**meta, "rates": rows, "capacity": cap}


def default_result_filename(model: str, rates: list[float], max_concurrency: int | None) -> str:
    """vLLM's name for a result file: ``<backend>-<rate>qps[-concurrency<N>]-<model>-<date>.json``."""
    rate = "-".join(f"{r:g}" for r in rates)
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency else ""
    return f"openai-{rate}qps{concurrency}-{model.split('/')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def capacity(rows: list[dict], attainment: float = 0.9) -> float | None:
    """Highest swept rate at which at least ``attainment`` of requests met both SLOs."""
    ok = [r["request_rate"] for r in rows if r["slo_attainment"] >= attainment]
    return max(ok) if ok else None


def render(rows: list[dict], cap: float | None, slo_ttft_ms: float, slo_tpot_ms: float, console) -> None:
    t = Table("rate req/s", "done", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
              "ITL p50/p99 ms", "SLO met", "goodput",
              title=f"SLOs: TTFT <= {slo_ttft_ms:g} ms, TPOT <= {slo_tpot_ms:g} ms")

    def f(d, name, keys):
        return "/".join("-" if d[f"{k}_{name}_ms"] is None else f"{d[f'{k}_{name}_ms']:.0f}" for k in keys)

    for r in rows:
        t.add_row(f"{r['request_rate']:g}", f"{r['completed']}/{r['num_prompts']}", f"{r['request_throughput']:.2f}",
                  f"{r['output_throughput']:.1f}", f(r, "ttft", ("median", "p90", "p99")),
                  f(r, "tpot", ("median", "p90", "p99")), f(r, "itl", ("median", "p99")),
                  f"{r['slo_attainment']:.0%}", f"{r['request_goodput']:.2f}")
    console.print(t)
    if len(rows) > 1:
        console.print(f"capacity (>= 90% of requests meet both SLOs): "
                      f"{'none of the swept rates' if cap is None else f'{cap:g} req/s'}")
