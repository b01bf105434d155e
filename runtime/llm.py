"""``LLM``: the offline Python API (vLLM-shaped): load once, ``generate`` many prompts in one batch."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

from xytune.kernels.gemm import packing_failure
from xytune.kernels.quantized import QUANTIZATIONS, WEIGHT_FORMATS, format_bytes
from xytune.kernels.smooth_gemm import SmoothGEMMPlanner
from xytune.kernels.triton_gemm import triton_available
from xytune.profiler.cost_model import CostModel
from xytune.profiler.primitives import weight_format_of

from .engine.engine import Engine, RequestOutput
from .engine.kv_cache import bytes_per_block
from .engine.protocol import run_to_completion
from .engine.sampling import SamplingParams
from .engine.scheduler import SchedulerConfig
from .engine.speculative import SpeculativeConfig
from .engine.step_predictor import StepPredictor
from .model.attention import AttentionPaths, make_attention, meta_tiles_from_table, reference_attention
from .model.linear import GEMM_MODES, Linear
from .model.llama import LlamaModel
from .model.loader import load_checkpoint, resolve_dtype, resolve_model_path

ATTENTION_KINDS = ("reference", "meta")
log = logging.getLogger("xytune.runtime")


def _planners(cost_model, dtype: str):
    """SmoothGEMM planners per weight shape and set of kernels it holds, made on first use."""
    cache = {}

    def planner_for(n: int, k: int, kernels: set[str]):
        key = (n, k, frozenset(kernels))
        if key not in cache:
            cache[key] = SmoothGEMMPlanner(cost_model, n, k, dtype, primitives=kernels)
        return cache[key]

    return planner_for


def model_linears(model: LlamaModel) -> list[Linear]:
    """Every weight GEMM of the model: lm_head and each layer's."""
    return [model.lm_head] + [getattr(layer, f.name) for layer in model.layers for f in dataclasses.fields(layer)
                              if isinstance(getattr(layer, f.name), Linear)]


def winning_formats(cost_model, n: int, k: int, dtype: str, candidates) -> list[str]:
    """The weight formats among ``candidates`` whose best primitive is the table's fastest at some profiled M."""
    curves = {name: c for name, c in cost_model.curves("gemm", n, k, dtype).items()
              if weight_format_of(name) in candidates}
    ms = sorted({float(m) for c in curves.values() for m in c.ms})
    wins = {weight_format_of(min(curves, key=lambda name: curves[name].at(m)[0])) for m in ms}
    return [f for f in WEIGHT_FORMATS if f in wins]


def weight_formats(quantization: str, cost_model, n: int, k: int, dtype: str, smooth: bool) -> list[str]:
    """The formats one ``[n, k]`` weight is loaded in for ``quantization`` (int8 | int4 | auto).

    int8/int4 without SmoothGEMM: that format alone runs every M, and the float weight is dropped. With it:
    that format, plus the float weight only where the table has float win at some M (prefill-sized M on CPU),
    since a float weight SmoothGEMM never picks is memory for nothing. auto: every format that wins somewhere."""
    if not smooth:
        return [quantization]
    measured = {weight_format_of(name) for name in cost_model.curves("gemm", n, k, dtype)}
    wanted = WEIGHT_FORMATS if quantization == "auto" else ("float", quantization)
    missing = [f for f in wanted if f != "float" and f not in measured]
    if quantization != "auto" and missing:
        raise ValueError(f"the cost table has no {quantization} GEMM rows for n={n} k={k} {dtype}: profile with "
                         f"--quantization {quantization} or auto.")
    formats = winning_formats(cost_model, n, k, dtype, wanted)
    return formats if quantization == "auto" else sorted({quantization, *formats}, key=WEIGHT_FORMATS.index)


def within_budget(formats: list[str], n: int, k: int, elem_bytes: int, share_bytes: float) -> list[str]:
    """``formats`` less the largest ones while they hold more than ``share_bytes`` (one format always stays)."""
    kept = sorted(formats, key=lambda f: format_bytes(f, n, k, elem_bytes))
    while len(kept) > 1 and sum(format_bytes(f, n, k, elem_bytes) for f in kept) > share_bytes:
        kept.pop()
    return [f for f in WEIGHT_FORMATS if f in kept]


