"""A Llama-family decoder in plain torch, run over a flat token batch with a paged KV cache.

RMSNorm, rotary embeddings (with llama3 frequency scaling), grouped-query
attention, SwiGLU MLP, optional qkv bias (Qwen2), tied or untied embeddings.
Q/K/V and gate/up are fused into one GEMM each. The arithmetic follows the
Hugging Face implementation op for op so float32 greedy output matches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from xytune.model_config import ModelConfig, ModelLoadError

from ..engine.kv_cache import KVCache
from .attention import AttentionBatch, reference_attention
from .linear import Linear

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float], torch.Tensor]


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, scaled in the model's dtype, as transformers does (one fused kernel for the first)."""
    return weight * F.rms_norm(x.to(torch.float32), x.shape[-1:], eps=eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with the sign of rotate_half folded into ``signed_sin``: the same
    products and sum, so the same bits, with one roll instead of a negation and a concatenation."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention: AttentionFn = reference_attention,
                 gemm: str = "packed", planner_for: Callable | None = None):
        """``planner_for(n, k, kernel_names)``: the SmoothGEMM planner of a weight shape (``gemm="smooth"``)."""
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.attention = attention

        def linear(weight: torch.Tensor, bias: torch.Tensor | None, *sources: str) -> Linear:
            return Linear(weight, bias, gemm, planner=planner_for if gemm == "smooth" else None, sources=sources)

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ModelLoadError(f"checkpoint lacks tensor {name}.")
            return state[name].to(self.device, dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in state
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.lm_head = linear(self.embed if tied else take(head_name), None, head_name)
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv_names = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            qkv = [take(name) for name in qkv_names]
            bias = None
            if config.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            gate_up_names = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            gate_up = torch.cat([take(name) for name in gate_up_names])
            o_name, down_name = p + "self_attn.o_proj.weight", p + "mlp.down_proj.weight"
            self.layers.append(Layer(
                ln1=take(p + "input_layernorm.weight"), qkv=linear(torch.cat(qkv).contiguous(), bias, *qkv_names),
                o=linear(take(o_name), None, o_name),
                ln2=take(p + "post_attention_layernorm.weight"),
                gate_up=linear(gate_up.contiguous(), None, *gate_up_names),
                down=linear(take(down_name), None, down_name),
            ))
        inv = rope_inv_freq(config)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.device, dtype)
        sin = emb.sin()
        half = config.head_dim // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.device, dtype)
        self.scale = config.head_dim ** -0.5

    def new_kv_cache(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device,
                       enable_prefix_caching)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv: KVCache,
                logits_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[len(logits_rows), vocab]`` for the chosen rows of a flat batch of ``T`` tokens."""
        c = self.config
        T = input_ids.shape[0]
        H, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * d, kvh * d
        cos, sin = self.cos[positions][:, None, :], self.signed_sin[positions][:, None, :]
        h = self.embed[input_ids]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.ln1, c.rms_norm_eps)
            qkv = layer.qkv(x)
            # Q and K are adjacent in the fused output: rotate all their heads in one pass.
            qk = qkv[:, : q_size + kv_size].view(T, H + kvh, d)
            qk = apply_rotary(qk, cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, q_size + kv_size:].view(T, kvh, d)
            kv.k[i].index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
            kv.v[i].index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
            attn = self.attention(q, kv.k[i], kv.v[i], batch, self.scale)
            h = h + layer.o(attn.reshape(T, q_size))
            x = rms_norm(h, layer.ln2, c.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate).mul_(up))
        h = rms_norm(h[logits_rows], self.norm, c.rms_norm_eps)
        return self.lm_head(h).float()
