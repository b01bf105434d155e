"""`xytune export`: the vLLM / vllm-ascend config a cost table supports, every key one those servers accept."""

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import REFERENCE_TABLE, linear_latency, synthetic_cost_model, synthetic_rows
from typer.testing import CliRunner

from xytune.cli import app
from xytune.export import Source, capture_sizes, plan_export
from xytune.profiler.cost_model import CostModel
from xytune.profiler.geometry import PRESETS
from xytune.profiler.table import read_table

# What the servers accept, and where it was read. `vllm serve --config F.yaml` takes the long option names
# (vLLM docs/configuration/serve_args.md, "Configuration file"); EngineArgs fields of vLLM v0.13.0:
# vllm/config/scheduler.py (max_num_batched_tokens, max_num_seqs, long_prefill_token_threshold,
# enable_chunked_prefill), --compilation-config, --speculative-config, --additional-config (a plugin's dict)
VLLM_OPTIONS = {"max-num-batched-tokens", "max-num-seqs", "long-prefill-token-threshold", "enable-chunked-prefill",
                "compilation-config", "speculative-config", "additional-config"}
COMPILATION_CONFIG = {"cudagraph_capture_sizes"}  # vLLM v0.13.0 vllm/config/compilation.py CompilationConfig
# vLLM v0.13.0 vllm/config/speculative.py SpeculativeConfig (method "ngram": docs/features/speculative_decoding)
SPECULATIVE_CONFIG = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
# vllm-ascend v0.23.0 docs/source/user_guide/configuration/additional_config.md (weight_nz_mode, int, the old
# VLLM_ASCEND_ENABLE_NZ of vllm_ascend/envs.py); its AscendConfig forbids unknown keys, so nothing else goes in.
# Graph sizes: ACLGraph takes vLLM's compilation-config cudagraph_capture_sizes (feature_guide/graph_mode.md);
# torchair_graph_config.graph_batch_sizes (v0.9-v0.11) is gone.
ASCEND_ADDITIONAL_CONFIG = {"weight_nz_mode"}
NESTED = {"compilation-config": COMPILATION_CONFIG, "speculative-config": SPECULATIVE_CONFIG,
          "additional-config": ASCEND_ADDITIONAL_CONFIG}


