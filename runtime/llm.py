"""``LLM``: the offline Python API (vLLM-shaped): load once, ``generate`` many prompts in one batch."""

from __future__ import annotations

import warnings

import torch

from xytune.kernels.gemm import packing_failure
from xytune.kernels.smooth_gemm import SmoothGEMMPlanner
from xytune.profiler.cost_model import CostModel

from .engine.engine import Engine, RequestOutput
from .engine.kv_cache import bytes_per_block
from .engine.protocol import run_to_completion
from .engine.sampling import SamplingParams
from .engine.scheduler import SchedulerConfig
from .engine.speculative import SpeculativeConfig
from .engine.step_predictor import StepPredictor
from .model.attention import attention_paths_from_table, make_attention, meta_tiles_from_table, reference_attention
from .model.linear import GEMM_MODES
from .model.llama import LlamaModel
from .model.loader import load_checkpoint, resolve_dtype

ATTENTION_KINDS = ("reference", "meta")


def _planners(cost_model, dtype: str):
    """SmoothGEMM planners per weight shape, made on first use."""
    cache = {}

    def planner_for(n: int, k: int, kernels: set[str]):
        if (n, k) not in cache:
            cache[(n, k)] = SmoothGEMMPlanner(cost_model, n, k, dtype, primitives=kernels)
        return cache[(n, k)]

    return planner_for


class LLM:
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto", device: str = "cpu",
                 kv_cache_gb: float = 1.0, block_size: int = 16, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, threads: int | None = None, gemm: str = "auto",
                 profile: str | None = None, allow_mismatch: bool = False, policy: str = "chunked",
                 tbt_slo_ms: float | None = None, ttft_slo_ms: float = 2000.0, enable_prefix_caching: bool = True,
                 speculative: str | None = None, num_speculative_tokens: int = 4, attention: str = "meta",
                 meta_tiles: dict | None = None, tpot_slo_ms: float = 200.0):
        """``attention`` reference | meta; ``meta_tiles`` Meta-Attention's tile sizes (default: from ``profile``);
        ``gemm`` auto | packed | plain | smooth (SmoothGEMM planned from ``profile``; auto: smooth when a
        profile is given, else packed)."""
        if threads is not None:
            torch.set_num_threads(threads)
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {kv_cache_gb}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        dev = torch.device(device)
        config, state, self.tokenizer, self.model_name = load_checkpoint(model)
        cost_model = predictor = None
        if profile is not None:
            cost_model = CostModel.load(profile, device=device if dev.type != "cpu" else None,
                                        allow_mismatch=allow_mismatch)
        self.dtype = resolve_dtype(dtype, dev, cost_model)
        dtype_name = str(self.dtype).replace("torch.", "")
        if cost_model is not None:
            predictor = StepPredictor(cost_model, dtype_name)
        if gemm not in ("auto", *GEMM_MODES):
            raise ValueError(f"gemm must be one of auto, {', '.join(GEMM_MODES)}, not {gemm!r}.")
        if gemm == "auto":
            gemm = "smooth" if cost_model is not None else "packed"
        self.gemm, self.attention = gemm, attention
        if gemm == "smooth" and cost_model is None:
            raise ValueError("gemm smooth plans from a cost table: give profile=TABLE (--profile).")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, not {attention!r}.")
        self.meta_tiles = {**meta_tiles_from_table(cost_model, dtype_name), **(meta_tiles or {})}
        # where the table measured the SDPA path faster for a class of steps (plan cost included), take it
        self.attention_paths = attention_paths_from_table(cost_model, dtype_name, config.num_layers)
        attn = reference_attention if attention == "reference" else make_attention(self.attention_paths,
                                                                                   **self.meta_tiles)
        if gemm in ("packed", "smooth") and dev.type == "cpu" and (why := packing_failure(self.dtype)):
            warnings.warn(f"oneDNN weight packing does not run in {dtype_name} on this CPU ({why}); "
                          "the GEMMs run unpacked", stacklevel=2)
        self.model = LlamaModel(config, state, self.dtype, dev, attention=attn, gemm=gemm,
                                planner_for=_planners(cost_model, dtype_name) if cost_model else None)
        del state
        per_block = bytes_per_block(config.num_layers, block_size, config.num_kv_heads, config.head_dim, self.dtype)
        num_blocks = int(kv_cache_gb * 2**30 // per_block)
        spec = SpeculativeConfig(speculative, num_speculative_tokens) if speculative else None
        self.engine = Engine(self.model, self.tokenizer, num_blocks, block_size,
                             SchedulerConfig(max_num_batched_tokens, max_num_seqs, policy, tbt_slo_ms,
                                             ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms), predictor,
                             enable_prefix_caching=enable_prefix_caching, speculative=spec)

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