def load_quantized(model: LlamaModel, quantization: str, cost_model, dtype: str, planner_for,
                   weight_memory_gb: float | None = None, int4_blocks=None) -> dict[str, int]:
    """Load every weight GEMM of ``model`` in the formats ``quantization`` asks for; bytes held per format.

    ``weight_memory_gb`` (auto): the budget of all GEMM weights, shared among them in proportion to their
    size; a weight over its share drops its largest formats first. ``int4_blocks``: the checkpoint's own 4-bit
    codes (``GGUFInt4Blocks``), which an int4 weight takes as they are where it has them."""
    linears = model_linears(model)
    elem = torch.empty(0, dtype=model.dtype).element_size()
    total_float = sum(lin.out_features * lin.in_features * elem for lin in linears)
    for lin in linears:
        n, k = lin.out_features, lin.in_features
        formats = None
        if quantization == "int4" and int4_blocks is not None and int4_blocks.stored_finer_than_4_bits(lin.sources):
            # the file keeps this weight above 4 bits (smollm2's Q8_0 embedding, its lm_head): int4 would round away
            # what it kept (float32 perplexity 20.6 against 19.7), so it is served int8, as llama.cpp serves it
            try:
                formats = weight_formats("int8", cost_model, n, k, dtype, planner_for is not None)
            except ValueError:  # a table without int8 rows for it: int4 after all
                log.info("no int8 rows for n=%d k=%d in the table: %s runs int4", n, k, lin.sources[0])
        if formats is None:
            formats = weight_formats(quantization, cost_model, n, k, dtype, planner_for is not None)
        if quantization == "auto" and weight_memory_gb is not None:
            formats = within_budget(formats, n, k, elem, weight_memory_gb * 2**30 * n * k * elem / total_float)
        codes = int4_blocks.codes(lin.sources) if int4_blocks is not None and "int4" in formats else None
        lin.load_formats(formats, planner_for, codes)
    held: dict[str, int] = {}
    for lin in linears:
        for fmt, nbytes in lin.weight_bytes.items():
            held[fmt] = held.get(fmt, 0) + nbytes
    if quantization == "auto" and weight_memory_gb is not None and sum(held.values()) > weight_memory_gb * 2**30:
        raise ValueError(f"the GEMM weights take {sum(held.values()) / 2**30:.3f} GiB in their smallest format, "
                         f"over weight_memory_gb={weight_memory_gb}.")
    return held


