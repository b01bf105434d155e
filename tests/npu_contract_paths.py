"""xytune's NPU code paths end to end against the torch_npu stand-in (tests/npu_standin).

Run by tests/test_npu_contract.py in a fresh interpreter with the stand-in first on PYTHONPATH, so the project's
own ``import torch_npu`` finds it; skipped anywhere else (the real torch_npu runs tests/test_accelerators.py).
The stand-in's ops carry torch_npu's upstream schemas and compute on CPU, so a wrong keyword, a misread return
value or a wrong mask convention fails here as it would on an Ascend host.
"""

from __future__ import annotations

import platform
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

torch_npu = pytest.importorskip("torch_npu")
if "npu_standin" not in torch_npu.__file__:
    pytest.skip("runs against the CPU stand-in only (tests/test_npu_contract.py starts it)", allow_module_level=True)

from conftest import synthetic_rows  # noqa: E402
from test_meta_attention import MIXED, random_batch, reference  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import xytune.profiler.sweep as sweep_module  # noqa: E402
from xytune.cli import app  # noqa: E402
from xytune.kernels.meta_attention import CAUSAL, TREE, plan_meta_attention  # noqa: E402
from xytune.kernels.meta_attention.npu_backend import run_meta_attention_npu  # noqa: E402
from xytune.kernels.smooth_gemm import Segment, SmoothGEMMPlanner, SmoothPlan, run_smooth_gemm  # noqa: E402
from xytune.profiler.cost_model import CostModel  # noqa: E402
from xytune.profiler.devices import DEFAULT_FLUSH_BYTES, DeviceError, fingerprint_mismatches, get_device  # noqa: E402
from xytune.profiler.geometry import PRESETS  # noqa: E402
from xytune.profiler.primitives import gemm_kernels, weight_format_of  # noqa: E402
from xytune.profiler.table import CostTable, new_meta, read_table, write_table  # noqa: E402

machine = torch_npu.npu  # the simulated Ascend host: tests change it with monkeypatch
OLD_TORCH_NPU_PROPS = SimpleNamespace(name="Ascend910B3", total_memory=64 * 2**30)  # before cube_core_num


