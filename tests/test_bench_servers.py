"""`xytune bench servers`: real servers per variant, one trace, capacities and ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REFERENCE_TABLE, require_default_model

from xytune.bench.servers import parse_variant

REFERENCE = REFERENCE_TABLE  # a table from some machine: read with --allow-mismatch


def test_variants_parse_and_bad_ones_are_refused():
    v = parse_variant('ngram=--policy chunked --speculative ngram')
    assert v.name == "ngram" and v.args == ["--policy", "chunked", "--speculative", "ngram"]
    assert parse_variant("plain=").args == []
    with pytest.raises(ValueError, match="NAME="):
        parse_variant("--policy xy")


def test_two_variants_side_by_side(tmp_path):
    require_default_model()
    out = tmp_path / "servers.json"
    run = subprocess.run(
        [sys.executable, "-m", "xytune.cli", "bench", "servers", "--variant", "xy=--policy xy",
         "--variant", "chunked=--policy chunked", "--serve-args",
         f"--dtype float32 --kv-cache-gb 0.1 --profile {REFERENCE} --allow-mismatch", "--sweep-rates", "inf",
         "--num-prompts", "3", "--input-len", "24", "--output-len", "6", "--slo-ttft-ms", "60000",
         "--slo-tpot-ms", "60000", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [v["name"] for v in result["variants"]] == ["xy", "chunked"]
    for v in result["variants"]:
        assert v["rows"][0]["completed"] == 3 and v["rows"][0]["slo_attainment"] == 1.0
        assert "xytune_cost_model_step_error_ratio" in v["server"]
    assert result["capacity"] == {"xy": float("inf"), "chunked": float("inf")}
    assert "capacity xy / chunked" not in run.stdout  # no ratio of two unbounded capacities


def test_bad_variant_exits_2():
    run = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "servers", "--variant", "oops"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "NAME=" in run.stderr


def test_policies_side_by_side_on_the_engine_alone(tmp_path):
    """`bench engines`: the same trace in process, every request finished, timings from the engine's clock."""
    require_default_model()
    out = tmp_path / "engines.json"
    run = subprocess.run(
        [sys.executable, "-m", "xytune.cli", "bench", "engines", "--policies", "xy,prefill-first,chunked@32",
         "--profile", str(REFERENCE), "--allow-mismatch", "--dtype", "float32", "--sweep-rates", "inf,20",
         "--num-prompts", "4", "--input-len", "24", "--output-len", "6", "--slo-ttft-ms", "60000",
         "--slo-tpot-ms", "60000", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [v["name"] for v in result["variants"]] == ["xy", "prefill-first", "chunked@32"]
    assert result["repeats"] == 2 and result["variants"][2]["args"] == ["--policy", "chunked",
                                                                       "--max-num-batched-tokens", "32"]
    assert result["capacity"] == {"xy": float("inf"), "prefill-first": float("inf"),
                                  "chunked@32": float("inf")}  # met even all at once
    for v in result["variants"]:
        for row in v["rows"]:
            assert row["completed"] == 8 and row["slo_attainment"] == 1.0  # two repeats of 4, pooled
            assert 0 < row["median_ttft_ms"] <= row["p99_ttft_ms"] < 60000
            assert row["median_tpot_ms"] > 0
            steps = row["steps"]  # how the policy cut the work: prompts of ~24 tokens, 8 of them
            assert steps["steps"] >= steps["steps_with_prefill"] >= 1 and 0 < steps["busy_s"] < row["duration"]
            assert 12 <= steps["prefill_tokens_per_prefill_step"] <= (32 if v["name"] == "chunked@32" else 8 * 36)
        assert v["server"]["xytune_cost_model_step_error_ratio"] is not None
    bad = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "engines", "--policies", "xy,fastest",
                          "--profile", str(REFERENCE)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--policies" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "engines", "--repeats", "0",
                          "--profile", str(REFERENCE)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--repeats" in bad.stderr and "Traceback" not in bad.stderr


def test_an_external_server_must_take_its_port_and_one_that_dies_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from xytune.bench.servers import parse_variant
    from xytune.cli import app

    with pytest.raises(ValueError, match=r"\{port\}"):
        parse_variant("llama.cpp=llama-server -m model.gguf", external=True)
    v = parse_variant("llama.cpp=llama-server -m model.gguf --port {port} -t 2", external=True)
    assert v.external and v.args[-3:] == ["{port}", "-t", "2"]
    dies = f"dead={sys.executable} -c \"import sys; sys.exit('cannot open model.gguf on port {{port}}')\""
    run = CliRunner().invoke(app, ["bench", "servers", "--external", dies, "--num-prompts", "2", "--sweep-rates", "1"])
    assert run.exit_code == 2, run.output
    assert "server 'dead' exited: cannot open model.gguf on port" in run.stderr and "Traceback" not in run.stderr
