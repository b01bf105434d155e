"""Checkpoint loading: GGUF files (dequantized at load) and Hugging Face safetensors folders.

Both paths yield a ``ModelConfig`` and a state dict in Hugging Face names and
layouts, so the model has one way to take its weights. GGUF stores the Llama
Q/K projections row-permuted for llama.cpp's interleaved rotary embedding;
they are permuted back here so one rotary implementation serves both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xytune.runtime.config import ModelConfig, ModelLoadError

GGUF_TYPES_DOCUMENTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"Unsupported GGUF architecture {arch!r}: xytune runs llama and qwen2 models.")
    required = [f"{arch}.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                           "block_count")]
    missing = [k for k in required if _field(reader, k) is None]
    if missing:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(missing)}.")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "llama3" or _field(reader, f"{arch}.rope.scaling.factor"):
        scaling = {
            "rope_type": "llama3",
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 8.0)),
            "low_freq_factor": float(_field(reader, f"{arch}.rope.scaling.low_freq_factor", 1.0)),
            "high_freq_factor": float(_field(reader, f"{arch}.rope.scaling.high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                _field(reader, f"{arch}.rope.scaling.original_context_length", 8192)),
        }
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        vocab_size=int(vocab),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")  # blk.N.kind.weight|bias
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (pairs -> halves) row permutation of Q/K."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """(config, float32 state dict in HF names, the GGUFReader for the tokenizer)."""
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}).") from None
    config = gguf_config(reader)
    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which cannot be "
                                 f"dequantized here (supported: {', '.join(GGUF_TYPES_DOCUMENTED)} and others "
                                 "gguf-py knows).") from None
        if config.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rows(w, config.num_heads)
        elif config.architecture == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rows(w, config.num_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # writable copy
    return config, state, reader


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read ({exc}).") from None
    config = ModelConfig.from_hf(cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights (.bin checkpoints are not supported).")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return config, state