def _attention_reference(q, k, v, allowed, scale):
    """float64 attention of BNSD ``q`` over ``k``/``v`` with ``num_heads / kv_heads`` query heads per K/V head;
    ``allowed`` [B, 1, S, KV] True = may read."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=allowed, scale=scale)


def test_standin_attention_is_the_documented_math_in_every_layout():
    """The stand-in itself against SDPA: GQA, atten_mask True = masked out, actual_seq_lengths_kv, scale."""
    gen = torch.Generator().manual_seed(0)
    B, N, Nkv, S, KV, D = 2, 4, 2, 5, 9, 16
    q = torch.randn(B, N, S, D, generator=gen).half()
    k = torch.randn(B, Nkv, KV, D, generator=gen).half()
    v = torch.randn(B, Nkv, KV, D, generator=gen).half()
    masked = torch.rand(B, 1, S, KV, generator=gen) < 0.3
    masked[..., 0] = False  # every row reads a key
    lens = [9, 6]
    allowed = ~masked & (torch.arange(KV) < torch.tensor(lens)[:, None, None, None])
    expected = _attention_reference(q, k, v, allowed, 0.3)
    layouts = {"BNSD": lambda t: t, "BSND": lambda t: t.transpose(1, 2), "BSH": lambda t: t.transpose(1, 2).flatten(2)}
    for layout, to in layouts.items():
        out, lse = torch_npu.npu_fused_infer_attention_score(
            to(q).contiguous().npu(), to(k).contiguous().npu(), to(v).contiguous().npu(), atten_mask=masked.npu(),
            actual_seq_lengths_kv=lens, num_heads=N, num_key_value_heads=Nkv, input_layout=layout, scale=0.3)
        assert out.device == torch.device("npu:0") and out.dtype == torch.float16 and lse.numel() == 1
        back = out.cpu().double()
        back = back.view(B, S, N, D) if layout == "BSH" else back
        back = back if layout == "BNSD" else back.transpose(1, 2)
        torch.testing.assert_close(back, expected, rtol=2e-3, atol=2e-3)


def test_standin_refuses_what_torch_npu_refuses():
    q = torch.randn(1, 1, 2, 8).half().npu()
    k = torch.randn(1, 4, 2, 8).half().npu()
    op = torch_npu.npu_fused_infer_attention_score
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale_value'"):
        op(q, k, k, num_heads=2, input_layout="BSND", scale_value=0.5)
    with pytest.raises(TypeError, match="positional"):
        op(q, k, k, None)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.float(), k.float(), k.float(), num_heads=2, input_layout="BSND")
    with pytest.raises(NotImplementedError, match="CPU"):  # no CPU kernel: host tensors fail as on Ascend
        op(q.cpu(), k.cpu(), k.cpu(), num_heads=2, input_layout="BSND")
    with pytest.raises(RuntimeError, match="same device"):
        q + torch.ones(1, 1, 2, 8).half()
    assert isinstance(op(q, k, k, num_heads=2, input_layout="BSND"), tuple)
    with pytest.raises(TypeError, match="unexpected keyword"):
        torch_npu.npu_format_cast(k, acl_format=29, format=29)


# -- devices --

def test_npu_names_resolve_to_the_device_and_the_chip_it_reports():
    for spec in ("npu", "npu:0", "ascend910b", "ascend910b3", "ascend910b3:1"):
        dev = get_device(spec)
        assert dev.backend == "npu" and dev.chip is not None and dev.chip.name == "Ascend910B3"
    assert get_device("npu:1").torch_device == torch.device("npu:1")
    with pytest.raises(DeviceError, match="is a ascend910b3"):
        get_device("ascend910b1")
    with pytest.raises(DeviceError, match="npu:2 does not exist"):
        get_device("npu:2")


def test_fingerprint_takes_the_cores_and_cann_from_the_device(monkeypatch):
    fp = get_device("npu").fingerprint()
    assert fp["device_name"] == "Ascend910B3" and fp["compute_units"] == 20
    assert fp["cann"] == "8.1.RC1" and fp["torch_npu"] == "0.0.0+standin"
    monkeypatch.setattr(machine, "PROPERTIES", machine._NPUDeviceProperties("Ascend910B3", 2**36, 18, 36, 2**22))
    assert get_device("npu").fingerprint()["compute_units"] == 18  # the device's own count, not the spec's 20
    monkeypatch.setattr(machine, "PROPERTIES", OLD_TORCH_NPU_PROPS)
    assert get_device("npu").fingerprint()["compute_units"] == 20  # old torch_npu: the chip spec


def test_cann_version_falls_back_to_the_toolkit_install_info(monkeypatch, tmp_path):
    monkeypatch.setattr(machine.utils, "CANN_VERSION", "")  # torch_npu answers "" before CANN 8.1.RC1
    info = tmp_path / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    info.parent.mkdir()
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001C19\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    assert get_device("npu").fingerprint()["cann"] == "8.0.RC3"
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME")
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    assert get_device("npu").fingerprint()["cann"] is None


def test_a_table_profiled_as_ascend910b3_loads_on_npu0(tmp_path):
    """`serve --device ascend910b3` reloads its device as npu:0: the table must describe both."""
    fp = get_device("ascend910b3").fingerprint()
    geometry = PRESETS["smollm2-135m"]
    meta = new_meta(fp, geometry.to_dict(), {"gemm_flops": {"float16": 1e14}, "copy_bytes_per_s": 1e12},
                    {"dtypes": ["float16"]})
    meta["complete"] = True
    path = tmp_path / "910b3.parquet"
    write_table(path, CostTable(synthetic_rows(geometry, lambda p, m, n, k: 1e-5 * m, dtype="float16"), meta))
    assert fingerprint_mismatches(fp, get_device("npu:0").fingerprint()) == ([], [])
    CostModel.load(path, device="npu:0")  # refused before: compute_units 20 against None


def test_events_time_on_the_devices_own_npu_after_a_flush_of_twice_its_l2(monkeypatch):
    recorded = []

    class Event(machine.Event):
        def record(self, stream=None):
            super().record(stream)
            recorded.append(self.device)

    monkeypatch.setattr(machine, "Event", Event)
    dev = get_device("npu:1")
    x = torch.randn(64, 64).npu(1)
    samples = dev.time_samples(lambda: x @ x, 3)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    assert recorded == [torch.device("npu:1")] * 6 and machine.current_device() == 0
    assert dev._flush_buffer.device == torch.device("npu:1")
    assert dev._flush_buffer.numel() * 4 == dev.flush_bytes() == 2 * machine.PROPERTIES.L2_cache_size
    monkeypatch.setattr(machine, "PROPERTIES", OLD_TORCH_NPU_PROPS)
    assert get_device("npu").flush_bytes() == DEFAULT_FLUSH_BYTES


# -- the profiler: `xytune profile --device npu` --

@pytest.fixture(scope="module")
def npu_table(tmp_path_factory):
    """A small sweep of the qkv GEMM on npu:0, as the CLI runs it."""
    out = tmp_path_factory.mktemp("npu") / "npu.parquet"
    with pytest.MonkeyPatch.context() as mp:
        # the peaks time 8192^2 GEMMs and 1 GiB copies: minutes on a CPU stand-in, and not what is tested here
        mp.setattr(sweep_module, "measure_peaks",
                   lambda device, dtypes: {"gemm_flops": {d: 1e14 for d in dtypes}, "copy_bytes_per_s": 1e12})
        run = CliRunner().invoke(app, ["profile", "--device", "npu", "--targets", "qkv", "--buckets", "1,8,64",
                                       "--dtypes", "float16", "--budget-ms", "1", "--no-progress", "-o", str(out)])
    assert run.exit_code == 0, run.output
    return read_table(out)


def test_profile_times_npu_matmul_with_nd_and_nz_weights(npu_table):
    rows = npu_table.rows
    assert npu_table.complete and (rows["median_s"] > 0).all()
    nz = rows[rows["primitive"] == "npu.matmul"]
    assert set(nz["config"]) == {'{"weight_format":"ND"}', '{"weight_format":"NZ"}'}
    assert sorted(nz.groupby("config")["m"].apply(sorted).tolist()) == [[1, 8, 64], [1, 8, 64]]
    assert "torch.linear" in set(rows["primitive"])
    fp = npu_table.meta["fingerprint"]
    assert fp["backend"] == "npu" and fp["compute_units"] == 20 and fp["cann"] == "8.1.RC1"
    assert not [p for p in npu_table.meta.get("pruned", []) if p.get("primitive") == "npu.matmul"]


def test_smooth_gemm_on_npu_matmul_matches_float64(npu_table, tmp_path):
    g = PRESETS["smollm2-135m"].gemm("qkv")
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(g.n, g.k, generator=gen) / g.k ** 0.5
    b = torch.randn(g.n, generator=gen)
    x = torch.randn(70, g.k, generator=gen)
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
    kernels = gemm_kernels(w.half().npu(), b.half().npu())
    assert {"npu.matmul", "torch.linear"} <= set(kernels)
    nz, nd = (("weight_format", "NZ"),), (("weight_format", "ND"),)
    by_hand = SmoothPlan(70, (Segment(0, 64, 64, "npu.matmul", nz, 0.0), Segment(64, 6, 8, "npu.matmul", nd, 0.0)))
    path = tmp_path / "npu.parquet"
    write_table(path, npu_table)
    planner = SmoothGEMMPlanner(CostModel.load(path, device="npu"), g.n, g.k, "float16", primitives={"npu.matmul"},
                                exact_tails=False)
    for plan in (by_hand, planner.plan(70)):
        out = run_smooth_gemm(plan, x.half().npu(), kernels, n=g.n)
        assert out.device == torch.device("npu:0") and out.dtype == torch.float16
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-2, atol=1e-2)


# -- Meta-Attention on torch_npu's fused attention --

# MIXED and short verifies whose key counts are not in descending order (they share one fused call)
BATCH = MIXED + [(CAUSAL, 3, 5), (TREE, 4, 90), (CAUSAL, 1, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (9, 3, 32)])
def test_meta_attention_npu_matches_float64(dtype, heads, kv_heads, head_dim):
    requests, q, k, v = random_batch(BATCH, heads, kv_heads, head_dim, seed=0, slots=2048)
    plan = plan_meta_attention(requests, heads, kv_heads, k.shape[1], tile_q=16, tile_kv=64, prefill_tile=32)
    assert plan.long and any(r.q_len == 1 for _, r in plan.short_requests)  # both fused-attention branches
    assert any(r.q_len > 1 for _, r in plan.short_requests)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = run_meta_attention_npu(plan, q.npu(), k.npu(), v.npu(), head_dim ** -0.5)
    assert out.device == torch.device("npu:0") and out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.cpu().double(), reference(requests, q, k, v, head_dim ** -0.5), rtol=tol, atol=tol)


def test_a_float32_engine_is_refused_in_one_line():
    requests, q, k, v = random_batch(MIXED, 8, 2, 64, seed=0, slots=1024)
    plan = plan_meta_attention(requests, 8, 2, k.shape[1], tile_q=16, tile_kv=64, prefill_tile=32)
    with pytest.raises(ValueError, match="float16 or bfloat16, not float32") as err:
        run_meta_attention_npu(plan, q.npu(), k.npu(), v.npu(), 0.125)
    assert "\n" not in str(err.value)


def test_the_engine_sends_half_precision_to_the_fused_op_and_float32_to_the_torch_backend():
    """torch_npu's fused attention takes fp16/bf16 only: a float32 engine on an NPU runs the torch backend."""
    from xytune.kernels.meta_attention.backends import backend_for

    assert backend_for("npu", "float16") == backend_for("npu", "bfloat16") == "npu"
    assert backend_for("npu", "float32") == "torch"
    requests, q, k, v = random_batch(MIXED, 9, 3, 64, seed=5, page=16)
    plan = plan_meta_attention(requests, 9, 3, k.shape[1], tile_q=8, tile_kv=64, prefill_tile=16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        run_meta_attention_npu(plan, q.npu(), k.npu(), v.npu(), 0.125)


def test_a_verify_moves_accepted_keys_with_indices_on_the_cache_device():
    """Speculative verify copies the accepted tokens' K/V within the pools: the slot indices must live where the
    pools do (a CPU index against an NPU or CUDA pool raises there)."""
    from xytune.runtime.engine.kv_cache import KVCache

    kv = KVCache(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16,
                 device="npu:0")
    kv.k[0].copy_(torch.arange(2 * 16 * 8, dtype=torch.float16).view(2, 16, 8).npu())
    src = kv.slots([3, 1], 0, 6)
    assert src.device.type == "npu" and src.cpu().tolist() == [12, 13, 14, 15, 4, 5]
    frm, to = src[[5]], src[[2]]
    kv.k[0].index_copy_(1, to, kv.k[0].index_select(1, frm))
    assert torch.equal(kv.k[0][:, 14].cpu(), kv.k[0][:, 5].cpu())


# -- weight-only quantized GEMMs (kernels/quantized.py) on torch_npu's npu_weight_quant_batchmatmul --

def test_standin_weight_quant_matmul_is_the_documented_math_and_refuses_what_it_refuses():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=gen).half()
    codes = torch.randint(-8, 8, (64, 16), generator=gen, dtype=torch.int32)
    scale = (torch.rand(2, 16, generator=gen) + 0.5).half()
    offset = torch.randn(2, 16, generator=gen).half()
    w = (codes.double() + offset.double().repeat_interleave(32, 0)) * scale.double().repeat_interleave(32, 0)
    packed = torch_npu.npu_convert_weight_to_int4pack(codes.npu())
    assert packed.shape == (64, 2) and packed.dtype == torch.int32
    out = torch_npu.npu_weight_quant_batchmatmul(x.npu(), packed, scale.npu(), offset.npu(), antiquant_group_size=32)
    torch.testing.assert_close(out.cpu().double(), x.double() @ w, rtol=2e-3, atol=2e-2)
    int8 = codes.to(torch.int8).t().contiguous()  # [N, K] codes, passed as a [K, N] view
    per_channel = scale[0].npu()
    out = torch_npu.npu_weight_quant_batchmatmul(x.npu(), int8.npu().t(), per_channel)
    torch.testing.assert_close(out.cpu().double(), x.double() @ (codes.double() * scale[0].double()), rtol=2e-3,
                               atol=2e-2)
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        torch_npu.npu_weight_quant_batchmatmul(x.float().npu(), int8.npu().t(), per_channel.float())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch_npu.npu_weight_quant_batchmatmul(x.npu(), packed, scale.npu(), antiquant_group_size=16)
    with pytest.raises(TypeError, match="unexpected keyword argument 'group_size'"):
        torch_npu.npu_weight_quant_batchmatmul(x.npu(), packed, scale.npu(), group_size=32)


