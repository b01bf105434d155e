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


EIGHT_BIT_TYPES = (gguf.GGMLQuantizationType.Q8_0,)
# ggml's 4-bit blocks of 32 weights along K: a float16 step d (Q4_1: and a float16 minimum m), then 16 bytes whose
# low nibbles are weights 0-15 and high nibbles weights 16-31 (ggml-common.h block_q4_0 / block_q4_1);
# w = q * d + m, with m = -8 d for Q4_0
_INT4_BLOCKS = {gguf.GGMLQuantizationType.Q4_0: False, gguf.GGMLQuantizationType.Q4_1: True}  # -> has m


class GGUFInt4Blocks:
    """The 4-bit codes of a GGUF file's Q4_0/Q4_1 tensors, read on demand, so an int4 weight can be the file's
    own blocks (exactly what llama.cpp computes with) instead of a re-quantization of their dequantized floats."""

    def __init__(self):
        self._tensors: dict[str, tuple[object, bool, int | None]] = {}  # HF name -> (tensor, has m, heads)
        self._eight_bit: set[str] = set()

    def add(self, name: str, tensor, heads: int | None) -> None:
        if tensor.tensor_type in _INT4_BLOCKS:
            self._tensors[name] = (tensor, _INT4_BLOCKS[tensor.tensor_type], heads)
        elif tensor.tensor_type in EIGHT_BIT_TYPES:
            self._eight_bit.add(name)

    def stored_at_8_bits(self, names) -> bool:
        """Whether the file keeps these tensors in 8-bit blocks (Q8_0), which int4 would round further."""
        return bool(names) and all(n in self._eight_bit for n in names)

    def codes(self, names) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(q [N, K] uint8 in 0..15, d, m [N, K / 32] float32)`` of ``names`` stacked along N (a fused weight's
        parts), or None unless every one of them is stored in 4-bit blocks."""
        if not names or any(n not in self._tensors for n in names):
            return None
        parts = [self._codes(*self._tensors[n]) for n in names]
        return tuple(torch.from_numpy(np.concatenate(p)) for p in zip(*parts))

    @staticmethod
    def _codes(tensor, has_min: bool, heads: int | None):
        rows = tensor.data.shape[0]
        blocks = np.asarray(tensor.data).reshape(rows, -1, 20 if has_min else 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else -8.0 * d
        nibbles = blocks[..., 4:] if has_min else blocks[..., 2:]
        q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(rows, -1)
        if heads is not None:  # Q/K rows as the float weights have them
            q, d, m = (_unpermute_rows(a, heads) for a in (q, d, m))
        return np.ascontiguousarray(q), np.ascontiguousarray(d), np.ascontiguousarray(m)


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object, GGUFInt4Blocks]:
    """(config, float32 state dict in HF names, the GGUFReader for the tokenizer, the 4-bit tensors' codes)."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}).") from None
    config = gguf_config(reader)
    state, blocks = {}, GGUFInt4Blocks()
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
        heads = None
        if config.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = config.num_heads
        elif config.architecture == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = config.num_kv_heads
        if heads is not None:
            w = _unpermute_rows(w, heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # writable copy
        blocks.add(name, t, heads)
    return config, state, reader, blocks


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