class LLM:
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto", device: str = "cpu",
                 kv_cache_gb: float = 1.0, block_size: int = 16, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, threads: int | None = None, gemm: str = "auto",
                 profile: str | None = None, allow_mismatch: bool = False, policy: str = "chunked",
                 tbt_slo_ms: float | None = None, ttft_slo_ms: float = 2000.0, enable_prefix_caching: bool = True,
                 speculative: str | None = None, num_speculative_tokens: int = 4, attention: str = "meta",
                 meta_tiles: dict | None = None, tpot_slo_ms: float = 200.0, quantization: str = "none",
                 weight_memory_gb: float | None = None, int4_from_checkpoint: bool = True):
        """``attention`` reference | meta; ``meta_tiles`` Meta-Attention's tile sizes (default: from ``profile``);
        ``gemm`` auto | packed | plain | smooth (SmoothGEMM planned from ``profile``; auto: smooth when a
        profile is given, else packed); ``quantization`` none (float weights: outputs equal transformers) |
        int8 | int4 | auto (see ``weight_formats``); ``weight_memory_gb`` auto's budget for the GEMM weights;
        ``int4_from_checkpoint``: int4 weights are a GGUF file's own Q4_0/Q4_1/Q4_K blocks where it has them (the
        weights llama.cpp runs), else quantized from the float weights."""
        if threads is not None:
            torch.set_num_threads(threads)
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {kv_cache_gb}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
        resolve_model_path(model)  # a missing model is reported before the table, the dtype probe or the load
        dev = torch.device(device)
        cost_model = predictor = None
        if profile is not None:
            cost_model = CostModel.load(profile, device=device if dev.type != "cpu" else None,
                                        allow_mismatch=allow_mismatch)
        self.dtype = resolve_dtype(dtype, dev, cost_model.for_formats(("float",)) if cost_model else None)
        dtype_name = str(self.dtype).replace("torch.", "")
        if gemm not in ("auto", *GEMM_MODES):
            raise ValueError(f"gemm must be one of auto, {', '.join(GEMM_MODES)}, not {gemm!r}.")
        if gemm == "auto":
            gemm = "smooth" if cost_model is not None else "packed"
        self.gemm, self.attention = gemm, attention
        if gemm == "smooth" and cost_model is None:
            raise ValueError("gemm smooth plans from a cost table: give profile=TABLE (--profile).")
        if quantization != "none" and dev.type not in ("cpu", "npu", "cuda"):
            raise ValueError(f"quantized GEMMs run on CPU, CUDA and Ascend NPUs; use quantization none on "
                             f"{dev.type}.")
        if quantization != "none" and dev.type == "cuda" and not triton_available():
            raise ValueError("quantized GEMMs on CUDA run in Triton, which is not installed (pip install "
                             "'xytune[cuda]'); use quantization none.")
        if quantization == "auto" and gemm != "smooth":
            raise ValueError("quantization auto picks formats from a cost table with gemm smooth: give "
                             "profile=TABLE (--profile).")
        if weight_memory_gb is not None and weight_memory_gb <= 0:
            raise ValueError(f"weight_memory_gb must be positive, got {weight_memory_gb}.")
        self.quantization = quantization
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, not {attention!r}.")
        # every argument and the table are checked first: loading the checkpoint takes seconds
        config, state, self.tokenizer, self.model_name, int4_blocks = load_checkpoint(model)
        self.meta_tiles = {**meta_tiles_from_table(cost_model, dtype_name), **(meta_tiles or {})}
        # where the table measured the SDPA loop faster for a step's class and request count (plan included), take it
        self.attention_paths = AttentionPaths.from_table(cost_model, dtype_name, config.num_layers)
        attn = reference_attention if attention == "reference" else make_attention(self.attention_paths,
                                                                                   **self.meta_tiles)
        if gemm in ("packed", "smooth") and dev.type == "cpu" and (why := packing_failure(self.dtype)):
            warnings.warn(f"oneDNN weight packing does not run in {dtype_name} on this CPU ({why}); "
                          "the GEMMs run unpacked", stacklevel=2)
        planner_for = _planners(cost_model, dtype_name) if cost_model else None
        # a weight that will run quantized alone is not worth packing first
        model_gemm = "plain" if quantization in ("int8", "int4") and gemm == "packed" else gemm
        self.model = LlamaModel(config, state, self.dtype, dev, attention=attn, gemm=model_gemm,
                                planner_for=planner_for)
        del state
        self.weight_bytes = {"float": sum(lin.out_features * lin.in_features * self.dtype.itemsize
                                          for lin in model_linears(self.model))}
        if quantization != "none":
            self.weight_bytes = load_quantized(self.model, quantization, cost_model, dtype_name,
                                               planner_for if gemm == "smooth" else None, weight_memory_gb,
                                               int4_blocks if int4_from_checkpoint else None)
        if cost_model is not None:  # steps are predicted with the formats the weights were loaded in
            predictor = StepPredictor.from_table(cost_model.for_formats(tuple(self.weight_bytes)), dtype_name,
                                                 tile_kv=self.meta_tiles["tile_kv"])
        if cost_model is not None:
            log.info("attention per step, as the table measured (requests): %s", self.attention_paths.describe())
        self.int4_from_checkpoint = sum(lin.int4_from_checkpoint for lin in model_linears(self.model))
        log.info("GEMM weights (quantization %s): %s%s", quantization,
                 ", ".join(f"{fmt} {nbytes / 2**20:.1f} MiB" for fmt, nbytes in self.weight_bytes.items()),
                 f" ({self.int4_from_checkpoint} int4 weights are the checkpoint's own blocks)"
                 if self.int4_from_checkpoint else "")
        per_block = bytes_per_block(config.num_layers, block_size, config.num_kv_heads, config.head_dim, self.dtype)
        num_blocks = int(kv_cache_gb * 2**30 // per_block)
        spec = SpeculativeConfig(speculative, num_speculative_tokens) if speculative else None
        self.engine = Engine(self.model, self.tokenizer, num_blocks, block_size,
                             SchedulerConfig(max_num_batched_tokens, max_num_seqs, policy, tbt_slo_ms,
                                             ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms), predictor,
                             enable_prefix_caching=enable_prefix_caching, speculative=spec,
                             attention_paths=self.attention_paths)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or many (text or token ids), all in one continuous batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [(list(p), None) if isinstance(p, list) else (self.tokenizer.encode(p), p) for p in prompts]
        return self._run(encoded, sampling_params)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several, rendered with the
        model's own chat template, as vLLM's ``LLM.chat`` does."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        encoded = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt and not continue_final_message,
                                                      continue_final_message, chat_template_kwargs)
            encoded.append((self.tokenizer.encode(text, add_special_tokens=False), text))  # the template adds its own
        return self._run(encoded, sampling_params)

    def _run(self, encoded: list[tuple[list[int], str | None]], sampling_params) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(encoded)
        if len(plist) != len(encoded):
            raise ValueError("give one SamplingParams or one per prompt.")
        reqs = [self.engine.add_request(ids, p, prompt=text) for (ids, text), p in zip(encoded, plist)]
        return run_to_completion(self.engine, reqs)
