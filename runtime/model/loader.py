"""Resolve ``--model`` (the default name, a .gguf file, a Hugging Face folder) into config, weights and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from xytune.model_config import ModelConfig, ModelLoadError
from xytune.profiler.devices import get_device
from xytune.profiler.geometry import DEFAULT_MODEL, GeometryError, smollm2_gguf_path
from xytune.profiler.probe import fastest_dtype

from .tokenizer import Tokenizer
from .weights import GGUFInt4Blocks, load_gguf, load_hf_folder

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, cost_model=None) -> torch.dtype:
    """``auto`` is what was measured fastest here: the cost table's verdict when there is one, else (CPU) a
    GEMM probe of float32 against bfloat16 (bf16 GEMMs run on an AVX2-only CPU, but 3-6x slower), else
    bfloat16 on an accelerator. A flag list cannot tell; a measurement can."""
    if name == "auto":
        if cost_model is not None:
            return DTYPE_NAMES[cost_model.fastest_dtype()]
        if device.type == "cpu":
            return DTYPE_NAMES[fastest_dtype(get_device("cpu"), ["float32", "bfloat16"])[0]]
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


class Checkpoint(NamedTuple):
    config: ModelConfig
    state: dict[str, torch.Tensor]  # float weights in HF names
    tokenizer: Tokenizer
    name: str  # as the user gave it
    int4_blocks: GGUFInt4Blocks | None = None  # a GGUF file's own 4-bit codes (None: a Hugging Face folder)


def load_checkpoint(model: str) -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file or a Hugging Face folder.")
        config, state, reader, blocks = load_gguf(path)
        return Checkpoint(config, state, Tokenizer.from_gguf(reader, path.parent), model, blocks)
    config, state = load_hf_folder(path)
    return Checkpoint(config, state, Tokenizer.from_folder(path), model)
