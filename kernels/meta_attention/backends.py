"""Which Meta-Attention backend runs on a device, and what the Triton one makes of the tile sizes.

One answer for everything that runs or times Meta-Attention (the engine, the profiler's attention rows), so
a cost table measures the kernel serving runs on that device.
"""

from __future__ import annotations

from ..triton_gemm import triton_available
from .npu_backend import run_meta_attention_npu
from .torch_backend import run_meta_attention_torch
from .triton_backend import MIN_BLOCK, run_meta_attention_triton

RUNS = {"torch": run_meta_attention_torch, "triton": run_meta_attention_triton, "npu": run_meta_attention_npu}


HALF_PRECISION = ("float16", "bfloat16")  # what torch_npu's fused attention takes


def backend_for(device_type: str, dtype: str) -> str:
    """Triton on CUDA (torch where triton is not installed), torch_npu on Ascend in half precision (its fused
    attention takes nothing else: float32 runs the torch backend there), torch elsewhere."""
    if device_type == "cuda":
        return "triton" if triton_available() else "torch"
    return "npu" if device_type == "npu" and dtype in HALF_PRECISION else "torch"


def triton_tiles(tile_q: int, tile_kv: int) -> dict:
    """``plan_triton``'s row block and key split for the short class's tile sizes: rows in blocks of at least
    16 (``tl.dot``'s least side, so tile_q 4, 8 and 16 run the same kernel), keys split every ``tile_kv``."""
    return {"block_m": max(MIN_BLOCK, tile_q), "kv_split": tile_kv}
