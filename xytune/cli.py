"""The ``xytune`` command line (typer + rich).

Every user error is one red sentence and exit code 2; a regression found by
``compare`` is exit code 1; an interrupted profile saves its partial table
and exits 130.
"""

from __future__ import annotations

import json
from dataclasses import replace
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from xytune import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline profiler, cost tables and regression reports for LLM serving (after XY-Serve).")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        console.print(f"xytune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _interrupt(signum, frame):
    """SIGTERM takes the Ctrl-C path, so a killed sweep still saves its partial table."""
    raise KeyboardInterrupt


def _default_dtypes(backend: str) -> list[str]:
    """The dtypes a profile tries: each is probed, one that does not run is pruned, the table says which is fast."""
    return ["float32", "bfloat16"] if backend == "cpu" else ["bfloat16", "float16"]


@app.command()
def profile(
    device: str = typer.Option("cpu", help="cpu, cuda[:N], npu[:N], ascend910b or ascend910b1..b4."),
    model: str = typer.Option("smollm2-135m", help="Preset name, .gguf file or Hugging Face folder."),
    output: Path = typer.Option(None, "--output", "-o", help="Parquet cost table to write "
                                "[default: ./<device>-<model>.parquet]."),
    tp: int = typer.Option(1, help="Tensor-parallel degree: GEMMs are sharded per rank."),
    dtypes: str = typer.Option(None, "--dtypes", help="Comma list [default: float32,bfloat16 on CPU; "
                               "bfloat16,float16 elsewhere]."),
    max_tokens: int = typer.Option(4096, help="Largest M (tokens per step) to profile."),
    max_seqs: int = typer.Option(256, help="Largest M for lm_head (one sampled token per sequence)."),
    buckets: str = typer.Option(None, help="Explicit comma list of M buckets (overrides the default spacing)."),
    targets: str = typer.Option(None, help="Comma list of targets to profile (qkv,o,gate_up,down,lm_head,attention)."),
    search: str = typer.Option("auto", help="grid | optuna | auto (grid for small config spaces)."),
    trials: int = typer.Option(24, help="Timed Optuna trials per shape."),
    storage: str = typer.Option(None, help="Optuna storage: a journal file path or a database URL."),
    budget_ms: float = typer.Option(None, help="Sampling time per point in ms."),
    threads: int = typer.Option(None, help="CPU threads (set and recorded) [default: torch's]."),
    quick: bool = typer.Option(False, "--quick", help="Coarse buckets and short timing: about a minute on 2 cores."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial table, skipping finished rows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing table."),
    seed: int = typer.Option(0, help="Seed of the Optuna sampler."),
    checkpoint_s: float = typer.Option(5.0, help="Seconds between checkpoints of the partial table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Sweep GEMM shape buckets and kernel configs on DEVICE into a Parquet cost table."""
    from xytune.devices import DeviceError, get_device
    from xytune.geometry import GeometryError, resolve_geometry
    from xytune.primitives import DTYPES
    from xytune.sweep import SweepError, Sweep, SweepSettings, m_buckets, quick_buckets
    from xytune.table import TableError

    try:
        dev = get_device(device, threads=threads)
        geometry = resolve_geometry(model, tp=tp)
        dts = [d.strip() for d in dtypes.split(",")] if dtypes else _default_dtypes(dev.backend)
        bad = [d for d in dts if d not in DTYPES]
        if bad:
            fail(f"Unknown dtype(s) {bad}; choose from {list(DTYPES)}.")
        if buckets:
            try:
                ms = sorted({int(b) for b in buckets.split(",")})
            except ValueError:
                fail(f"--buckets must be a comma list of integers, not {buckets!r}.")
            if ms[0] < 1:
                fail("--buckets must all be at least 1.")
        else:
            ms = (quick_buckets if quick else m_buckets)(max_tokens)
        settings = (SweepSettings.quick(dts, max_tokens) if quick else SweepSettings(dtypes=dts, buckets=ms))
        if checkpoint_s < 0:
            fail("--checkpoint-s must be >= 0.")
        settings = replace(settings, buckets=ms, max_seqs=max_seqs, search=search, trials=trials, storage=storage,
                           seed=seed, checkpoint_every_s=checkpoint_s, targets=[t.strip() for t in targets.split(",")] if targets else None)
        if budget_ms is not None:
            if budget_ms <= 0:
                fail("--budget-ms must be positive.")
            settings = replace(settings, timing=replace(settings.timing, budget_s=budget_ms / 1e3))
        out = output or Path(f"{dev.backend}-{geometry.name}.parquet")
        sweep = Sweep(dev, geometry, settings, out, resume=resume, overwrite=overwrite)
    except (DeviceError, GeometryError, SweepError, TableError) as exc:
        fail(str(exc))

    signal.signal(signal.SIGTERM, _interrupt)
    console.print(f"profiling {geometry.name} (tp={tp}) on {dev.name}: {len(sweep.groups)} shape groups, "
                  f"dtypes {','.join(dts)}, M up to {max(ms)} -> {out}")
    try:
        table = sweep.run(progress=progress)
    except KeyboardInterrupt:
        if not sweep.table.meta:  # stopped while measuring the peaks, before the first checkpoint
            fail(f"interrupted before the first checkpoint; nothing was written to {out}.", code=130)
        fail(f"interrupted; the partial table ({len(sweep.table.rows)} rows) is saved in {out}; "
             "rerun with --resume to finish it.", code=130)
    console.print(f"[green]wrote[/] {out}: {len(table.rows)} rows")


@app.command()
def show(
    table: Path = typer.Argument(..., help="A cost table (.parquet)."),
    format: str = typer.Option("table", "--format", help="table | json"),
):
    """Summarise a cost table: device, fingerprint, counts, best primitive per op and M."""
    from xytune.summary import render_summary, summarize_table
    from xytune.table import TableError, read_table

    if format not in ("table", "json"):
        fail(f"--format must be table or json, not {format!r}.")
    try:
        summary = summarize_table(read_table(table))
    except TableError as exc:
        fail(str(exc))
    if format == "json":
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render_summary(summary, console)


@app.command()
def plot(
    table: Path = typer.Argument(..., help="A cost table (.parquet)."),
    output: Path = typer.Option(..., "--output", "-o", help="Image to write (.png, .svg, .pdf)."),
    dtype: str = typer.Option(None, help="Which dtype to plot [default: the table's first]."),
):
    """Plot latency and fraction of peak against M per primitive, the best choice marked."""
    from xytune.plot import plot_table
    from xytune.table import TableError, read_table

    try:
        out = plot_table(read_table(table), output, dtype)
    except (TableError, ValueError) as exc:
        fail(str(exc))
    console.print(f"[green]wrote[/] {out}")


@app.command()
def compare(
    base: Path = typer.Argument(..., help="Baseline cost table."),
    new: Path = typer.Argument(..., help="New cost table."),
    threshold: float = typer.Option(0.10, help="Relative slowdown that counts (0.10 = 10%)."),
    alpha: float = typer.Option(0.05, help="Significance level of the Mann-Whitney U test."),
    report: Path = typer.Option(None, help="Write the markdown report here (e.g. $GITHUB_STEP_SUMMARY)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch",
                                        help="Compare tables of different devices (the report says so on top)."),
):
    """Compare two cost tables; exit 1 on a significant regression beyond the threshold."""
    from xytune.compare import CompareError, compare_tables, markdown_report
    from xytune.table import TableError, read_table

    try:
        result = compare_tables(read_table(base), read_table(new), threshold, alpha, allow_mismatch)
    except (TableError, CompareError) as exc:
        fail(str(exc))
    text = markdown_report(result, str(base), str(new))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text + "\n")
    console.print(text, markup=False, highlight=False)
    raise typer.Exit(1 if len(result.regressions) else 0)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face folder."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    max_tokens: int = typer.Option(64, help="Most new tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(-1, help="-1 = off."),
    top_p: float = typer.Option(1.0, help="Nucleus mass."),
    min_p: float = typer.Option(0.0, help="Drop tokens less likely than this fraction of the top one (0 = off)."),
    seed: int = typer.Option(None, help="Sampling seed (reproducible output)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past end-of-sequence."),
    repetition_penalty: float = typer.Option(1.0, help="vLLM's: above 1 discourages prompt and output tokens."),
    presence_penalty: float = typer.Option(0.0, help="OpenAI's, -2..2: per token already in the output."),
    frequency_penalty: float = typer.Option(0.0, help="OpenAI's, -2..2: per occurrence in the output."),
    logprobs: int = typer.Option(None, help="With --json: each token's logprob and this many top ones (0-20)."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option("cpu", help="cpu, cuda[:N], npu[:N]."),
    kv_cache_gb: float = typer.Option(1.0, help="KV cache size."),
    threads: int = typer.Option(None, help="CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, timings and finish reason as JSON."),
    attention: str = typer.Option("meta", help="meta (Meta-Attention) | reference."),
    gemm: str = typer.Option("auto", help="auto (smooth with --profile, else packed) | smooth | packed | plain."),
    profile: Path = typer.Option(None, help="Cost table: Meta-Attention tiles and SmoothGEMM plans come from it."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use a table from another device."),
    speculative: str = typer.Option(None, help="Speculative decoding: ngram (prompt lookup) [default: off]."),
    num_speculative_tokens: int = typer.Option(4, help="Draft tokens verified per step."),
):
    """Generate a completion for one prompt with the xytune engine."""
    import time

    from xytune.cost_model import CostModelError
    from xytune.devices import DeviceError, get_device
    from xytune.runtime.config import ModelLoadError
    from xytune.runtime.engine import RequestError
    from xytune.runtime.sampling import SamplingParams

    try:
        dev = get_device(device)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, seed=seed, stop=list(stop or []), ignore_eos=ignore_eos,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logprobs=logprobs)
        from xytune.runtime.llm import LLM

        start = time.perf_counter()
        llm = LLM(model=model, dtype=dtype, device=str(dev.torch_device), kv_cache_gb=kv_cache_gb, threads=threads,
                  attention=attention, gemm=gemm, profile=str(profile) if profile else None,
                  allow_mismatch=allow_mismatch, speculative=speculative,
                  num_speculative_tokens=num_speculative_tokens)
        load_s = time.perf_counter() - start
        out = llm.generate(prompt, params, chat=chat)[0]
    except (DeviceError, ModelLoadError, RequestError, CostModelError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        n = len(out.token_ids)
        decode_s = out.metrics["latency_s"] - (out.metrics["ttft_s"] or 0)
        sys.stdout.write(json.dumps({
            "model": model, "dtype": str(llm.dtype).replace("torch.", ""), "text": out.text,
            "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            **({"logprobs": [{"logprob": lp, "top": [{"id": t, "logprob": v} for t, v in top]}
                             for lp, top in out.logprobs]} if out.logprobs is not None else {}),
            "timings": {"load_s": load_s, "ttft_s": out.metrics["ttft_s"], "total_s": out.metrics["latency_s"],
                        "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None},
        }, indent=2) + "\n")
    else:
        sys.stdout.write(out.text + "\n")


def _cached_quick_profile(dev, model: str) -> Path:
    """A quick profile of this device and model, made once and kept in ~/.cache/xytune."""
    import hashlib
    import os

    from xytune.geometry import resolve_geometry
    from xytune.sweep import Sweep, SweepSettings

    geometry = resolve_geometry(model)
    fp = dev.fingerprint()
    key = hashlib.sha256(json.dumps([fp.get(k) for k in ("backend", "device_name", "compute_units", "threads",
                                                           "torch")] + [geometry.to_dict()]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XYTUNE_CACHE", Path.home() / ".cache" / "xytune")) / "profiles"
    path = cache / f"{dev.backend}-{geometry.name}-{key}.parquet"
    if path.exists():
        from xytune.table import TableError, read_table

        try:
            if read_table(path).complete:
                err_console.print(f"using the cached quick profile {path}", highlight=False)
                return path
        except TableError:
            pass
    err_console.print(f"no --profile given: profiling {geometry.name} on {dev.name} quickly (about half a minute) "
                      f"into {path}; pass --profile to use a full table", highlight=False)
    Sweep(dev, geometry, SweepSettings.quick(_default_dtypes(dev.backend)), path, overwrite=True).run(progress=False)
    return path


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_model_name: str = typer.Option(None, help="Model id clients send [default: --model]."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option("cpu", help="cpu, cuda[:N], npu[:N]."),
    kv_cache_gb: float = typer.Option(1.0, help="KV cache size."),
    max_num_batched_tokens: int = typer.Option(2048, help="Token budget of one step."),
    max_num_seqs: int = typer.Option(256, help="Most requests running at once."),
    threads: int = typer.Option(None, help="CPU threads."),
    profile: Path = typer.Option(None, help="Cost table for this device [default: a quick profile, cached]."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use a table from another device."),
    policy: str = typer.Option("xy", help="xy | chunked | prefill-first."),
    slo_tpot_ms: float = typer.Option(200.0, help="TPOT SLO the xy policy serves: its step target unless "
                                      "--tbt-slo-ms is given."),
    tbt_slo_ms: float = typer.Option(None, help="xy: a step-time target of its own [default: --slo-tpot-ms]."),
    ttft_slo_ms: float = typer.Option(2000.0, help="xy: a prompt waiting half of this gets longer steps."),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching",
                                               help="Reuse the KV blocks of shared prompt prefixes."),
    speculative: str = typer.Option(None, help="Speculative decoding: ngram (prompt lookup) [default: off]."),
    num_speculative_tokens: int = typer.Option(4, help="Draft tokens verified per request per step."),
    attention: str = typer.Option("meta", help="meta (Meta-Attention, tiles from the table) | reference."),
    gemm: str = typer.Option("smooth", help="smooth (SmoothGEMM planned from the table) | packed | plain."),
    engine_process: bool = typer.Option(True, "--engine-process/--no-engine-process",
                                        help="Run the engine in a process of its own, apart from HTTP and "
                                        "streaming (else in a thread of the server's process)."),
):
    """Serve the model over an OpenAI-compatible HTTP API (completions and chat, streaming or not)."""
    import uvicorn

    from xytune.devices import DeviceError, get_device
    from xytune.runtime.async_engine import AsyncEngine
    from xytune.runtime.config import ModelLoadError
    from xytune.runtime.llm import LLM
    from xytune.runtime.server import build_app

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}.")
    from xytune.cost_model import CostModelError

    from xytune.runtime.engine_core import EngineProcess, EngineStartError
    from xytune.runtime.metrics import ServingMetrics

    try:
        dev = get_device(device, threads=threads)
        if profile is None:
            profile = _cached_quick_profile(dev, model)
        llm_kwargs = dict(model=model, dtype=dtype, device=str(dev.torch_device), kv_cache_gb=kv_cache_gb,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          threads=threads, profile=str(profile), allow_mismatch=allow_mismatch, policy=policy,
                          tbt_slo_ms=tbt_slo_ms, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=slo_tpot_ms,
                          enable_prefix_caching=enable_prefix_caching, speculative=speculative,
                          num_speculative_tokens=num_speculative_tokens, attention=attention, gemm=gemm)
        if engine_process:
            engine = EngineProcess(llm_kwargs, ServingMetrics())
            engine.start()
            tokenizer, dtype_name = engine.tokenizer, engine.dtype
        else:
            llm = LLM(**llm_kwargs)
            engine = AsyncEngine(llm.engine, ServingMetrics())
            engine.start()
            tokenizer, dtype_name = llm.tokenizer, str(llm.dtype).replace("torch.", "")
    except (DeviceError, ModelLoadError, CostModelError, EngineStartError, ValueError) as exc:
        fail(str(exc))
    app = build_app(engine, tokenizer, served_model_name or model, api_key=api_key)
    err_console.print(f"serving {served_model_name or model} ({dtype_name}) on http://{host}:{port}/v1"
                      f"{' (engine in its own process)' if engine_process else ''}", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side measurements.")
app.add_typer(bench_app, name="bench")


@bench_app.command("profile")
def bench_profile(
    device: str = typer.Option("cpu", help="Device to profile."),
    model: str = typer.Option("smollm2-135m", help="Preset name, .gguf file or Hugging Face folder."),
    dtypes: str = typer.Option(None, help="Comma list [default: the device's profile defaults]."),
    max_tokens: int = typer.Option(4096, help="Largest M."),
    num_ms: int = typer.Option(24, help="Off-bucket M values at which to check the cost model."),
    threads: int = typer.Option(None, help="CPU threads."),
    seed: int = typer.Option(0, help="Seed for the off-bucket M values."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Time the --quick and default sweeps and the cost model's error on unseen M, in one run."""
    from xytune.bench_profile import dump, render, run_bench
    from xytune.devices import DeviceError, get_device
    from xytune.geometry import GeometryError, resolve_geometry

    try:
        dev = get_device(device, threads=threads)
        geometry = resolve_geometry(model)
    except (DeviceError, GeometryError) as exc:
        fail(str(exc))
    if num_ms < 1:
        fail("--num-ms must be at least 1.")
    dts = [d.strip() for d in dtypes.split(",")] if dtypes else _default_dtypes(dev.backend)
    with console.status("sweeping (quick, then default) and checking predictions..."):
        results = run_bench(dev, geometry, dts, max_tokens, num_ms, seed)
    render(results, console)
    if json_out:
        dump(results, json_out)


@bench_app.command("runtime")
def bench_runtime(
    dtype: str = typer.Option("bfloat16", help="float32 | bfloat16."),
    threads: int = typer.Option(None, help="CPU threads for both systems."),
    prefill_len: int = typer.Option(512, help="Prompt length of the prefill measurement."),
    gemm: str = typer.Option("auto", help="auto | packed | plain | smooth weight GEMMs for xytune."),
    attention: str = typer.Option("meta", help="meta | reference attention for xytune."),
    profile: Path = typer.Option(None, help="Cost table for --gemm smooth and Meta-Attention's tiles."),
    repeats: int = typer.Option(3, help="Alternating repeats per figure (medians reported)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """xytune's engine against Hugging Face transformers on SmolLM2-135M: prefill, decode steps, batch generate."""
    from xytune.bench_runtime import render, run_bench
    from xytune.runtime.config import ModelLoadError

    try:
        import transformers  # noqa: F401
    except ImportError:
        fail("bench runtime compares against transformers: pip install transformers accelerate")
    if dtype not in ("float32", "bfloat16") or repeats < 1 or prefill_len < 2:
        fail("--dtype must be float32 or bfloat16, --repeats >= 1, --prefill-len >= 2.")
    try:
        results = run_bench(dtype=dtype, threads=threads, prefill_len=prefill_len, repeats=repeats, gemm=gemm,
                            attention=attention, profile=str(profile) if profile else None)
    except (ModelLoadError, ValueError) as exc:
        fail(str(exc))
    render(results, console)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def _checked_rates(sweep_rates: str, num_prompts: int, input_len: int, output_len: int,
                   repeats: int = 1) -> list[float]:
    """The rates of a benchmark sweep, checked with the trace sizes (one line and exit 2 when bad)."""
    try:
        rates = [float(r) for r in sweep_rates.split(",")]
    except ValueError:
        fail(f"--sweep-rates must be a comma list of numbers, not {sweep_rates!r}.")
    if any(not r > 0 for r in rates) or min(num_prompts, input_len, output_len, repeats) < 1:
        fail("rates, --num-prompts, --input-len, --output-len and --repeats must be positive.")
    return rates


@bench_app.command("serve")
def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of an OpenAI-compatible server."),
    rate: float = typer.Option(None, help="Requests per second (Poisson); inf sends all at once."),
    sweep_rates: str = typer.Option(None, help="Comma list of rates; reports the capacity."),
    num_prompts: int = typer.Option(100, help="Requests per rate."),
    dataset: str = typer.Option("synthetic", help="synthetic or a JSONL file of {\"prompt\", \"max_tokens\"}."),
    input_len: int = typer.Option(256, help="Mean prompt tokens (synthetic)."),
    output_len: int = typer.Option(128, help="Mean new tokens (synthetic)."),
    slo_ttft_ms: float = typer.Option(1000.0, help="Time-to-first-token SLO."),
    slo_tpot_ms: float = typer.Option(100.0, help="Time-per-output-token SLO."),
    model: str = typer.Option(None, help="Model id [default: the server's first]."),
    api_key: str = typer.Option(None, help="Bearer key for the server."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Ask for exact output lengths."),
    seed: int = typer.Option(0, help="Seed of lengths, tokens and arrivals."),
    timeout_s: float = typer.Option(600.0, help="Per-request timeout."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Benchmark a running server: TTFT, TPOT, ITL, throughput, goodput and capacity under Poisson load."""
    import asyncio

    import httpx

    from xytune.bench_serve import capacity, file_prompts, render, run_rate, summarize, synthetic_prompts

    if (rate is None) == (sweep_rates is None):
        fail("give exactly one of --rate or --sweep-rates.")
    rates = _checked_rates(str(rate) if rate is not None else sweep_rates, num_prompts, input_len, output_len)
    url = url.rstrip("/")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        models.raise_for_status()
        model = model or models.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        fail(f"cannot list models at {url}/v1/models ({exc}).")
    try:
        if dataset == "synthetic":
            vocab = int(models.json()["data"][0].get("vocab_size", 32000))
            prompts = synthetic_prompts(num_prompts, input_len, output_len, vocab, seed)
        else:
            prompts = file_prompts(Path(dataset), num_prompts, output_len)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    rows = []
    for r in rates:
        with console.status(f"rate {r:g} req/s: {num_prompts} requests..."):
            results, wall = asyncio.run(run_rate(url, model, prompts, r, seed, api_key, ignore_eos, timeout_s))
        rows.append(summarize(results, wall, r, slo_ttft_ms, slo_tpot_ms))
    cap = capacity(rows)
    render(rows, cap, slo_ttft_ms, slo_tpot_ms, console)
    if json_out:
        json_out.write_text(json.dumps({"url": url, "model": model, "rates": rows, "capacity": cap}, indent=2))
    if all(row["completed"] == 0 for row in rows):
        fail("no request completed; first errors: " + "; ".join(rows[0]["errors"]))


@bench_app.command("kernels")
def bench_kernels(
    profile: Path = typer.Option(..., help="Cost table: Meta-Attention tiles and SmoothGEMM segments come from it."),
    dtype: str = typer.Option(None, help="float32 | bfloat16 [default: the dtype the table measured fastest]."),
    requests: str = typer.Option("16,32,64", help="Mixed-batch sizes for Meta-Attention."),
    gemms: str = typer.Option("qkv,o,gate_up,down", help="GEMMs of the model for SmoothGEMM."),
    ms: str = typer.Option(None, help="Comma list of M for SmoothGEMM [default: 26 seeded values in 1..4096]."),
    repeats: int = typer.Option(9, help="Alternating repeats per figure (medians reported)."),
    threads: int = typer.Option(None, help="CPU threads."),
    skip_attention: bool = typer.Option(False, "--skip-attention", help="Only SmoothGEMM."),
    skip_gemm: bool = typer.Option(False, "--skip-gemm", help="Only Meta-Attention."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use a table from another device."),
    device: str = typer.Option(None, help="Where SmoothGEMM runs [default: the table's backend]; "
                               "Meta-Attention is timed on CPU."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Meta-Attention vs SDPA loop / padded SDPA, and SmoothGEMM vs exact / pad-to-bucket / oracle, side by side."""
    import warnings

    import torch

    from xytune.bench_kernels import bench_attention, bench_gemm, render
    from xytune.cost_model import CostModel, CostModelError
    from xytune.devices import DeviceError, get_device
    from xytune.runtime.attention import attention_paths_from_table, meta_tiles_from_table

    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if allow_mismatch else "default")
            model = CostModel.load(profile, allow_mismatch=allow_mismatch)
        gemm_device = get_device(device or model.meta["fingerprint"].get("backend", "cpu"))
        dtype = dtype or model.fastest_dtype()
        if dtype not in model.dtypes:
            raise ValueError(f"the table has no {dtype} rows (it has {', '.join(model.dtypes)}).")
        sizes = [int(x) for x in requests.split(",")]
        m_list = [int(x) for x in ms.split(",")] if ms else None
        if repeats < 1 or any(s < 1 for s in sizes) or any(m < 1 for m in (m_list or [1])):
            raise ValueError("--repeats, --requests and --ms must be positive.")
    except (CostModelError, DeviceError, ValueError) as exc:
        fail(str(exc))
    geo = model.geometry
    tiles = meta_tiles_from_table(model, dtype)
    attention, gemm = [], []
    with console.status("timing...") as status:
        if not skip_attention:
            status.update("Meta-Attention vs SDPA...")
            layer_bytes = sum(g.n * g.k for g in geo.gemms() if g.name != "lm_head") * getattr(torch, dtype).itemsize
            path = attention_paths_from_table(model, dtype, geo.num_layers)["prefill"]  # mixed steps have prefill
            attention = bench_attention(sizes, geo.heads_per_rank, geo.kv_heads_per_rank, geo.head_dim,
                                        getattr(torch, dtype), tiles, repeats, layers=geo.num_layers,
                                        layer_weight_bytes=layer_bytes, engine_path=path)
        if not skip_gemm:
            status.update("SmoothGEMM vs exact / padded / oracle...")
            try:
                gemm = bench_gemm(model, dtype, tuple(gemms.split(",")), m_list, repeats, device=gemm_device)
            except (ValueError, KeyError) as exc:
                fail(str(exc))
    meta = {"attention": f"{dtype}, tiles {tiles}", "gemm": f"{dtype}, buckets of {profile.name}"}
    render(attention, gemm, console, meta)
    if json_out:
        json_out.write_text(json.dumps({"attention": attention, "gemm": gemm, "tiles": tiles, "dtype": dtype},
                                       indent=2, default=str))


@bench_app.command("servers")
def bench_servers(
    variant: list[str] = typer.Option(None, "--variant", help='NAME="serve flags" (repeatable) '
                                      '[default: xy, chunked and prefill-first policies].'),
    sweep_rates: str = typer.Option("0.5,1,1.5,2,3", help="Comma list of request rates."),
    num_prompts: int = typer.Option(30, help="Requests per rate and variant."),
    dataset: str = typer.Option("synthetic", help="synthetic or a JSONL file of {\"prompt\", \"max_tokens\"}."),
    input_len: int = typer.Option(256, help="Mean prompt tokens (synthetic)."),
    output_len: int = typer.Option(48, help="Mean new tokens (synthetic; default max_tokens for a file)."),
    slo_ttft_ms: float = typer.Option(2000.0, help="Time-to-first-token SLO."),
    slo_tpot_ms: float = typer.Option(120.0, help="Time-per-output-token SLO."),
    serve_args: str = typer.Option("", help="Flags every variant's server gets (say \"--dtype bfloat16\")."),
    model: str = typer.Option("smollm2-135m", help="Model every server loads."),
    seed: int = typer.Option(0, help="Seed of lengths, tokens and arrivals."),
    repeats: int = typer.Option(1, help="Runs per rate (variants take turns each time); figures pool them."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Start several `xytune serve` variants and compare their capacity on one trace, taking turns per rate."""
    import shlex

    from xytune.bench_servers import parse_variant, render, run
    from xytune.bench_serve import file_prompts, synthetic_prompts

    try:
        variants = [parse_variant(v) for v in (variant or ['xy=--policy xy', 'chunked=--policy chunked',
                                                         'prefill-first=--policy prefill-first'])]
        common = ["--model", model, "--slo-tpot-ms", str(slo_tpot_ms), *shlex.split(serve_args)]
    except ValueError as exc:
        fail(str(exc))
    if len({v.name for v in variants}) != len(variants):
        fail("variant names must differ.")
    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len, repeats)
    try:
        if dataset == "synthetic":
            from xytune.runtime.loader import load_checkpoint

            vocab = load_checkpoint(model)[0].vocab_size
            prompts = synthetic_prompts(num_prompts, input_len, output_len, vocab, seed)
        else:
            prompts = file_prompts(Path(dataset), num_prompts, output_len)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    try:
        with console.status("starting servers...") as status:
            result = run(variants, common, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms, model,
                         progress=status.update, repeats=repeats)
    except RuntimeError as exc:
        fail(str(exc))
    render(result, console)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench_app.command("engines")
def bench_engines(
    policies: str = typer.Option("xy,chunked,prefill-first", help="Comma list of scheduling policies; "
                                 "POLICY@N gives that one a token budget of N (chunked@256,chunked@1024,xy)."),
    dataset: str = typer.Option("synthetic", help="synthetic or a JSONL file of {\"prompt\", \"max_tokens\"}."),
    sweep_rates: str = typer.Option("1,2,3,4", help="Comma list of request rates (inf: all at once)."),
    num_prompts: int = typer.Option(60, help="Requests per rate and policy."),
    input_len: int = typer.Option(256, help="Mean prompt tokens (synthetic)."),
    output_len: int = typer.Option(48, help="Mean new tokens (synthetic)."),
    slo_ttft_ms: float = typer.Option(2000.0, help="Time-to-first-token SLO."),
    slo_tpot_ms: float = typer.Option(120.0, help="Time-per-output-token SLO."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face folder."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto."),
    profile: Path = typer.Option(..., help="Cost table (the xy policy's step-latency model)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use a table from another device."),
    max_num_batched_tokens: int = typer.Option(512, help="Token budget of one step (every policy)."),
    tbt_slo_ms: float = typer.Option(None, help="xy: a step-time target of its own [default: --slo-tpot-ms]."),
    ttft_slo_ms: float = typer.Option(2000.0, help="xy: a prompt waiting half of this gets longer steps."),
    enable_prefix_caching: bool = typer.Option(False, "--enable-prefix-caching/--no-enable-prefix-caching",
                                               help="Reuse the KV blocks of shared prompt prefixes."),
    threads: int = typer.Option(None, help="CPU threads."),
    seed: int = typer.Option(0, help="Seed of lengths, tokens and arrivals."),
    repeats: int = typer.Option(1, help="Runs per rate (policies take turns each time); figures pool them."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Scheduling policies on the engine alone (no HTTP, no client on the CPU): the trace of `bench servers`."""
    import torch

    from xytune.bench_engines import parse_policies, run
    from xytune.bench_serve import file_prompts, synthetic_prompts
    from xytune.bench_servers import render
    from xytune.cost_model import CostModelError
    from xytune.runtime.config import ModelLoadError
    from xytune.runtime.loader import load_checkpoint

    try:
        variants = parse_policies(policies)
    except ValueError as exc:
        fail(str(exc))
    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len, repeats)
    if threads:
        torch.set_num_threads(threads)
    kwargs = dict(model=model, dtype=dtype, profile=str(profile), allow_mismatch=allow_mismatch,
                  max_num_batched_tokens=max_num_batched_tokens, tbt_slo_ms=tbt_slo_ms, ttft_slo_ms=ttft_slo_ms,
                  tpot_slo_ms=slo_tpot_ms, enable_prefix_caching=enable_prefix_caching)
    try:
        llm_for_vocab = load_checkpoint(model)
        if dataset == "synthetic":
            prompts = synthetic_prompts(num_prompts, input_len, output_len, llm_for_vocab[0].vocab_size, seed)
        else:
            prompts = file_prompts(Path(dataset), num_prompts, output_len)
            tokenizer = llm_for_vocab[2]
            prompts = [replace(p, prompt=tokenizer.encode(p.prompt) if isinstance(p.prompt, str) else p.prompt)
                       for p in prompts]
        with console.status("loading...") as status:
            result = run(variants, kwargs, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms, progress=status.update,
                         repeats=repeats)
    except (ModelLoadError, CostModelError, ValueError, OSError) as exc:
        fail(str(exc))
    render(result, console)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