@pytest.mark.parametrize("fmt, bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_gemms_on_the_npu_match_their_dequantized_weight(fmt, bound):
    """Each format's NPU kernel computes x @ its own dequantized weight (to fp16 rounding), and stays within the
    format's quantisation error of the float weight."""
    from xytune.kernels.quantized import QUANTIZERS, int4_codes

    g = PRESETS["smollm2-135m"].gemm("qkv")
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(g.n, g.k, generator=gen) / g.k ** 0.5).half()
    b = torch.randn(g.n, generator=gen).half()
    x = torch.randn(11, g.k, generator=gen).half()
    qw = QUANTIZERS[fmt](w.npu())
    kernels = gemm_kernels(None, b.npu(), quantized={fmt: qw})
    name = f"npu.weight_quant_{fmt}"
    assert set(kernels) == {name}
    out = kernels[name](x.npu(), None, {}).cpu().double()
    if fmt == "int8":
        dequantized = qw.data.cpu().double() * qw.scales.cpu().double()[:, None]
    else:
        q, d, low = int4_codes(w.float())
        dequantized = (q.double() * d.double().repeat_interleave(32, 1) + low.double().repeat_interleave(32, 1))
    expected = x.double() @ dequantized.t() + b.double()
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=3e-2)
    exact = x.double() @ w.double().t() + b.double()
    assert (out - exact).norm() / exact.norm() < bound
    assert qw.nbytes < w.numel() * w.element_size() * (0.6 if fmt == "int8" else 0.4)


def test_profile_times_the_npu_quantized_primitives_beside_float(tmp_path):
    out = tmp_path / "npu-q.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_module, "measure_peaks",
                   lambda device, dtypes: {"gemm_flops": {d: 1e14 for d in dtypes}, "copy_bytes_per_s": 1e12})
        run = CliRunner().invoke(app, ["profile", "--device", "npu", "--targets", "qkv", "--buckets", "1,8",
                                       "--dtypes", "float16", "--budget-ms", "1", "--no-progress",
                                       "--quantization", "auto", "-o", str(out)])
    assert run.exit_code == 0, run.output
    table = read_table(out)
    assert {"npu.weight_quant_int8", "npu.weight_quant_int4", "npu.matmul"} <= set(table.rows["primitive"])
    assert not [p for p in table.meta.get("pruned", []) if p.get("primitive", "").startswith("npu.weight_quant")]
    model = CostModel(table)
    assert {"float", "int8", "int4"} <= {weight_format_of(p) for p in model.curves("gemm", 960, 576, "float16")}
