"""Weight-quantized GEMMs on CPU: each kernel against its own dequantized weight and the float one, the probe,
the sweep, SmoothGEMM's choice per M across formats, and LLM(quantization=...)."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require_default_model, synthetic_cost_model, synthetic_rows
from typer.testing import CliRunner

from xytune.cli import app
from xytune.kernels.quantized import GGUF_BLOCK, format_bytes, int4_codes, quantize_int4, quantize_int8, swept_formats
from xytune.model_config import read_gguf
from xytune.profiler.geometry import PRESETS
from xytune.profiler.primitives import REGISTRY, gemm_kernels
from xytune.profiler.probe import probe
from xytune.profiler.sweep import Sweep, SweepSettings
from xytune.profiler.table import read_table
from xytune.profiler.timing import TimingPolicy
from xytune.runtime.llm import LLM, _planners, weight_formats, within_budget
from xytune.runtime.model.linear import Linear
from xytune.runtime.model.weights import GGUFInt4Blocks

QUANTIZED = ("torch.int8pack_mm", "torch.int4pack_mm")


def operands(n=48, k=96, m=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, k, generator=gen)


def test_int8_equals_its_dequantized_weight_and_stays_within_its_rounding_of_the_float_one():
    w, b, x = operands()
    qw = quantize_int8(w)
    kernel = gemm_kernels(None, b, quantized={"int8": qw})["torch.int8pack_mm"]
    y = kernel(x, None, {}).double()
    own = x.double() @ (qw.data.double() * qw.scales.double()[:, None]).t() + b.double()
    torch.testing.assert_close(y, own, rtol=1e-5, atol=1e-5)
    # each weight is off by at most half a step (scale / 2) of its row: |y - y_float| <= |x| @ (scale / 2)
    bound = x.double().abs().sum(1, keepdim=True) * qw.scales.double()[None, :] / 2
    assert ((y - (x.double() @ w.double().t() + b.double())).abs() <= bound + 1e-5).all()
    assert qw.nbytes == format_bytes("int8", *w.shape, 4) == w.numel() + 4 * w.shape[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_int4_equals_its_dequantized_groups_and_stays_within_their_rounding(dtype, tol):
    w, b, x = operands(k=4 * GGUF_BLOCK)
    w, x = w.to(dtype), x.to(dtype)
    qw = quantize_int4(w)
    out = torch.empty(x.shape[0], w.shape[0], dtype=dtype)
    kernel = gemm_kernels(None, None, quantized={"int4": qw})["torch.int4pack_mm"]
    assert kernel(x, out, {}) is out
    # the reference from Q4_1's codes (q * d + m), independent of the packed layout: the op dequantizes
    # (q - 8) * scale + zero with the scale and zero stored in the activations' dtype
    codes, d, low = int4_codes(w)
    scale, zero = qw.scales[..., 0].t().double(), qw.scales[..., 1].t().double()  # [N, K / 32]
    groups = codes.double().reshape(w.shape[0], -1, GGUF_BLOCK)
    own = ((groups - 8) * scale[..., None] + zero[..., None]).reshape(w.shape)
    ref = x.double() @ own.t()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # each weight is off by at most half its group's step d: |y - y_float| <= sum over groups |x_g| * d_g / 2
    if dtype == torch.float32:
        per_weight = (d / 2).repeat_interleave(GGUF_BLOCK, dim=1).double()
        bound = x.double().abs() @ per_weight.t()
        assert ((out.double() - x.double() @ w.double().t()).abs() <= bound + 1e-4).all()
    assert qw.nbytes == format_bytes("int4", *w.shape, torch.empty(0, dtype=dtype).element_size())


def test_int4_refuses_shapes_its_packing_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize_int4(torch.randn(24, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(32, 48))


def test_the_probe_runs_them_here_and_prunes_them_cleanly_where_they_cannot(cpu_device):
    for name in QUANTIZED:
        assert probe(REGISTRY[name], "float32", cpu_device) is None, name
    missing = dataclasses.replace(REGISTRY["torch.int8pack_mm"], name="test.int8_missing", available=lambda: False)
    assert "not installed" in probe(missing, "float32", cpu_device)
    refused = dataclasses.replace(REGISTRY["torch.int4pack_mm"], name="test.int4_refused",
                                  probe_shape={"m": 3, "n": 24, "k": 64})  # the op packs rows in sixteens
    reason = probe(refused, "float32", cpu_device)
    assert "16" in reason and "\n" not in reason


def test_a_small_sweep_times_the_quantized_primitives_beside_the_float_ones(tmp_path, cpu_device):
    timing = TimingPolicy(warmup=1, budget_s=0.0, min_samples=3, max_samples=3)
    settings = SweepSettings(dtypes=["float32"], buckets=[2], targets=["o"], timing=timing, attention=False,
                             weight_formats=swept_formats("auto"))
    Sweep(cpu_device, PRESETS["smollm2-135m"], settings, tmp_path / "t.parquet").run(progress=False)
    rows = read_table(tmp_path / "t.parquet").rows
    for name in QUANTIZED:
        mine = rows[rows["primitive"] == name]
        assert list(mine["m"]) == [2] and (mine["median_s"] > 0).all(), name
    assert "torch.linear" in set(rows["primitive"])
    assert swept_formats("none") == ("float",) and swept_formats("int4") == ("float", "int4")
    # the default sweep times float weights only, as before the quantized formats
    float_only = SweepSettings(dtypes=["float32"], buckets=[2], targets=["o"], timing=timing, attention=False)
    Sweep(cpu_device, PRESETS["smollm2-135m"], float_only, tmp_path / "f.parquet").run(progress=False)
    assert not set(read_table(tmp_path / "f.parquet").rows["primitive"]) & set(QUANTIZED)


def quantized_small(prim, m, n, k):
    """int8 reads a quarter of the bytes (wins at small M) but computes slower (float wins at large M)."""
    per = n * k * 1e-12
    return 1e-5 + 4.0 * per * m if prim == "torch.int8pack_mm" else 4e-5 + per * m


def test_smooth_gemm_picks_int8_at_small_m_and_float_at_large_m(tmp_path):
    geometry = PRESETS["smollm2-135m"]
    cost_model = synthetic_cost_model(tmp_path / "t.parquet", synthetic_rows(
        geometry, quantized_small, primitives=("torch.linear", "torch.int8pack_mm")))
    g = geometry.gemm("o")
    formats = weight_formats("int8", cost_model, g.n, g.k, "float32", smooth=True)
    assert formats == ["float", "int8"]  # float wins somewhere, so it stays loaded beside int8
    w, _, x = operands(g.n, g.k, m=200)
    lin = Linear(w, None, "smooth", planner=_planners(cost_model, "float32"))
    lin.load_formats(formats, _planners(cost_model, "float32"))
    assert [s.primitive for s in lin.planner.plan(1).segments] == ["torch.int8pack_mm"]
    assert {s.primitive for s in lin.planner.plan(200).segments} == {"torch.linear"}
    qw = lin.quantized["int8"]
    for m in (1, 200):
        bound = x[:m].abs().sum(1, keepdim=True) * qw.scales[None, :] / 2 + 1e-4
        assert ((lin(x[:m]) - F.linear(x[:m], w)).abs() <= bound).all()
    assert set(lin.weight_bytes) == {"float", "int8"}

    # where int8 wins at every M, the float weight is not kept
    always = synthetic_cost_model(tmp_path / "u.parquet", synthetic_rows(
        geometry, lambda p, m, n, k: quantized_small(p, m, n, k) / (10 if "int8" in p else 1),
        primitives=("torch.linear", "torch.int8pack_mm")))
    assert weight_formats("int8", always, g.n, g.k, "float32", smooth=True) == ["int8"]
    with pytest.raises(ValueError, match="no int4 GEMM rows"):
        weight_formats("int4", always, g.n, g.k, "float32", smooth=True)


def test_auto_keeps_the_smallest_formats_within_its_memory_share():
    n, k = 64, 64
    every = ["float", "int8", "int4"]
    assert within_budget(every, n, k, 4, float("inf")) == every
    assert within_budget(every, n, k, 4, format_bytes("float", n, k, 4)) == ["int8", "int4"]
    assert within_budget(every, n, k, 4, 1) == ["int4"]  # one format always stays


def test_llm_int8_generates_the_float_models_greedy_tokens():
    require_default_model()
    from xytune.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = "The capital of France is"
    reference = LLM(dtype="float32", kv_cache_gb=0.05)
    float_ids = reference.generate(prompt, params)[0].outputs[0].token_ids
    int8 = LLM(dtype="float32", kv_cache_gb=0.05, quantization="int8")
    # bound: the first 8 greedy tokens agree (per-channel int8 moves this prompt's logits by well under
    # the margin between its top two tokens; 16 agree on the machine this was written on)
    assert int8.generate(prompt, params)[0].outputs[0].token_ids == float_ids
    assert set(int8.weight_bytes) == {"int8"}  # one byte a weight plus a float32 scale a row: about a quarter
    assert 0.25 <= int8.weight_bytes["int8"] / reference.weight_bytes["float"] < 0.26
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(quantization="int3")


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["serve"], ["profile", "--no-progress"]])
def test_a_bad_quantization_is_one_line_and_exit_2(command):
    run = CliRunner().invoke(app, [*command, "--quantization", "int3"])
    assert run.exit_code == 2, run.output
    assert "--quantization must be one of" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_step_predictions_count_only_the_weight_formats_loaded(tmp_path):
    """A table that also timed int8 weights must not make a float server's steps look int8-fast."""
    gemms = PRESETS["smollm2-135m"].gemms()
    cost_model = synthetic_cost_model(tmp_path / "t.parquet", synthetic_rows(
        PRESETS["smollm2-135m"], quantized_small, primitives=("torch.linear", "torch.int8pack_mm")))
    floats = cost_model.for_formats(("float",))
    assert set(floats.table.rows["primitive"]) == {"torch.linear"}
    assert floats.predict_step(1, dtype="float32") == pytest.approx(
        sum(g.count * quantized_small("torch.linear", 1, g.n, g.k) for g in gemms))
    assert cost_model.predict_step(1, dtype="float32") == pytest.approx(  # int8 wins at M=1, but on lm_head
        sum(g.count * min(quantized_small(p, 1, g.n, g.k) for p in ("torch.linear", "torch.int8pack_mm"))
            for g in gemms))
    assert cost_model.predict_step(1, dtype="float32") < floats.predict_step(1, dtype="float32")


