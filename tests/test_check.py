"""`xytune check`: every check of a CPU passes, a failing check fails the run, a missing device is exit 2."""

from __future__ import annotations

import json

import pytest
from test_cli import xytune
from typer.testing import CliRunner

import xytune.check as check
from xytune.cli import app
from xytune.profiler.devices import get_device
from xytune.profiler.table import read_table


def test_check_on_cpu_passes_and_keeps_its_profile(tmp_path):
    table = tmp_path / "check.parquet"
    run = xytune("check", "--device", "cpu", "--profile-max-tokens", "16", "--tokens", "4", "--json", "-o", table,
                 check=0)
    results = {r["name"]: r for r in json.loads(run.stdout)["checks"]}
    assert {r["status"] for r in results.values()} <= {"pass", "skip"}
    assert results["triton gemm"]["status"] == "skip"  # a CPU has no Triton GEMM: skipped, not failed
    assert {"probe", "meta-attention torch float32", "profile", "smooth-gemm float32", "generate"} <= set(results)
    assert "4 tokens" in results["generate"]["detail"]
    rows = read_table(table).rows  # the short profile is a real table
    assert rows.loc[rows["op"] == "gemm", "m"].max() == 16


def test_a_kernel_off_its_reference_fails_that_check_and_the_run(monkeypatch, tmp_path):
    """No error is small enough for a zero allowance: the attention and SmoothGEMM checks of float32 fail,
    the others still run, and the command exits 1."""
    monkeypatch.setitem(check.TOLERANCE, "float32", 0.0)
    run = CliRunner().invoke(app, ["check", "--profile-max-tokens", "4", "--tokens", "2", "--json"])
    assert run.exit_code == 1, run.output
    results = {r["name"]: r for r in json.loads(run.output)["checks"]}
    assert results["meta-attention torch float32"]["status"] == "fail"
    assert "allowed 0e+00" in results["meta-attention torch float32"]["detail"]
    assert results["profile"]["status"] == "pass" and "generate" in results


@pytest.mark.parametrize("device,needle", [("cuda", "CUDA"), ("npu", "torch_npu"), ("tpu", "Unknown device")])
def test_a_device_that_is_not_here_is_one_line_and_exit_2(device, needle):
    run = xytune("check", "--device", device, check=2)
    assert needle in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_the_float64_reference_agrees_with_the_torch_backend_and_catches_a_wrong_mask():
    """The reference the check holds kernels to: a kernel that ignores the tree mask is caught."""
    requests, q, k, v = check.mixed_step(6, 2, 32, seed=3)
    status, _ = check._meta_attention(get_device("cpu"), "torch", "float32")
    assert status == check.PASS
    causal = [check.AttnRequest(r.q_len, r.context_len, r.key_slots, check.CAUSAL) if r.mask == check.TREE else r
              for r in requests]
    right = check.attention_float64(requests, q, k, v, 0.2)
    wrong = check.attention_float64(causal, q, k, v, 0.2)
    assert check.relative_error(wrong, right) > 1e-2