def run(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def accepted(config: dict) -> dict:
    """``config`` (a parsed --config YAML) with its JSON-object options parsed; asserts every key is accepted."""
    assert set(config) <= VLLM_OPTIONS, set(config) - VLLM_OPTIONS
    parsed = dict(config)
    for option, keys in NESTED.items():
        if option in config:
            parsed[option] = json.loads(config[option])
            assert set(parsed[option]) <= keys, (option, set(parsed[option]) - keys)
    return parsed


def cited_rows(text: str) -> list[tuple[int, str]]:
    """(M, "target primitive median") of every row the YAML's comments cite."""
    cites, m = [], None
    for line in text.splitlines():
        if (hit := re.match(r"#   M=(\d+):(.*)", line)) is not None:
            m, items = int(hit.group(1)), hit.group(2)
        elif m is not None and line.startswith("#      "):  # a group's continuation line
            items = line[1:]
        else:
            m = None
            continue
        cites += [(m, item.strip()) for item in items.split(";") if item.strip()]
    return cites


def test_vllm_yaml_from_the_reference_table_end_to_end(tmp_path):
    out = tmp_path / "vllm.yaml"
    proc = subprocess.run([sys.executable, "-m", "xytune.cli", "export", "--profile", str(REFERENCE_TABLE),
                           "--format", "vllm", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "from the table and --slo-tpot-ms 100" in proc.stdout and f"--config {out}" in proc.stdout
    text = out.read_text()
    config = accepted(yaml.safe_load(text))
    seqs, tokens = config["max-num-seqs"], config["max-num-batched-tokens"]
    sizes = config["compilation-config"]["cudagraph_capture_sizes"]
    assert sizes == sorted(set(sizes)) and sizes[-1] == seqs <= tokens

    # the limits are the largest measured M within the 100 ms SLO: the next bucket breaks it
    cm = CostModel(read_table(REFERENCE_TABLE))
    dtype = cm.fastest_dtype()
    step = lambda m, logits: cm.predict_step(m, num_logits=logits, dtype=dtype)  # noqa: E731
    buckets = sorted(set(cm.table.rows.loc[cm.table.rows["op"] == "gemm", "m"]))
    assert step(tokens, seqs) <= 0.1 < step(buckets[buckets.index(tokens) + 1], seqs)
    assert step(seqs, seqs) <= 0.1
    assert sizes == capture_sizes(cm, dtype, seqs)

    # every cited row is a row of the table, with its median
    rows = cm.table.rows[(cm.table.rows["op"] == "gemm") & (cm.table.rows["dtype"] == dtype)]
    best = rows.groupby(["target", "m", "primitive"])["median_s"].min()
    cites = cited_rows(text)
    assert {m for m, _ in cites} >= set(sizes) | {tokens}
    for m, cite in cites:
        target, primitive = cite.split()[:2]
        assert cite == str(Source(target, m, primitive, float(best[(target, m, primitive)]))), cite


def test_from_tune_settings_to_json_and_sidecar(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"policy": "xy", "max_num_batched_tokens": 512, "max_num_seqs": 100,
                                    "long_prefill_token_threshold": 256, "num_speculative_tokens": 3,
                                    "why": "met the SLOs at the highest rate"}))
    out = tmp_path / "engine.json"
    result = run("--profile", REFERENCE_TABLE, "--format", "json", "--from-tune", settings, "-o", out)
    assert result.exit_code == 0, result.output
    kwargs = json.loads(out.read_text())
    as_options = {k.replace("_", "-"): json.dumps(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    accepted(as_options)
    assert kwargs["max_num_batched_tokens"] == 512 and kwargs["max_num_seqs"] == 100
    assert kwargs["long_prefill_token_threshold"] == 256 and kwargs["enable_chunked_prefill"] is True
    assert kwargs["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
                                            "prompt_lookup_min": 2}
    assert kwargs["compilation_config"]["cudagraph_capture_sizes"][-1] == 100  # up to max_num_seqs, not beyond
    side = json.loads((tmp_path / "engine.sources.json").read_text())
    assert side["origin"] == "the --from-tune settings: met the SLOs at the highest rate"
    capture_rows = side["settings"]["cudagraph_capture_sizes"]["rows"]
    assert {r["m"] for r in capture_rows} >= set(kwargs["compilation_config"]["cudagraph_capture_sizes"]) - {100}
    assert all(r["median_s"] > 0 for r in capture_rows)


def staircase(tile):
    """Each GEMM costs a whole tile of M at a time: flat up to a multiple of ``tile``, a jump just after it."""
    return lambda prim, m, n, k: n * k * 1e-12 * math.ceil(m / tile)


def test_capture_sizes_land_just_before_the_cost_jumps(tmp_path):
    cm = synthetic_cost_model(tmp_path / "t.parquet", synthetic_rows(PRESETS["smollm2-135m"], staircase(48),
                                                                    primitives=("tiled",), ms=range(1, 145)))
    assert capture_sizes(cm, "float32", 144) == [48, 96, 144]
    assert capture_sizes(cm, "float32", 130) == [48, 96, 130]  # the last size is the batch limit


def test_capture_sizes_bound_padding_on_a_ramp(tmp_path):
    """Costs linear in M (no jump): every batch pads to a size at most 10% dearer than itself."""
    rows = synthetic_rows(PRESETS["smollm2-135m"], linear_latency, ms=range(1, 257))
    cm = synthetic_cost_model(tmp_path / "t.parquet", rows)
    sizes = capture_sizes(cm, "float32", 256)
    step = lambda m: cm.predict_step(m, dtype="float32")  # noqa: E731
    for b in range(1, 257):
        assert step(min(s for s in sizes if s >= b)) <= 1.1 * step(b), b
    assert 2 < len(sizes) < 64 and sizes[-1] == 256  # neither one graph for all nor one per batch size


def npu_table(path, nz_faster_from):
    """A table of npu.matmul rows with ND and NZ weights; NZ is faster from M=``nz_faster_from`` on."""
    def rows(layout):
        def latency(prim, m, n, k):
            slower = (layout == "NZ") == (m < nz_faster_from)
            return n * k * 1e-12 * (m + 8) * (1.2 if slower else 1.0)
        r = synthetic_rows(PRESETS["smollm2-135m"], latency, primitives=("npu.matmul",))
        return r.assign(config=json.dumps({"weight_format": layout}, separators=(",", ":")))
    return synthetic_cost_model(path, pd.concat([rows("ND"), rows("NZ")], ignore_index=True))


@pytest.mark.parametrize("nz_faster_from,mode", [(4, 2), (64, 0)])
def test_vllm_ascend_weight_nz_switch_follows_the_table(tmp_path, nz_faster_from, mode):
    table = tmp_path / "npu.parquet"
    npu_table(table, nz_faster_from)
    out = tmp_path / "ascend.yaml"
    result = run("--profile", table, "--format", "vllm-ascend", "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    config = accepted(yaml.safe_load(text))
    assert config["additional-config"] == {"weight_nz_mode": mode}
    wins = 7 if mode else 3  # of the 9 measured M per GEMM (1, 2, 4, ..., 256)
    assert f"faster than ND at {5 * wins} of 45 (GEMM, M) pairs" in text
    assert "qkv npu.matmul weight_format=NZ" in text  # the rows behind it are cited


def test_vllm_ascend_from_a_non_npu_table_leaves_nz_alone(tmp_path):
    out = tmp_path / "ascend.yaml"
    assert run("--profile", REFERENCE_TABLE, "--format", "vllm-ascend", "--slo-tpot-ms", "20", "-o", out).exit_code == 0
    text = out.read_text()
    assert "additional-config" not in accepted(yaml.safe_load(text))
    assert "weight_nz_mode: not set: the table has no npu.matmul ND/NZ rows" in text


def test_plan_limits_follow_the_slo(geometry, tmp_path):
    cm = synthetic_cost_model(tmp_path / "t.parquet", synthetic_rows(geometry, linear_latency))
    tight, loose = (plan_export(cm, "t", "float32", slo_tpot_ms=ms).settings for ms in (2.0, 20.0))
    assert tight["max_num_seqs"].value < loose["max_num_seqs"].value
    assert tight["max_num_batched_tokens"].value <= loose["max_num_batched_tokens"].value


@pytest.mark.parametrize("args,settings,message", [
    (["--profile", "missing.parquet"], None, "does not exist"),
    (["--profile", REFERENCE_TABLE, "--format", "sglang"], None, "--format must be one of vllm, vllm-ascend, json"),
    (["--profile", REFERENCE_TABLE], "{not json", "is not JSON"),
    (["--profile", REFERENCE_TABLE], '{"policy": "fifo", "max_num_batched_tokens": 8, "max_num_seqs": 4}',
     "policy must be one of"),
    (["--profile", REFERENCE_TABLE], '{"policy": "xy", "max_num_batched_tokens": 8, "max_num_seqs": 16}',
     "must be at least max_num_seqs"),
    (["--profile", REFERENCE_TABLE], '{"policy": "xy", "max_num_seqs": 16}', "at least policy"),
    (["--profile", REFERENCE_TABLE], '{"policy": "xy", "max_num_batched_tokens": 8, "max_num_seq": 4}',
     "at least policy"),
    (["--profile", REFERENCE_TABLE],
     '{"policy": "xy", "max_num_batched_tokens": 8, "max_num_seqs": 4, "max_num_seq": 4}',
     "unknown fields max_num_seq"),
    (["--profile", REFERENCE_TABLE, "--slo-tpot-ms", "0.001"], None, "no step fits --slo-tpot-ms 0.001"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, settings, message):
    if settings is not None:
        (tmp_path / "s.json").write_text(settings)
        args = [*args, "--from-tune", tmp_path / "s.json"]
    out = tmp_path / "out.yaml"
    result = run(*args, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