def test_a_gguf_files_own_q4_blocks_are_its_float_weights_exactly():
    require_default_model()
    from xytune.runtime.model.loader import load_checkpoint

    ckpt = load_checkpoint("smollm2-135m")
    layer = "model.layers.0."
    q_proj, down = layer + "self_attn.q_proj.weight", layer + "mlp.down_proj.weight"  # Q rows are permuted back
    for name in (q_proj, down):
        q, d, m = ckpt.int4_blocks.codes([name])
        assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.shape == m.shape == (q.shape[0], q.shape[1] // 32)
        dequant = q.float() * d.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)
        assert torch.equal(dequant, ckpt.state[name])  # gguf-py's own dequantization, bit for bit
    qkv = [layer + f"self_attn.{x}_proj.weight" for x in "qkv"]
    q, d, m = ckpt.int4_blocks.codes(qkv)  # a fused weight: its parts stacked along N
    assert q.shape == torch.cat([ckpt.state[n] for n in qkv]).shape
    assert ckpt.int4_blocks.codes(["model.embed_tokens.weight"]) is None  # stored as Q8_0, not in 4-bit blocks
    # an int4 weight made from those blocks computes with the checkpoint's weight itself (float32 activations)
    w, x = ckpt.state[down], torch.randn(3, ckpt.state[down].shape[1], generator=torch.Generator().manual_seed(0))
    lin = Linear(w.clone(), mode="plain", sources=(down,))
    lin.load_formats(["int4"], int4_codes=ckpt.int4_blocks.codes([down]))
    assert lin.int4_from_checkpoint
    torch.testing.assert_close(lin(x), x @ w.T, rtol=1e-4, atol=1e-4)  # float32 sums of 1536 in another order


