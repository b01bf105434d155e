"""CUDA and Ascend paths: run where the hardware is, skip cleanly where it is not."""

import pytest
import torch

from xytune.profiler.devices import cuda_available, get_device, npu_available
from xytune.profiler.geometry import PRESETS
from xytune.profiler.primitives import primitives_for
from xytune.profiler.sweep import Sweep, SweepSettings
from xytune.profiler.table import read_table
from xytune.profiler.timing import TimingPolicy

FAST = TimingPolicy(warmup=1, budget_s=0.005, min_samples=5, max_samples=10)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
needs_npu = pytest.mark.skipif(not npu_available(), reason="needs an Ascend NPU with torch_npu")


@needs_cuda
def test_cuda_fingerprint_and_event_timer():
    dev = get_device("cuda")
    fp = dev.fingerprint()
    assert fp["backend"] == "cuda" and fp["compute_units"] > 0 and fp["cuda"]
    a = torch.randn(1024, 1024, device="cuda")
    samples = dev.time_samples(lambda: a @ a, 5)
    assert len(samples) == 5 and all(s > 0 for s in samples)


@needs_cuda
def test_triton_gemm_matches_torch_on_gpu():
    from xytune.kernels.triton_gemm import triton_gemm

    for m in (1, 37, 128, 300):
        x = torch.randn(m, 576, device="cuda", dtype=torch.float16)
        w = torch.randn(960, 576, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(triton_gemm(x, w, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), x @ w.T,
                                   rtol=2e-2, atol=2e-2)


@needs_cuda
def test_cuda_sweep_searches_triton_tiles_with_optuna(tmp_path):
    dev = get_device("cuda")
    names = {p.name for p in primitives_for("gemm", "cuda", "float16")}
    assert {"torch.linear", "triton.tiled_gemm"} <= names
    out = tmp_path / "cuda.parquet"
    settings = SweepSettings(dtypes=["float16"], buckets=[1, 64], targets=["qkv"], search="auto", trials=6,
                             timing=FAST)
    Sweep(dev, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    rows = read_table(out).rows
    triton_rows = rows[rows["primitive"] == "triton.tiled_gemm"]
    assert triton_rows.groupby("m").size().to_dict() == {1: 6, 64: 6}
    assert (rows["median_s"] > 0).all()


@needs_npu
def test_npu_sweep_nd_and_nz(tmp_path):
    dev = get_device("npu")
    out = tmp_path / "npu.parquet"
    settings = SweepSettings(dtypes=["float16"], buckets=[1, 64], targets=["qkv"], timing=FAST)
    Sweep(dev, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    rows = read_table(out).rows
    assert set(rows.loc[rows["primitive"] == "npu.matmul", "config"]) == {'{"weight_format":"ND"}',
                                                                          '{"weight_format":"NZ"}'}


@needs_cuda
def test_engine_on_cuda_matches_cpu_greedy():
    from conftest import require_default_model

    from xytune.runtime.engine.sampling import SamplingParams
    from xytune.runtime.llm import LLM

    require_default_model()
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(max_tokens=24, temperature=0)
    cpu = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(prompts, params)]
    gpu = [o.outputs[0].token_ids for o in LLM(dtype="float32", device="cuda").generate(prompts, params)]
    # TF32 and other kernels may differ in the last bits; the first tokens must agree
    assert [g[:8] for g in gpu] == [c[:8] for c in cpu]


@needs_npu
def test_meta_attention_npu_matches_float64():
    from test_meta_attention import MIXED, random_batch, reference

    from xytune.kernels.meta_attention import plan_meta_attention
    from xytune.kernels.meta_attention.npu_backend import run_meta_attention_npu

    requests, q, k, v = random_batch(MIXED, 8, 2, 128, seed=0)
    plan = plan_meta_attention(requests, 8, 2, k.shape[1], tile_q=16, tile_kv=64, prefill_tile=32)
    out = run_meta_attention_npu(plan, q.half().npu(), k.half().npu(), v.half().npu(), 128 ** -0.5)
    torch.testing.assert_close(out.cpu().double(), reference(requests, q, k, v, 128 ** -0.5), rtol=2e-2,
                               atol=2e-2)


@needs_cuda
def test_engine_meta_attention_and_smooth_gemm_on_cuda(tmp_path):
    """Meta-Attention runs the Triton kernel and SmoothGEMM plans from a CUDA table; greedy output agrees."""
    from conftest import require_default_model

    from xytune.runtime.engine.sampling import SamplingParams
    from xytune.runtime.llm import LLM

    require_default_model()
    table = tmp_path / "cuda.parquet"
    settings = SweepSettings(dtypes=["float32"], buckets=[1, 8, 64, 256], search="auto", trials=4, timing=FAST)
    Sweep(get_device("cuda"), PRESETS["smollm2-135m"], settings, table).run(progress=False)
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(max_tokens=24, temperature=0)
    cpu = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(prompts, params)]
    gpu = [o.outputs[0].token_ids for o in LLM(dtype="float32", device="cuda", attention="meta", gemm="smooth",
                                    profile=str(table)).generate(prompts, params)]
    assert [g[:8] for g in gpu] == [c[:8] for c in cpu]
