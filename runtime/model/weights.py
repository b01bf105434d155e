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

from xytune.model_config import ModelConfig, ModelLoadError, gguf_config, read_gguf

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


GGML = gguf.GGMLQuantizationType
# types that keep a weight at more than 4 bits: int4 would round away what the file kept, so such a weight is
# served int8 when int4 is asked for (llama.cpp's Q4_K_M keeps attn_v, half of ffn_down and the output in Q6_K)
FINER_THAN_4_BIT_TYPES = (GGML.Q5_0, GGML.Q5_1, GGML.Q5_K, GGML.Q6_K, GGML.Q8_0)
# ggml's 4-bit blocks (ggml-common.h), each 4-bit code q dequantizing as w = q * d + m in groups of 32 along K:
# - Q4_0 / Q4_1: 32 weights, a float16 step d (Q4_1: and a float16 minimum m; Q4_0: m = -8 d), then 16 bytes
#   whose low nibbles are weights 0-15 and high nibbles weights 16-31;
# - Q4_K: 256 weights, float16 d and dmin, twelve bytes of eight 6-bit (scale, min) pairs, then 128 bytes in
#   four runs of 32 whose low nibbles are sub-block 2j and high nibbles sub-block 2j+1; sub-block i has
#   d_i = d * scale_i and m_i = -dmin * min_i, so every group of 32 is a Q4_1 group.
INT4_BLOCK_TYPES = (GGML.Q4_0, GGML.Q4_1, GGML.Q4_K)
GGUF_TYPES_DOCUMENTED = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1")


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per block as a float16, widened to float32 (exact)."""
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _q4_01_groups(blocks: np.ndarray, has_min: bool):
    """Q4_0/Q4_1 blocks ``[rows, groups, bytes]`` -> (q [rows, groups, 32], d, m [rows, groups])."""
    d = _f16(blocks[..., 0:2])
    m = _f16(blocks[..., 2:4]) if has_min else -8.0 * d
    nibbles = blocks[..., 4:] if has_min else blocks[..., 2:]
    return np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1), d, m


def _q4_k_groups(blocks: np.ndarray):
    """Q4_K super-blocks ``[rows, supers, 144]`` -> (q [rows, supers * 8, 32], d, m [rows, supers * 8])."""
    rows, supers = blocks.shape[:2]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    scale, minimum = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))  # gguf-py's unpacking
    step = d[..., None] * scale.reshape(rows, supers, 8).astype(np.float32)
    low = -(dmin[..., None] * minimum.reshape(rows, supers, 8).astype(np.float32))
    runs = blocks[..., 16:].reshape(rows, supers, 4, 1, 32)
    q = (runs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 0xF  # [.., 4 runs, low|high, 32]
    return q.reshape(rows, supers * 8, 32), step.reshape(rows, -1), low.reshape(rows, -1)


class GGUFInt4Blocks:
    """The 4-bit codes of a GGUF file's Q4_0/Q4_1/Q4_K tensors, read on demand, so an int4 weight can be the
    file's own blocks (exactly what llama.cpp computes with) instead of a re-quantization of their floats."""

    def __init__(self):
        self._tensors: dict[str, tuple[object, int | None]] = {}  # HF name -> (tensor, heads)
        self._finer: set[str] = set()

    def add(self, name: str, tensor, heads: int | None) -> None:
        if tensor.tensor_type in INT4_BLOCK_TYPES:
            self._tensors[name] = (tensor, heads)
        elif tensor.tensor_type in FINER_THAN_4_BIT_TYPES:
            self._finer.add(name)

    def stored_finer_than_4_bits(self, names) -> bool:
        """Whether the file keeps these tensors at more than 4 bits (Q5_*, Q6_K, Q8_0), which int4 would round."""
        return bool(names) and all(n in self._finer for n in names)

    def codes(self, names) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(q [N, K] uint8 in 0..15, d, m [N, K / 32] float32)`` of ``names`` stacked along N (a fused weight's
        parts), or None unless every one of them is stored in 4-bit blocks."""
        if not names or any(n not in self._tensors for n in names):
            return None
        parts = [self._codes(*self._tensors[n]) for n in names]
        return tuple(torch.from_numpy(np.concatenate(p)) for p in zip(*parts))

    @staticmethod
    def _codes(tensor, heads: int | None):
        rows = tensor.data.shape[0]
        if tensor.tensor_type == GGML.Q4_K:
            q, d, m = _q4_k_groups(np.asarray(tensor.data).reshape(rows, -1, 144))
        else:
            has_min = tensor.tensor_type == GGML.Q4_1
            q, d, m = _q4_01_groups(np.asarray(tensor.data).reshape(rows, -1, 20 if has_min else 18), has_min)
        q = q.reshape(rows, -1)
        if heads is not None:  # Q/K rows as the float weights have them
            q, d, m = (_unpermute_rows(a, heads) for a in (q, d, m))
        return np.ascontiguousarray(q), np.ascontiguousarray(d), np.ascontiguousarray(m)


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object, GGUFInt4Blocks]:
    """(config, float32 state dict in HF names, the GGUFReader for the tokenizer, the 4-bit tensors' codes)."""
    try:
        reader = read_gguf(path)
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
