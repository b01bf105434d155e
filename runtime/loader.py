"""Resolve ``--model`` (the default name, a .gguf file, a Hugging Face folder) into config, weights and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from xytune.geometry import DEFAULT_MODEL, GeometryError, smollm2_gguf_path
from xytune.runtime.config import ModelConfig, ModelLoadError
from xytune.runtime.tokenizer import Tokenizer
from xytune.runtime.weights import load_gguf, load_hf_folder

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 GEMMs run several times faster than float32 there."""
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return torch.bfloat16
    if name not in DTYPE_NAMES:
        raise ModelLoadError(f"Unknown dtype {name!r}; use float32, bfloat16, float16 or auto.")
    return DTYPE_NAMES[name]


def resolve_model_path(model: str) -> Path:
    if model.strip().lower() == DEFAULT_MODEL:
        try:
            return smollm2_gguf_path()
        except GeometryError as exc:
            raise ModelLoadError(str(exc)) from None
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model {model!r} not found: give {DEFAULT_MODEL}, a .gguf file or a Hugging Face "
                             "folder (config.json + *.safetensors + tokenizer.json). Nothing is downloaded.")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(f"{path} has no config.json and not exactly one .gguf file.")
    return path


def load_checkpoint(model: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    """(config, state dict in HF names, tokenizer, display name)."""
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file or a Hugging Face folder.")
        config, state, reader = load_gguf(path)
        return config, state, Tokenizer.from_gguf(reader, path.parent), model
    config, state = load_hf_folder(path)
    return config, state, Tokenizer.from_folder(path), model
