"""`xytune generate` and `xytune serve`: the runtime on a cost table."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .app import app, err_console, fail

if TYPE_CHECKING:
    from xytune.runtime.llm import LLM


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
    quantization: str = typer.Option("none", help="GEMM weights: none (float: outputs equal transformers) | int8 "
                                      "| int4 (CPU) | auto (the formats the --profile table has win at some M)."),
    profile: Path = typer.Option(None, help="Cost table: Meta-Attention tiles and SmoothGEMM plans come from it."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use a table from another device."),
    speculative: str = typer.Option(None, help="Speculative decoding: ngram (prompt lookup) [default: off]."),
    num_speculative_tokens: int = typer.Option(4, help="Draft tokens verified per step."),
):
    """Generate a completion for one prompt with the xytune engine."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.runtime.engine.engine import RequestError
    from xytune.runtime.engine.sampling import SamplingParams
    from xytune.runtime.llm import LLM

    _check_quantization(quantization)
    try:
        dev = get_device(device)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, seed=seed, stop=list(stop or []), ignore_eos=ignore_eos,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logprobs=logprobs)

        start = time.perf_counter()
        llm = LLM(model=model, dtype=dtype, device=str(dev.torch_device), kv_cache_gb=kv_cache_gb, threads=threads,
                  attention=attention, gemm=gemm, profile=str(profile) if profile else None,
                  allow_mismatch=allow_mismatch, speculative=speculative,
                  num_speculative_tokens=num_speculative_tokens, quantization=quantization)
        load_s = time.perf_counter() - start
        if chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate(prompt, params)[0]
    except (DeviceError, ModelLoadError, RequestError, CostModelError, ValueError) as exc:
        fail(str(exc))
    text = json.dumps(_generation_json(model, llm, out, load_s), indent=2) if as_json else out.outputs[0].text
    sys.stdout.write(text + "\n")


def _check_quantization(quantization: str) -> None:
    """A bad --quantization fails at once, before a model load or a quick profile."""
    from xytune.kernels.quantized import QUANTIZATIONS

    if quantization not in QUANTIZATIONS:
        fail(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")


def _generation_json(model: str, llm: LLM, out, load_s: float) -> dict:
    """`generate --json`: tokens, finish reason, logprobs when asked for, and timings."""
    completion = out.outputs[0]
    n = len(completion.token_ids)
    decode_s = out.metrics["latency_s"] - (out.metrics["ttft_s"] or 0)
    return {
        "model": model, "dtype": str(llm.dtype).replace("torch.", ""), "text": completion.text,
        "prompt_token_ids": out.prompt_token_ids, "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        **({"logprobs": [{"logprob": lp, "top": [{"id": t, "logprob": v} for t, v in top]}
                         for lp, top in completion.logprobs]} if completion.logprobs is not None else {}),
        "timings": {"load_s": load_s, "ttft_s": out.metrics["ttft_s"], "total_s": out.metrics["latency_s"],
                    "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None},
    }


def _cached_quick_profile(dev, model: str, quantization: str) -> Path:
    """A quick profile of this device and model (with the weight formats ``quantization`` may load), made once
    and kept in ~/.cache/xytune."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.kernels.quantized import swept_formats
    from xytune.profiler.geometry import resolve_geometry
    from xytune.profiler.sweep import Sweep, SweepError, SweepSettings, default_dtypes
    from xytune.profiler.table import TableError, read_table

    geometry = resolve_geometry(model)
    formats = swept_formats(quantization)
    fp = dev.fingerprint()
    key = hashlib.sha256(json.dumps([fp.get(k) for k in ("backend", "device_name", "compute_units", "threads",
                                                           "torch")] + [geometry.to_dict()]
                                 + [list(formats)] * (formats != ("float",))).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XYTUNE_CACHE", Path.home() / ".cache" / "xytune")) / "profiles"
    path = cache / f"{dev.backend}-{geometry.name}-{key}.parquet"
    settings = SweepSettings.quick(default_dtypes(dev.backend), weight_formats=formats)
    if path.exists():
        try:
            if read_table(path).complete:
                # made by an older xytune, it may lack shapes the sweep has since gained: those are timed now
                sweep = Sweep(dev, geometry, settings, path, resume=True)
                if missing := sweep.unmeasured():
                    err_console.print(f"the cached quick profile {path} lacks {len(missing)} shape groups this "
                                      "version profiles: timing them", highlight=False)
                    sweep.run(progress=False)
                err_console.print(f"using the cached quick profile {path}", highlight=False)
                return path
        except (TableError, SweepError):
            pass
    err_console.print(f"no --profile given: profiling {geometry.name} on {dev.name} quickly (about half a minute) "
                      f"into {path}; pass --profile to use a full table", highlight=False)
    Sweep(dev, geometry, settings, path, overwrite=True).run(progress=False)
    return path


def _start_engine(llm_kwargs: dict, own_process: bool, model_name: str):
    """The engine in a process of its own or in a thread of this one: (engine, tokenizer, dtype name)."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.runtime.engine.async_engine import AsyncEngine
    from xytune.runtime.engine.core import EngineProcess
    from xytune.runtime.llm import LLM
    from xytune.runtime.serve.metrics import ServingMetrics

    if own_process:
        engine = EngineProcess(llm_kwargs, ServingMetrics(model_name))
        engine.start()
        return engine, engine.tokenizer, engine.dtype
    llm = LLM(**llm_kwargs)
    engine = AsyncEngine(llm.engine, ServingMetrics(model_name))
    engine.start()
    return engine, llm.tokenizer, str(llm.dtype).replace("torch.", "")


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
    quantization: str = typer.Option("none", help="GEMM weights: none (float: outputs equal transformers) | int8 "
                                      "| int4 (CPU) | auto (the formats the --profile table has win at some M)."),
    engine_process: bool = typer.Option(True, "--engine-process/--no-engine-process",
                                        help="Run the engine in a process of its own, apart from HTTP and "
                                        "streaming (else in a thread of the server's process)."),
):
    """Serve the model over an OpenAI-compatible HTTP API (completions and chat, streaming or not)."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.runtime.engine.core import EngineStartError
    from xytune.runtime.serve.app import build_app, serve_http

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}.")
    _check_quantization(quantization)

    try:
        dev = get_device(device, threads=threads)
        if profile is None:
            profile = _cached_quick_profile(dev, model, quantization)
        llm_kwargs = dict(model=model, dtype=dtype, device=str(dev.torch_device), kv_cache_gb=kv_cache_gb,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          threads=threads, profile=str(profile), allow_mismatch=allow_mismatch, policy=policy,
                          tbt_slo_ms=tbt_slo_ms, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=slo_tpot_ms,
                          enable_prefix_caching=enable_prefix_caching, speculative=speculative,
                          num_speculative_tokens=num_speculative_tokens, attention=attention, gemm=gemm,
                          quantization=quantization)
        engine, tokenizer, dtype_name = _start_engine(llm_kwargs, engine_process, served_model_name or model)
    except (DeviceError, ModelLoadError, CostModelError, EngineStartError, ValueError) as exc:
        fail(str(exc))
    app = build_app(engine, tokenizer, served_model_name or model, api_key=api_key)
    err_console.print(f"serving {served_model_name or model} ({dtype_name}) on http://{host}:{port}/v1"
                      f"{' (engine in its own process)' if engine_process else ''}", highlight=False)
    try:
        serve_http(app, host, port)
    finally:
        engine.stop()