def k_quant_file(path, rows: int = 16, supers: int = 2, seed: int = 0):
    """A GGUF file holding random Q4_K and Q6_K tensors [rows, supers * 256] (any bytes are valid blocks once
    their float16 steps are finite), read back with gguf-py's reader."""
    rng = np.random.default_rng(seed)
    q4k = rng.integers(0, 256, (rows, supers, 144), dtype=np.uint8)
    for lo in (0, 2):  # d and dmin
        q4k[..., lo:lo + 2] = rng.uniform(1e-3, 2e-2, (rows, supers)).astype(np.float16)[..., None].view(np.uint8)
    q6k = rng.integers(0, 256, (rows, supers, 210), dtype=np.uint8)
    q6k[..., 208:210] = np.full((rows, supers), 1e-2, dtype=np.float16)[..., None].view(np.uint8)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", q4k.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("blk.0.attn_v.weight", q6k.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_q4_k_super_blocks_are_groups_of_32_and_give_back_gguf_pys_weights_exactly(tmp_path):
    tensors = k_quant_file(tmp_path / "k.gguf")
    down, v = tensors["blk.0.ffn_down.weight"], tensors["blk.0.attn_v.weight"]
    blocks = GGUFInt4Blocks()
    blocks.add("down", down, None)
    blocks.add("v", v, None)
    q, d, m = blocks.codes(["down"])
    assert q.shape == (16, 512) and d.shape == m.shape == (16, 16) and int(q.max()) <= 15
    reference = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).reshape(16, 512))
    dequant = q.float() * d.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)
    assert torch.equal(dequant, reference)  # bit for bit
    # Q6_K is kept above 4 bits: no int4 codes, and int4 serves it int8
    assert blocks.codes(["v"]) is None and blocks.codes(["down", "v"]) is None
    assert blocks.stored_finer_than_4_bits(["v"]) and not blocks.stored_finer_than_4_bits(["down"])
    # the int4 kernel on those codes computes with the file's weight
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    lin = Linear(reference.clone(), mode="plain", sources=("down",))
    lin.load_formats(["int4"], int4_codes=(q, d, m))
    assert lin.int4_from_checkpoint
    torch.testing.assert_close(lin(x), x @ reference.T, rtol=1e-4, atol=1e-4)


