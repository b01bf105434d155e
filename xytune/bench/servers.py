"""``xytune bench servers``: several ``xytune serve`` variants side by side on one trace.

Each variant (a name and its serve flags, say ``xy="--policy xy"``) runs as
its own server on loopback. All servers are up for the whole run, but only
one is loaded at a time, and the variants take turns at every rate (A, B, C
at rate 1, then A, B, C at rate 2, ...), so a machine whose speed drifts
affects them alike. Every variant gets the same seeded prompts and arrivals.
The result is each variant's capacity (the highest rate at which at least
90% of requests meet both SLOs) and its ratio to the others, plus the
server-side figures from /metrics (step-latency error, spec acceptance).
"""

from __future__ import annotations

import asyncio
import math
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from xytune.bench.serve import BenchPrompt, capacity, run_rate, summarize


@dataclass
class Variant:
    name: str
    args: list[str]  # `xytune serve` flags, or the whole command of an external server (``external``)
    port: int = 0
    external: bool = False  # any OpenAI-compatible server started by its own command, ``{port}`` filled in
    proc: subprocess.Popen | None = None
    rows: list[dict] = field(default_factory=list)
    server_metrics: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def parse_variant(spec: str, external: bool = False) -> Variant:
    """``NAME="serve flags"``, or with ``external`` ``NAME="command ... {port} ..."`` (say llama.cpp's
    ``llama-server -m model.gguf --port {port}``)."""
    name, sep, args = spec.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"a variant is NAME=\"{'command' if external else 'serve flags'}\", not {spec!r}")
    if external and "{port}" not in args:
        raise ValueError(f"an external server's command must take its port as {{port}}: {spec!r}")
    return Variant(name.strip(), shlex.split(args), external=external)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(variant: Variant, common: list[str], timeout_s: float = 300) -> None:
    """Start the variant's server and wait for /health; raise RuntimeError with its stderr if it dies."""
    variant.port = _free_port()
    if variant.external:
        cmd = [a.replace("{port}", str(variant.port)) for a in variant.args]
    else:
        cmd = [sys.executable, "-m", "xytune.cli", "serve", "--port", str(variant.port), *common, *variant.args]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a server that logs a lot never blocks on it
    try:
        variant.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    except OSError as exc:
        raise RuntimeError(f"server {variant.name!r} could not start: {exc}") from None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if variant.proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server {variant.name!r} exited: {log.read().strip()[-500:]}")
        try:
            if httpx.get(f"{variant.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"server {variant.name!r} did not come up in {timeout_s:.0f} s")


def stop(variant: Variant) -> None:
    if variant.proc is not None and variant.proc.poll() is None:
        variant.proc.terminate()
        try:
            variant.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            variant.proc.kill()


def scrape(variant: Variant) -> dict:
    """The gauges of interest from the variant's /metrics (none from an external server)."""
    if variant.external:
        return {}
    wanted = ("xytune_cost_model_step_error_ratio", "xytune_spec_acceptance_rate", "xytune_spec_tokens_per_step",
              "xytune_prefix_cache_hit_rate", "xytune_preemptions_total")
    body = httpx.get(f"{variant.url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name in wanted}


def run(variants: list[Variant], common: list[str], prompts: list[BenchPrompt], rates: list[float], seed: int,
        slo_ttft_ms: float, slo_tpot_ms: float, model: str, progress=None, repeats: int = 1) -> dict:
    """``repeats``: each rate runs this many times (arrivals seeded ``seed``, ``seed + 1``, ...), the variants
    taking turns at every repeat; a rate's figures pool all of its requests."""
    try:
        for v in variants:
            start(v, common)
        for rate in rates:
            pooled = {v.name: ([], 0.0) for v in variants}
            for rep in range(repeats):
                for v in variants:
                    if progress:
                        progress(f"rate {rate:g} req/s on {v.name} ({rep + 1}/{repeats}): {len(prompts)} requests...")
                    results, wall = asyncio.run(run_rate(v.url, model, prompts, rate, seed + rep, None, True, 600.0))
                    pooled[v.name] = (pooled[v.name][0] + results, pooled[v.name][1] + wall)
            for v in variants:
                v.rows.append(summarize(*pooled[v.name], rate, slo_ttft_ms, slo_tpot_ms))
        for v in variants:
            v.server_metrics = scrape(v)
    finally:
        for v in variants:
            stop(v)
    caps = {v.name: capacity(v.rows) for v in variants}
    return {"rates": rates, "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "repeats": repeats,
            "capacity": caps,
            "variants": [{"name": v.name, "args": v.args, "rows": v.rows, "server": v.server_metrics}
                         for v in variants]}


def render(result: dict, console) -> None:

    names = [v["name"] for v in result["variants"]]
    t = Table("variant", *[f"{r:g} req/s" for r in result["rates"]], "capacity", "out tok/s (max)",
              "step err", "spec accept", "tok/step",
              title=f"SLO attainment (TTFT <= {result['slo_ttft_ms']:g} ms and TPOT <= "
                    f"{result['slo_tpot_ms']:g} ms), variants side by side")
    for v in result["variants"]:
        s = v["server"]
        cap = result["capacity"][v["name"]]
        t.add_row(v["name"], *[f"{r['slo_attainment']:.0%}" for r in v["rows"]],
                  "-" if cap is None else f"{cap:g}", f"{max(r['output_throughput'] for r in v['rows']):.1f}",
                  _pct(s.get("xytune_cost_model_step_error_ratio")), _pct(s.get("xytune_spec_acceptance_rate")),
                  f"{s['xytune_spec_tokens_per_step']:.2f}" if s.get("xytune_spec_tokens_per_step") else "-")
    console.print(t)
    caps = result["capacity"]
    for a in names:
        for b in names:
            if a != b and caps[a] and caps[b] and math.isfinite(caps[a] * caps[b]):
                console.print(f"capacity {a} / {b}: {caps[a] / caps[b]:.2f}x")


def _pct(x) -> str:
    return "-" if not x else f"{x:.1%}"
