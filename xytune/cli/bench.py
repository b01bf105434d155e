"""`xytune bench ...`: measurements printed side by side.

A typer command declares each of its options as a parameter with its help text, so the commands
with many options run past 60 lines; their bodies are short.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import warnings
from dataclasses import replace
from pathlib import Path

import typer

from .app import app, console, fail, warned

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks that print side-by-side measurements.")
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
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.bench import profile as profile_bench
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.profiler.geometry import GeometryError, resolve_geometry
    from xytune.profiler.sweep import default_dtypes

    try:
        dev = get_device(device, threads=threads)
        geometry = resolve_geometry(model)
    except (DeviceError, GeometryError) as exc:
        fail(str(exc))
    if num_ms < 1:
        fail("--num-ms must be at least 1.")
    dts = [d.strip() for d in dtypes.split(",")] if dtypes else default_dtypes(dev.backend)
    with console.status("sweeping (quick, then default) and checking predictions..."):
        results = profile_bench.run_bench(dev, geometry, dts, max_tokens, num_ms, seed)
    profile_bench.render(results, console)
    if json_out:
        profile_bench.dump(results, json_out)


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
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.bench import runtime as runtime_bench
    from xytune.model_config import ModelLoadError

    try:
        import transformers  # noqa: F401
    except ImportError:
        fail("bench runtime compares against transformers: pip install transformers accelerate")
    if dtype not in ("float32", "bfloat16") or repeats < 1 or prefill_len < 2:
        fail("--dtype must be float32 or bfloat16, --repeats >= 1, --prefill-len >= 2.")
    try:
        results = runtime_bench.run_bench(dtype=dtype, threads=threads, prefill_len=prefill_len, repeats=repeats,
                                          gemm=gemm, attention=attention, profile=str(profile) if profile else None)
    except (ModelLoadError, ValueError) as exc:
        fail(str(exc))
    runtime_bench.render(results, console)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@bench_app.command("floor")
def bench_floor(
    dtype: str = typer.Option("bfloat16", help="Activations: float32 | bfloat16."),
    quantization: str = typer.Option("none,int8,int4", help="Comma list of weight formats to take turns: none "
                                     "(float) | int8 | int4 | auto (auto needs --profile)."),
    profile: Path = typer.Option(None, help="Cost table: SmoothGEMM picks each weight's kernel per M from it."),
    steps: int = typer.Option(48, help="Decode steps timed per turn."),
    repeats: int = typer.Option(3, help="Turns of every format (medians and ranges reported)."),
    threads: int = typer.Option(None, help="CPU threads."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """A batch-1 decode step (and its weight GEMMs alone) against the time to read its weights once at the
    measured memory bandwidth, per weight format."""
    from xytune.bench import floor as floor_bench
    from xytune.kernels.quantized import QUANTIZATIONS
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError

    formats = [q.strip() for q in quantization.split(",") if q.strip()]
    if not formats or any(q not in QUANTIZATIONS for q in formats):
        fail(f"--quantization must be a comma list of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
    if dtype not in ("float32", "bfloat16") or steps < 4 or repeats < 1:
        fail("--dtype must be float32 or bfloat16, --steps >= 4, --repeats >= 1.")
    if profile is not None and not profile.is_file():
        fail(f"--profile {profile}: no such file.")
    try:
        with console.status("timing decode steps and GEMMs, formats taking turns..."):
            results = floor_bench.run_bench(dtype, formats, steps, repeats, str(profile) if profile else None,
                                            threads)
    except (ModelLoadError, CostModelError, ValueError) as exc:
        fail(str(exc))
    floor_bench.render(results, console)
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
    endpoint: str = typer.Option("/v1/completions", help="/v1/completions or /v1/chat/completions (the prompt "
                                 "as one user message)."),
    max_concurrency: int = typer.Option(None, help="Most requests in flight; later arrivals wait [default: no "
                                        "limit]."),
    save_result: bool = typer.Option(False, "--save-result", help="Write the results as JSON, under the keys "
                                     "`vllm bench serve --save-result` writes."),
    result_filename: Path = typer.Option(None, help="Where --save-result writes [default: "
                                         "openai-<rate>qps-<model>-<date>.json, as vLLM names it]."),
):
    """Benchmark a running server: TTFT, TPOT, ITL, E2EL, throughput, goodput and capacity under Poisson load."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    import httpx

    from xytune.bench import serve as load_client

    if (rate is None) == (sweep_rates is None):
        fail("give exactly one of --rate or --sweep-rates.")
    if endpoint not in load_client.ENDPOINTS:
        fail(f"--endpoint must be one of {', '.join(load_client.ENDPOINTS)}, not {endpoint!r}.")
    if max_concurrency is not None and max_concurrency < 1:
        fail(f"--max-concurrency must be at least 1, got {max_concurrency}.")
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
            prompts = load_client.synthetic_prompts(num_prompts, input_len, output_len, vocab, seed)
            if endpoint == "/v1/chat/completions":  # a chat message is text: the server's own detokenizer
                prompts = load_client.detokenized(url, headers, model, prompts)
        else:
            prompts = load_client.file_prompts(Path(dataset), num_prompts, output_len)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    rows = []
    for r in rates:
        with console.status(f"rate {r:g} req/s: {num_prompts} requests..."):
            results, wall = asyncio.run(load_client.run_rate(url, model, prompts, r, seed, api_key, ignore_eos,
                                                             timeout_s, endpoint, max_concurrency))
        rows.append(load_client.summarize(results, wall, r, slo_ttft_ms, slo_tpot_ms))
    cap = load_client.capacity(rows)
    load_client.render(rows, cap, slo_ttft_ms, slo_tpot_ms, console)
    if save_result:
        result = load_client.saved_result(rows, cap, url=url, model=model, endpoint=endpoint,
                                          max_concurrency=max_concurrency, slo_ttft_ms=slo_ttft_ms,
                                          slo_tpot_ms=slo_tpot_ms)
        path = result_filename or Path(load_client.default_result_filename(model, rates, max_concurrency))
        path.write_text(json.dumps(result, indent=2))
        console.print(f"results written to {path}", highlight=False)
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
    device: str = typer.Option(None, help="Where both run [default: the table's backend]. On a GPU/NPU "
                               "Meta-Attention runs its device backend against the SDPA loop and (CUDA) varlen "
                               "FlashAttention."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Meta-Attention vs SDPA loop / padded SDPA, and SmoothGEMM vs exact / pad-to-bucket / oracle, side by side."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    import torch

    from xytune.bench import kernels as kernels_bench
    from xytune.profiler.cost_model import CostModel, CostModelError
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.runtime.model.attention import AttentionPaths, meta_tiles_from_table

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
            paths = AttentionPaths.from_table(model, dtype, geo.num_layers)
            if gemm_device.backend == "cpu":
                attention = kernels_bench.bench_attention(sizes, geo.heads_per_rank, geo.kv_heads_per_rank,
                                                          geo.head_dim, getattr(torch, dtype), tiles, repeats,
                                                          layers=geo.num_layers, layer_weight_bytes=layer_bytes,
                                                          engine_paths=paths)
            else:
                attention = kernels_bench.bench_attention_on_device(gemm_device, tiles, sizes, geo.heads_per_rank,
                                                                    geo.kv_heads_per_rank, geo.head_dim,
                                                                    getattr(torch, dtype), repeats)
        if not skip_gemm:
            status.update("SmoothGEMM vs exact / padded / oracle...")
            try:
                gemm = kernels_bench.bench_gemm(model, dtype, tuple(gemms.split(",")), m_list, repeats,
                                                device=gemm_device)
            except (ValueError, KeyError) as exc:
                fail(str(exc))
    meta = {"attention": f"{dtype}, tiles {tiles}", "gemm": f"{dtype}, buckets of {profile.name}"}
    kernels_bench.render(attention, gemm, console, meta)
    if json_out:
        json_out.write_text(json.dumps({"attention": attention, "gemm": gemm, "tiles": tiles, "dtype": dtype},
                                       indent=2, default=str))


def token_prompts(dataset: str, num_prompts: int, input_len: int, output_len: int, seed: int,
                  model: str | None = None, vocab_size: int | None = None) -> list:
    """A trace's prompts as token ids: ``synthetic`` (seeded, over ``vocab_size`` or the model's vocabulary) or
    a JSONL file, its text prompts tokenized with ``model``'s tokenizer."""
    from xytune.bench import serve as load_client
    from xytune.runtime.model.loader import load_checkpoint

    if dataset == "synthetic":
        vocab = vocab_size or load_checkpoint(model)[0].vocab_size
        return load_client.synthetic_prompts(num_prompts, input_len, output_len, vocab, seed)
    prompts = load_client.file_prompts(Path(dataset), num_prompts, output_len)
    if all(isinstance(p.prompt, list) for p in prompts):
        return prompts
    tokenizer = load_checkpoint(model)[2]
    return [replace(p, prompt=tokenizer.encode(p.prompt) if isinstance(p.prompt, str) else p.prompt)
            for p in prompts]


@bench_app.command("servers")
def bench_servers(
    variant: list[str] = typer.Option(None, "--variant", help='NAME="serve flags" (repeatable) '
                                      '[default: xy, chunked and prefill-first policies].'),
    external: list[str] = typer.Option(None, "--external", help='NAME="command ... {port} ..." (repeatable): '
                                       'another OpenAI-compatible server in the same turns, say llama.cpp\'s '
                                       '"llama-server -m model.gguf --port {port}".'),
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
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.bench import serve as load_client
    from xytune.bench import servers as servers_bench
    from xytune.runtime.model.loader import load_checkpoint

    try:
        variants = [servers_bench.parse_variant(v) for v in (variant or ([] if external else [
            'xy=--policy xy', 'chunked=--policy chunked', 'prefill-first=--policy prefill-first']))]
        variants += [servers_bench.parse_variant(v, external=True) for v in external or []]
        common = ["--model", model, "--slo-tpot-ms", str(slo_tpot_ms), *shlex.split(serve_args)]
    except ValueError as exc:
        fail(str(exc))
    if len({v.name for v in variants}) != len(variants):
        fail("variant names must differ.")
    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len, repeats)
    try:
        if dataset == "synthetic":

            vocab = load_checkpoint(model)[0].vocab_size
            prompts = load_client.synthetic_prompts(num_prompts, input_len, output_len, vocab, seed)
        else:
            prompts = load_client.file_prompts(Path(dataset), num_prompts, output_len)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    try:
        with console.status("starting servers...") as status:
            result = servers_bench.run(variants, common, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms, model,
                         progress=status.update, repeats=repeats)
    except RuntimeError as exc:
        fail(str(exc))
    servers_bench.render(result, console)
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
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    import torch

    from xytune.bench import engines as engines_bench
    from xytune.bench import servers as servers_bench
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError

    try:
        variants = engines_bench.parse_policies(policies)
    except ValueError as exc:
        fail(str(exc))
    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len, repeats)
    if threads:
        torch.set_num_threads(threads)
    kwargs = dict(model=model, dtype=dtype, profile=str(profile), allow_mismatch=allow_mismatch,
                  max_num_batched_tokens=max_num_batched_tokens, tbt_slo_ms=tbt_slo_ms, ttft_slo_ms=ttft_slo_ms,
                  tpot_slo_ms=slo_tpot_ms, enable_prefix_caching=enable_prefix_caching)
    try:
        prompts = token_prompts(dataset, num_prompts, input_len, output_len, seed, model=model)
        with console.status("loading...") as status:
            result = engines_bench.run(variants, kwargs, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms,
                                       progress=status.update, repeats=repeats)
    except (ModelLoadError, CostModelError, ValueError, OSError) as exc:
        fail(str(exc))
    servers_bench.render(result, console)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench_app.command("sim-vs-real")
