"""The Triton GEMM: IEEE float32 dots (never TF32) and the tile configs the profiler may time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xytune.profiler import primitives
from xytune.profiler.devices import Device
from xytune.profiler.primitives import ACC_REGISTERS_PER_THREAD, triton_gemm_invalid

# Runs under TRITON_INTERPRET=1 (Triton reads it at import, hence a process of its own). The interpreter
# computes every dot in IEEE float32 whatever it is asked, so the test also records what the kernel is asked.
FLOAT32_CHECK = r"""
import torch
from triton.backends.amd.compiler import HIPOptions
from triton.backends.nvidia.compiler import CUDAOptions

from xytune.kernels import triton_gemm as tg

launched = []


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launched.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


tg._gemm_kernel = Recorder(tg._gemm_kernel)


def tf32(t):
    # round to TF32's 10-bit mantissa, as a TF32 tensor core reads float32
    return (t.view(torch.int32) + 0x1000 & ~0x1FFF).view(torch.float32)


torch.manual_seed(0)
for m, n, k in [(5, 70, 300), (64, 96, 256)]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    out = tg.triton_gemm(x, w, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    # float32 sums of 300 O(1) products differ by summation order only (~1e-5); TF32 inputs by ~1e-2
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(tf32(x) @ tf32(w).T, x @ w.T, rtol=1e-5, atol=1e-4)
tg.triton_gemm(torch.randn(4, 32).half(), torch.randn(16, 32).half(), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
precisions = [kw["PRECISION"] for kw in launched]
assert precisions == ["ieee"] * 3, precisions
# and every backend accepts the name (AMD before CDNA3 refuses "tf32", whatever the dtype)
assert "ieee" in CUDAOptions.allowed_dot_input_precisions and "ieee" in HIPOptions.allowed_dot_input_precisions
print("ok")
"""


def run_interpreted(script: str) -> None:
    """``script`` in a process of its own under TRITON_INTERPRET=1; it prints ok at its end."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_float32_gemm_is_ieee_and_matches_torch():
    run_interpreted(FLOAT32_CHECK)


def _config(bm, bn, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


BIG = {"m": 4096, "n": 4096, "k": 4096}


@pytest.mark.parametrize("config,dtype,reason", [
    (_config(128, 256, 32, 2, 2), "float16", "512 accumulator values per thread"),
    (_config(128, 256, 32, 4, 2), "float16", "256 accumulator values per thread"),
    (_config(256, 128, 32, 4, 2), "bfloat16", "256 accumulator values per thread"),
    # the pipeline fits (48 KiB), the float32 epilogue tile (128 KiB) does not
    (_config(128, 256, 32, 8, 2), "float16", "131072 B of shared memory for its epilogue"),
    (_config(128, 128, 128, 4, 4), "float32", "for its K-loop pipeline"),
])
def test_configs_that_spill_or_overflow_shared_memory_are_rejected(config, dtype, reason):
    cpu = Device("cpu")  # the conservative 96 KiB figure
    assert reason in (triton_gemm_invalid(BIG, config, dtype, cpu) or "")


@pytest.mark.parametrize("config,dtype", [
    (_config(64, 128, 32, 4, 3), "float16"),  # 64 accumulators a thread, 36 KiB
    (_config(128, 128, 32, 4, 2), "bfloat16"),  # exactly the register budget; the 64 KiB epilogue fits
    (_config(64, 64, 64, 2, 2), "float32"),
])
def test_configs_within_both_budgets_pass(config, dtype):
    assert triton_gemm_invalid(BIG, config, dtype, Device("cpu")) is None


def test_pipeline_and_epilogue_share_shared_memory(monkeypatch):
    """Triton's tutorial tile for H100 (128x256x64, 8 warps, 3 stages): 144 KiB of pipeline, then a 128 KiB
    epilogue in the same bytes. Counting their sum (272 KiB) would refuse a config that runs in 227 KiB."""
    monkeypatch.setattr(primitives, "shared_memory_bytes", lambda device: 232448)  # H100's opt-in per block
    config = _config(128, 256, 64, 8, 3)
    assert 128 * 256 // (32 * 8) == ACC_REGISTERS_PER_THREAD
    assert triton_gemm_invalid(BIG, config, "float16", Device("cuda")) is None
    assert "shared memory" in triton_gemm_invalid(BIG, _config(128, 256, 64, 8, 5), "float16", Device("cuda"))


# The weight-only quantized kernel (CUDA's int8 and int4 primitives) under the interpreter, on the very codes the
# CPU kernels take, against the weight they dequantize to; odd M, N and K tails included.
WEIGHT_QUANT_CHECK = r"""
import torch

from xytune.kernels.quantized import _bind_triton, int4_codes, int4_nibbles, quantize_int8
from xytune.kernels.triton_gemm import triton_weight_quant_gemm

torch.manual_seed(0)
config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
for m, n, k in [(5, 48, 96), (17, 70, 160)]:
    w, x, bias = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
    q8 = quantize_int8(w)
    out = torch.empty(m, n)
    triton_weight_quant_gemm(x, q8.data, q8.scales, out, 8, k, **config)
    torch.testing.assert_close(out, x @ (q8.data.double() * q8.scales.double()[:, None]).float().T,
                               rtol=1e-4, atol=1e-4)
    q, d, low = int4_codes(w)
    q4 = int4_nibbles(q, d, low, torch.float32)
    assert q4.data.dtype == torch.uint8 and q4.data.shape == (n, k // 2) and q4.nbytes == n * k // 2 + 2 * 4 * n * k // 32
    dequant = q.float() * d.repeat_interleave(32, dim=1) + low.repeat_interleave(32, dim=1)
    y = _bind_triton(q4, bias, 4)(x, None, config)  # the bound kernel, bias and all
    torch.testing.assert_close(y, x @ dequant.T + bias, rtol=1e-4, atol=1e-4)
    assert (dequant - w).abs().max() <= d.max() / 2 + 1e-6  # and the codes are w's to half a step
# half-precision activations: the dequantized tile is cast to them before the dot, as on a GPU
x, w = torch.randn(3, 64).half(), torch.randn(32, 64)
q, d, low = int4_codes(w)
q4 = int4_nibbles(q, d, low, torch.float16)
y = torch.empty(3, 32, dtype=torch.float16)
triton_weight_quant_gemm(x, q4.data, q4.scales, y, 4, 32, q4.offsets, **config)
dequant = (q.float() * d.half().float().repeat_interleave(32, 1) + low.half().float().repeat_interleave(32, 1))
torch.testing.assert_close(y.float(), x.float() @ dequant.half().float().T, rtol=1e-2, atol=2e-2)
print("ok")
"""


def test_weight_quant_gemm_matches_the_dequantized_weight_under_the_interpreter():
    run_interpreted(WEIGHT_QUANT_CHECK)


def test_cuda_has_weight_quant_primitives_for_both_formats():
    for name, fmt in (("triton.weight_quant_int8", "int8"), ("triton.weight_quant_int4", "int4")):
        p = primitives.REGISTRY[name]
        assert p.backends == ("cuda",) and p.weight_format == fmt and p.invalid is triton_gemm_invalid
        assert set(p.space) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}