def test_llm_int4_serves_the_gguf_at_its_own_precision():
    require_default_model()
    own = LLM(dtype="float32", kv_cache_gb=0.05, quantization="int4")
    layers = own.model.config.num_layers
    assert own.int4_from_checkpoint == 4 * layers  # qkv, o, gate_up and down of every layer: their Q4_1 blocks
    head = own.model.lm_head  # the Q8_0 embedding it shares stays 8-bit, as llama.cpp runs it
    assert set(head.quantized) == {"int8"} and head.weight is None
    assert own.weight_bytes["int8"] == head.weight_bytes["int8"]
    every = LLM(dtype="float32", kv_cache_gb=0.05, quantization="int4", int4_from_checkpoint=False)
    assert every.int4_from_checkpoint == 0 and set(every.weight_bytes) == {"int4"}


def test_a_gguf_is_parsed_once_per_version_of_the_file(tmp_path):
    """The parsed reader is shared while the file stays the same, and a rewritten file is parsed anew."""
    path = tmp_path / "k.gguf"
    k_quant_file(path)
    first = read_gguf(path)
    assert read_gguf(str(path)) is first
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    again = read_gguf(path)
    assert again is not first and [t.name for t in again.tensors] == ["output_norm.weight"]
    assert np.array_equal(again.tensors[0].data, np.arange(8, dtype=np.float32))
