"""ModelConfig: everything the forward pass needs to know about a Llama-family checkpoint.

Shared by the runtime (which loads the weights) and the profiler (which needs only the shapes): one parser
of Hugging Face configs and GGUF metadata for both, and neither imports the other for it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf


class ModelLoadError(ValueError):
    """A model that cannot be loaded here; the message is one user-facing sentence."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_...
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ModelLoadError(f"Unsupported architecture {model_type!r}: xytune runs Llama-family decoders "
                                 "(llama, qwen2, mistral).")
        missing = [k for k in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ModelLoadError(f"config.json lacks {', '.join(missing)}.")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope and rope.get("rope_type", rope.get("type")) not in ("llama3",):
            if rope.get("rope_type", rope.get("type")) not in (None, "default"):
                raise ModelLoadError(f"Unsupported rope scaling {rope!r}; llama3 and none are supported.")
            rope = None
        return cls(
            architecture="qwen2" if model_type == "qwen2" else "llama",
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            num_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
        )


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: Path | str) -> gguf.GGUFReader:
    """The file's ``GGUFReader``, parsed once per process and file version: gguf-py takes about 2 s to parse a
    49k-token vocabulary, and a bench of several engines or a test run loads the same file again and again.
    The reader is read-only (a memory map), so sharing it is safe; a rewritten file (new mtime or size) is
    parsed anew. Raises what ``GGUFReader`` raises."""
    path = Path(path).resolve()
    stat = os.stat(path)
    return _parsed_gguf(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parsed_gguf(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def gguf_config(reader) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"Unsupported GGUF architecture {arch!r}: xytune runs llama and qwen2 models.")
    required = [f"{arch}.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                           "block_count")]
    missing = [k for k in required if gguf_field(reader, k) is None]
    if missing:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(missing)}.")
    heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    hidden = int(gguf_field(reader, f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = gguf_field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    scaling = None
    if gguf_field(reader, f"{arch}.rope.scaling.type") == "llama3" or gguf_field(reader, f"{arch}.rope.scaling.factor"):
        scaling = {
            "rope_type": "llama3",
            "factor": float(gguf_field(reader, f"{arch}.rope.scaling.factor", 8.0)),
            "low_freq_factor": float(gguf_field(reader, f"{arch}.rope.scaling.low_freq_factor", 1.0)),
            "high_freq_factor": float(gguf_field(reader, f"{arch}.rope.scaling.high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                gguf_field(reader, f"{arch}.rope.scaling.original_context_length", 8192)),
        }
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        intermediate_size=int(gguf_field(reader, f"{arch}.feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        num_layers=int(gguf_field(reader, f"{arch}.block_count")),
        vocab_size=int(vocab),
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )
