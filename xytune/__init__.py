"""xytune: offline profiling and autotuning for LLM serving on tile-shaped hardware."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Lazy, so `xytune profile` does not import the runtime (and its tokenizer stack).
    if name == "LLM":
        from xytune.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from xytune.runtime.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
