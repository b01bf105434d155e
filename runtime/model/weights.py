"""Checkpoint loading: GGUF files (dequantized at load) and Hugging Face safetensors folders.

Both paths yield a ``ModelConfig`` and a state dict in Hugging Face names and
layouts, so the model has one way to take its weights. GGUF stores the Llama
Q/K projections row-permuted for llama.cpp's interleaved rotary embedding;
they are permuted back here so one rotary implementation serves both.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file

from xytune.model_config import ModelConfig, ModelLoadError, gguf_config

GGUF_TYPES_DOCUMENTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


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
