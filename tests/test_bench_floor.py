"""`xytune bench floor`: the bytes a batch-1 decode step reads, its floor, and the figures printed side by side."""

from __future__ import annotations

import json

import pytest
from conftest import require_default_model
from typer.testing import CliRunner

from xytune.bench.floor import bytes_read_at_m1, format_at_m1
from xytune.cli import app
from xytune.runtime.llm import LLM, model_linears


def test_the_bytes_read_are_each_weight_in_the_format_it_runs_at_m1():
    require_default_model()
    float32 = LLM(dtype="float32", kv_cache_gb=0.05)
    int4 = LLM(dtype="float32", kv_cache_gb=0.05, quantization="int4")
    model = float32.model
    small = model.embed.shape[1] * 4 + sum(layer.ln1.numel() * 4 + layer.ln2.numel() * 4 for layer in model.layers)
    assert bytes_read_at_m1(float32) == float32.weight_bytes["float"] + small
    assert {format_at_m1(lin) for lin in model_linears(int4.model)} == {"int4", "int8"}  # lm_head: Q8_0 in the file
    assert bytes_read_at_m1(int4) == int4.weight_bytes["int4"] + int4.weight_bytes["int8"] + small
    assert bytes_read_at_m1(int4) < bytes_read_at_m1(float32) / 4.5  # half a byte a weight, a byte for lm_head


def test_bench_floor_prints_and_writes_every_format_side_by_side(tmp_path):
    require_default_model()
    out = tmp_path / "floor.json"
    run = CliRunner().invoke(app, ["bench", "floor", "--dtype", "float32", "--quantization", "none,int8",
                                   "--steps", "4", "--repeats", "1", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "copy bandwidth" in run.output and "goal: a step within 1.3x" in run.output
    results = json.loads(out.read_text())
    assert [r["quantization"] for r in results["rows"]] == ["none", "int8"]
    for r in results["rows"]:
        assert r["floor_s"] == pytest.approx(r["bytes_read"] / results["copy_bytes_per_s"])
        assert r["step_over_floor"] == pytest.approx(r["step_s"] / r["floor_s"])
        assert 0 < r["gemms_s"] < r["step_s"]  # the weight GEMMs are part of the step
    assert results["rows"][1]["bytes_read"] < results["rows"][0]["bytes_read"] / 3


@pytest.mark.parametrize("args,message", [(["--quantization", "int3"], "--quantization must be a comma list"),
                                          (["--steps", "1"], "--steps >= 4"),
                                          (["--profile", "missing.parquet"], "no such file")])
def test_bench_floor_refuses_bad_input_in_one_line(args, message):
    run = CliRunner().invoke(app, ["bench", "floor", *args])
    assert run.exit_code == 2 and message in run.stderr, run.output
    assert len(run.stderr.strip().splitlines()) == 1