def bench_sim_vs_real(
    policies: str = typer.Option("xy,chunked", help="Comma list of scheduling policies (POLICY@N: token budget N)."),
    dataset: str = typer.Option("synthetic", help="synthetic or a JSONL file of {\"prompt\", \"max_tokens\"}."),
    sweep_rates: str = typer.Option("1,2,3,4", help="Comma list of request rates."),
    num_prompts: int = typer.Option(60, help="Requests per rate and policy."),
    input_len: int = typer.Option(256, help="Mean prompt tokens (synthetic)."),
    output_len: int = typer.Option(48, help="Mean new tokens (synthetic)."),
    slo_ttft_ms: float = typer.Option(2000.0, help="Time-to-first-token SLO."),
    slo_tpot_ms: float = typer.Option(120.0, help="Time-per-output-token SLO."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face folder."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto (the table's fastest)."),
    profile: Path = typer.Option(..., help="Cost table of this machine, with its engine-step fit "
                                 "(`xytune calibrate-steps`)."),
    max_num_batched_tokens: int = typer.Option(512, help="Token budget of one step (every policy)."),
    tbt_slo_ms: float = typer.Option(None, help="xy: a step-time target of its own [default: --slo-tpot-ms]."),
    threads: int = typer.Option(None, help="CPU threads."),
    seed: int = typer.Option(0, help="Seed of lengths, tokens and arrivals."),
    repeats: int = typer.Option(1, help="Runs per rate (policies take turns each time); figures pool them."),
    probe_speed: bool = typer.Option(True, help="Time a second of fixed steps before the first real run and "
                                     "after every one, and also simulate at the machine's speed they measured "
                                     "around each run."),
    recalibrate: str = typer.Option("none", help="none | quick | full: first fit whole engine steps on this "
                                    "machine now (that grid) and simulate from that fit, not the table's."),
    steps_per_load: int = typer.Option(32, help="With --recalibrate: steps timed under each of the six loads, "
                                       "as for calibrate-steps."),
    json_out: Path = typer.Option(None, "--json", help="Also write both results and the errors as JSON here."),
):
    """The serving simulator against the real engine on one trace: its error on TTFT/TPOT and capacity."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    import torch

    from xytune.bench import engines as engines_bench
    from xytune.bench import sim_vs_real
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModel, CostModelError
    from xytune.runtime.engine.step_calibration import FULL_GRID, QUICK_GRID
    from xytune.tune import Simulator, TuneError

    try:
        variants = engines_bench.parse_policies(policies)
    except ValueError as exc:
        fail(str(exc))
    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len, repeats)
    grids = {"none": None, "quick": QUICK_GRID, "full": FULL_GRID}
    if recalibrate not in grids:
        fail(f"--recalibrate must be one of {', '.join(grids)}, not {recalibrate!r}.")
    if steps_per_load < 4:
        fail("--steps-per-load must be at least 4.")
    if threads:
        torch.set_num_threads(threads)
    try:
        cost_model = CostModel.load(profile).for_formats(("float",))
        sim_dtype = cost_model.fastest_dtype() if dtype == "auto" else dtype
        sim = warned(Simulator, cost_model, sim_dtype)
        kwargs = dict(model=model, dtype=sim_dtype, profile=str(profile), max_num_batched_tokens=max_num_batched_tokens,
                      tbt_slo_ms=tbt_slo_ms, tpot_slo_ms=slo_tpot_ms, ttft_slo_ms=slo_ttft_ms,
                      enable_prefix_caching=False)
        prompts = token_prompts(dataset, num_prompts, input_len, output_len, seed, model=model)
        with console.status("loading...") as status:
            result = sim_vs_real.run(variants, kwargs, sim, prompts, rates, seed, slo_ttft_ms, slo_tpot_ms, repeats,
                                     progress=status.update, probe_speed=probe_speed,
                                     recalibrate=grids[recalibrate], steps_per_load=steps_per_load)
    except (ModelLoadError, CostModelError, TuneError, ValueError, OSError) as exc:
        fail(str(exc))
    sim_vs_real.render(result, console)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
