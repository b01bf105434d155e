"""xytune: offline profiling and autotuning for LLM serving on tile-shaped hardware."""

__version__ = "0.1.0"
