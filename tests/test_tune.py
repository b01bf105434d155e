"""`xytune tune`, `xytune calibrate-steps` and `bench sim-vs-real` end to end, and the search on its own."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from conftest import PROFILES, REFERENCE_TABLE, require_default_model
from typer.testing import CliRunner

from xytune.bench import sim_vs_real
from xytune.bench.serve import synthetic_prompts
from xytune.bench.sim_vs_real import compare
from xytune.cli import app
from xytune.export import TuneSettings
from xytune.profiler.cost_model import CostModel
from xytune.profiler.devices import get_device
from xytune.profiler.table import read_table, write_table
from xytune.runtime.engine import step_calibration
from xytune.runtime.engine.engine import StepStats
from xytune.runtime.engine.step_calibration import (
    SPEED_PROBE_GRID,
    STEP_KINDS,
    machine_speed,
    speed_ratio,
    step_features,
)
from xytune.runtime.engine.step_predictor import STEP_TERMS
from xytune.tune import ATTAINMENT, GRID_LIMIT, Candidate, SearchSpace, Simulator, Workload, tune

FITTED = PROFILES / "cpu-intel-xeon-model167-amx-2c-smollm2-135m.parquet"  # carries an engine-step fit
SLOS = ["--slo-ttft-ms", "2000", "--slo-tpot-ms", "120"]
SMALL = ["--num-prompts", "30", "--sweep-rates", "1,2,4,8", "--trials", "8"]


def xytune(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def made_here(src, dst):
    """``src``'s rows under this machine's fingerprint: a table the engine loads here without a mismatch."""
    table = read_table(src)
    table.meta["fingerprint"] = get_device("cpu").fingerprint()
    write_table(dst, table)
    return dst


def test_tune_recommends_settings_that_export_reads(tmp_path):
    out, png, yml = tmp_path / "tune.json", tmp_path / "tune.png", tmp_path / "vllm.yaml"
    run = xytune("tune", "--profile", FITTED, *SLOS, *SMALL, "--policies", "chunked,xy", "--json", out, "--plot", png)
    assert run.exit_code == 0, run.output
    assert "Recommended" in run.stdout and "serve with: xytune serve --policy" in run.stdout
    settings = TuneSettings.read(out)
    assert settings.policy in ("chunked", "xy") and settings.max_num_batched_tokens >= settings.max_num_seqs
    evidence = settings.evidence
    assert evidence["met"] and "engine-step fit" in evidence["step_model"]
    best = evidence["candidates"][0]
    assert best["capacity"] == max(c["capacity"] or 0 for c in evidence["candidates"])
    assert best["setting"]["max_num_seqs"] == settings.max_num_seqs
    met_rates = [r["request_rate"] for r in best["rows"] if r["slo_attainment"] >= ATTAINMENT]
    assert best["capacity"] == max(met_rates)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = xytune("export", "--profile", FITTED, "--from-tune", out, "-o", yml)
    assert run.exit_code == 0, run.output
    config = yaml.safe_load(yml.read_text())
    assert config["max-num-seqs"] == settings.max_num_seqs
    assert config["max-num-batched-tokens"] == settings.max_num_batched_tokens


def test_an_slo_no_setting_meets_says_so_and_shows_the_closest(tmp_path):
    run = xytune("tune", "--profile", FITTED, "--slo-ttft-ms", "2000", "--slo-tpot-ms", "1", *SMALL,
                 "--policies", "chunked", "--json", tmp_path / "t.json")
    assert run.exit_code == 1, run.output
    assert "No setting meets the SLOs" in run.stdout and "the closest" in run.stdout
    assert "Traceback" not in run.output
    assert json.loads((tmp_path / "t.json").read_text())["evidence"]["met"] is False


def test_a_table_without_an_engine_step_fit_is_tuned_with_a_warning():
    run = xytune("tune", "--profile", REFERENCE_TABLE, *SLOS, *SMALL, "--policies", "chunked")
    assert run.exit_code == 0, run.output
    assert "no engine-step fit" in run.stdout and "GEMM and attention rows only" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--profile", "missing.parquet", *SLOS], "does not exist"),
    (["--profile", FITTED, "--slo-ttft-ms", "0", "--slo-tpot-ms", "120", *SMALL], "must be positive"),
    (["--profile", FITTED, *SLOS, "--policies", "fifo"], "--policies"),
    (["--profile", FITTED, *SLOS, "--acceptance-rate", "1.5"], "--acceptance-rate"),
    (["--profile", FITTED, *SLOS, "--sweep-rates", "1,x"], "--sweep-rates"),
    (["--profile", FITTED, *SLOS, "--workload", "missing.jsonl"], "missing.jsonl"),
    (["--profile", FITTED, *SLOS, "--dtype", "float16"], "no float16 rows"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    run = xytune("tune", *args)
    assert run.exit_code == 2, run.output
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_the_search_space_follows_the_table_and_optuna_takes_the_large_ones():
    model = CostModel(read_table(FITTED), formats=("float",))
    space = SearchSpace.for_table(model, 120.0, (0, 2, 4))
    candidates = space.candidates()
    assert len(candidates) > GRID_LIMIT
    assert all(c.max_num_batched_tokens >= c.max_num_seqs for c in candidates)
    assert max(c.max_num_batched_tokens for c in candidates) <= max(model.meta["sweep"]["buckets"])
    assert {c.tbt_slo_ms for c in candidates if c.policy == "xy"} == {None, 60.0}
    sim = Simulator(model, "bfloat16")
    work = Workload(synthetic_prompts(20, 128, 16, 49152, 0), acceptance_rate=0.7)
    runs = [tune(sim, work, 2000, 120, space, rates=[1.0, 4.0, 16.0], trials=6, seed=3) for _ in range(2)]
    assert runs[0].trials <= 6 and [s.candidate for s in runs[0].ranked] == [s.candidate for s in runs[1].ranked]
    assert Candidate("chunked", 2048, 256) in [s.candidate for s in runs[0].ranked]  # vLLM's defaults go first


def test_a_machine_measured_slower_stretches_each_kind_of_simulated_step_by_its_factor():
    model = CostModel(read_table(FITTED), formats=("float",))
    sim = Simulator(model, "bfloat16")
    work = Workload(synthetic_prompts(12, 128, 16, 49152, 0))
    chunked = Candidate("chunked", 512, 256)
    inf = float("inf")  # everything arrives at once: the same steps whatever they take, so every time scales
    base = sim.sweep(chunked, work, [inf], 2000, 120)[0]
    slow = sim.sweep(chunked, work, [inf], 2000, 120, speeds={inf: {"decode": 1.5, "prefill": 1.5}})[0]
    assert slow["steps"]["steps"] == base["steps"]["steps"]
    assert slow["steps"]["busy_s"] == pytest.approx(1.5 * base["steps"]["busy_s"])
    for metric in ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms"):
        assert slow[metric] == pytest.approx(1.5 * base[metric])
    decode_slow = sim.sweep(chunked, work, [inf], 2000, 120, speeds={inf: {"decode": 2.0, "prefill": 1.0}})[0]
    steps, base_steps = decode_slow["steps"], base["steps"]
    assert steps["decode_only_step_ms_p50"] == pytest.approx(2 * base_steps["decode_only_step_ms_p50"])
    assert steps["prefill_step_ms_p50"] == pytest.approx(base_steps["prefill_step_ms_p50"])
    assert sim.sweep(chunked, work, [inf], 2000, 120)[0]["median_ttft_ms"] == pytest.approx(base["median_ttft_ms"])


def test_speed_ratio_is_the_median_of_measured_over_the_fit_per_step_kind():
    fit = Simulator(CostModel(read_table(FITTED), formats=("float",)), "bfloat16").truth

    def step(prefill, decode):
        n = prefill + decode
        return StepStats(num_tokens=n, num_prefill_tokens=prefill, num_decode_tokens=decode, seconds=0.0,
                         num_logit_rows=decode + 1, attention_pairs=float(n * 64))

    steps = [step(0, 1), step(0, 8), step(0, 4), step(64, 0), step(256, 4)]
    fitted = [float(step_features(fit, s) @ fit.coef) for s in steps]
    assert speed_ratio([(s, 2.0 * f) for s, f in zip(steps, fitted)], fit) == \
        {"decode": pytest.approx(2.0), "prefill": pytest.approx(2.0)}
    measured = [0.5, 0.7, 3.0, 1.1, 1.3]
    assert speed_ratio([(s, m * f) for s, m, f in zip(steps, measured, fitted)], fit) == \
        {"decode": pytest.approx(0.7), "prefill": pytest.approx(1.2)}
    decodes_only = [(s, m * f) for s, m, f in zip(steps[:3], measured, fitted)]
    assert speed_ratio(decodes_only, fit) == {"decode": pytest.approx(0.7), "prefill": pytest.approx(0.7)}


def test_machine_speed_is_the_probe_over_its_reading_right_after_the_fit(monkeypatch):
    """The fit's own error on the probe's few step shapes is not drift: a probe reading what it read at fit time
    says the machine runs at the fit's speed."""
    fit = Simulator(CostModel(read_table(FITTED), formats=("float",)), "bfloat16").truth
    read = {"decode": 0.99, "prefill": 0.8}
    monkeypatch.setattr(step_calibration, "probe_steps", lambda engine, fit, seed=None: dict(read))
    fit.probe_at_fit = None  # a fit made before the reading was stored: taken as read
    assert machine_speed(None, fit) == read
    fit.probe_at_fit = {"decode": 0.9, "prefill": 0.8}
    assert machine_speed(None, fit) == {"decode": pytest.approx(1.1), "prefill": pytest.approx(1.0)}


def test_compare_reports_errors_below_the_knee_and_capacity_in_rate_steps():
    def result(rows, cap):
        return {"rates": [1.0, 2.0, 4.0], "capacity": {"v": cap}, "variants": [{"name": "v", "rows": rows}]}

    def row(rate, att, ttft):
        return {"request_rate": rate, "slo_attainment": att, "median_ttft_ms": ttft, "p90_ttft_ms": ttft,
                "median_tpot_ms": 50.0, "p90_tpot_ms": 60.0}

    real = result([row(1, 1.0, 100.0), row(2, 0.95, 200.0), row(4, 0.3, 900.0)], 2.0)
    sim = result([row(1, 1.0, 110.0), row(2, 1.0, 180.0), row(4, 0.9, 500.0)], 4.0)
    v = compare(real, sim)["v"]
    assert v["rows"][0]["errors"]["median_ttft_ms"] == pytest.approx(0.10)
    assert v["rows"][1]["errors"]["p90_ttft_ms"] == pytest.approx(-0.10)
    assert v["max_error_below_knee"] == pytest.approx(0.10)  # the rate past the knee does not count
    assert v["capacity_rate_steps"] == 1 and v["capacity_goal_met"] and v["latency_goal_met"]
    assert v["max_real_spread_below_knee"] is None and v["rows"][0]["real_spread"] == {}  # one run: no spread

    # two real runs of each rate: their own distance apart, over the pooled figure, below the knee only
    real["variants"][0]["rows"][0]["repeats"] = [row(1, 1.0, 90.0), row(1, 1.0, 115.0)]
    real["variants"][0]["rows"][2]["repeats"] = [row(4, 0.2, 500.0), row(4, 0.4, 1300.0)]
    v = compare(real, sim)["v"]
    assert v["rows"][0]["real_spread"]["median_ttft_ms"] == pytest.approx(0.25)
    assert v["rows"][0]["real_spread"]["median_tpot_ms"] == 0.0
    assert v["max_real_spread_below_knee"] == pytest.approx(0.25)


def test_calibrate_steps_stores_a_fit_the_engine_starts_from(tmp_path, monkeypatch):
    require_default_model()
    # the path, not a good fit: --quick's grid shrunk to the speed probe's, two light loads of four steps
    monkeypatch.setattr(step_calibration, "QUICK_GRID", SPEED_PROBE_GRID)
    monkeypatch.setattr(step_calibration, "CALIBRATION_LOADS", ((1, 512), (4, 512)))
    monkeypatch.setattr(step_calibration, "PROBES_AT_FIT", 1)
    table = made_here(FITTED, tmp_path / "here.parquet")
    before = read_table(table).rows
    run = xytune("calibrate-steps", "--profile", table, "--dtypes", "float32", "--steps-per-load", "4", "--quick")
    assert run.exit_code == 0, run.output
    after = read_table(table)
    fit = after.meta["engine_steps"]["float32"]
    assert set(fit["coef"]) == set(STEP_TERMS) and fit["steps"] >= 12 + 2 * 4 and fit["median_ape"] < 1.0
    assert fit["grid"] == "quick"
    assert set(fit["probe_at_fit"]) == set(STEP_KINDS) and all(0.05 < r < 20 for r in fit["probe_at_fit"].values())
    assert after.meta["engine_steps"]["bfloat16"] == read_table(FITTED).meta["engine_steps"]["bfloat16"]  # kept
    assert after.rows[before.columns].equals(before)  # the measurements are untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from xytune.runtime.llm import LLM

        llm = LLM(dtype="float32", profile=str(table), kv_cache_gb=0.25)
    assert list(llm.engine.predictor.coef) == [fit["coef"][t] for t in STEP_TERMS]
    assert llm.engine.predictor.probe_at_fit == fit["probe_at_fit"]  # what later probes are divided by


@pytest.mark.parametrize("change", [{"isa": ["sse2"], "cpu_model": "family 0 model 0"},  # another machine
                                    {"cpu_model": None}])  # a table from before the fingerprint held the model
def test_calibrate_steps_refuses_a_table_it_cannot_match_to_this_machine(tmp_path, change):
    """Found by hand: the model-207 table, whose fingerprint predates cpu_model, took this machine's fit."""
    table = read_table(made_here(FITTED, tmp_path / "here.parquet"))
    fp = {**table.meta["fingerprint"], **change}
    table.meta["fingerprint"] = {k: v for k, v in fp.items() if v is not None}
    write_table(tmp_path / "other.parquet", table)
    run = xytune("calibrate-steps", "--profile", tmp_path / "other.parquet", "--dtypes", "float32")
    assert run.exit_code == 2, run.output
    assert "different device" in run.stderr and "cpu_model" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert read_table(tmp_path / "other.parquet").meta["engine_steps"] == table.meta["engine_steps"]  # untouched


def test_sim_vs_real_runs_one_trace_through_both(tmp_path):
    require_default_model()
    table = made_here(FITTED, tmp_path / "here.parquet")
    out = tmp_path / "svr.json"
    run = xytune("bench", "sim-vs-real", "--profile", table, "--policies", "chunked", "--num-prompts", "6",
                 "--input-len", "32", "--output-len", "6", "--sweep-rates", "2,8", "--dtype", "float32",
                 "--repeats", "2", "--json", out)
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    real, sim = result["real"]["variants"][0]["rows"], result["simulated"]["variants"][0]["rows"]
    assert [r["completed"] for r in real] == [r["completed"] for r in sim] == [12, 12]  # two repeats pooled
    assert [r["total_input_tokens"] for r in real] == [r["total_input_tokens"] for r in sim]
    assert [[rep["completed"] for rep in r["repeats"]] for r in real] == [[6, 6], [6, 6]]  # and each on its own
    assert "simulator against the real engine" in run.stdout and "capacity real" in run.stdout
    # the machine's speed, probed before the first of the four runs and after each, and the trace simulated
    # again at it: every run lies between two probes, each one's reading the mean of the two
    runs = [rep for r in real for rep in r["repeats"]]
    for run_, next_run in zip(runs, runs[1:]):
        assert next_run["machine_speed_before"] == run_["machine_speed_after"]
    for run_ in runs:
        before, after = run_["machine_speed_before"], run_["machine_speed_after"]
        assert all(0.05 < probe[kind] < 20 for probe in (before, after) for kind in ("decode", "prefill"))
        assert run_["machine_speed"] == {k: pytest.approx((before[k] + after[k]) / 2) for k in before}
    for r in real:
        speeds = [rep["machine_speed"] for rep in r["repeats"]]
        assert r["machine_speed"] == {k: pytest.approx((speeds[0][k] + speeds[1][k]) / 2) for k in speeds[0]}
    at_speed = result["errors_at_measured_speed"]["chunked"]
    assert [r["machine_speed"] for r in at_speed["rows"]] == [r["machine_speed"] for r in real]
    sim_at = result["simulated_at_measured_speed"]["variants"][0]["rows"]
    assert [r["completed"] for r in sim_at] == [12, 12]
    assert "simulated at the machine's measured speed" in run.stdout
    assert result["fresh_fit"] is None  # simulated from the table's own fit


def test_sim_vs_real_can_first_fit_steps_on_this_machine_now(tmp_path, monkeypatch):
    require_default_model()
    # the path, not a good fit: a small grid (the speed probe's), two light loads, four steps each
    monkeypatch.setattr(step_calibration, "CALIBRATION_LOADS", ((1, 512), (4, 512)))
    monkeypatch.setattr(step_calibration, "PROBES_AT_FIT", 1)
    table = made_here(FITTED, tmp_path / "here.parquet")
    before = read_table(table).meta["engine_steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table's own notes on this machine
        sim = Simulator(CostModel.load(table).for_formats(("float",)), "float32")
    prompts = synthetic_prompts(4, 32, 4, 49152, 0)
    kwargs = dict(dtype="float32", profile=str(table), max_num_batched_tokens=512, kv_cache_gb=0.25,
                  enable_prefix_caching=False)
    result = sim_vs_real.run({"chunked": {"policy": "chunked"}}, kwargs, sim, prompts, [4.0], 0, 2000, 120,
                             probe_speed=False, recalibrate=SPEED_PROBE_GRID, steps_per_load=4)
    fit = result["fresh_fit"]
    assert set(fit["coef"]) == set(STEP_TERMS) and fit["steps"] >= 2 * 4
    assert fit["coef"] != before["float32"]["coef"]
    assert f"engine-step fit ({fit['steps']} steps" in result["simulated"]["step_model"]
    assert result["simulated"]["variants"][0]["rows"][0]["completed"] == 4
    assert "errors_at_measured_speed" not in result
    assert read_table(table).meta["engine_steps"] == before  # the table file is left as it was
    bad = xytune("bench", "sim-vs-real", "--profile", table, "--recalibrate", "sometimes")
    assert bad.exit_code == 2 and "--recalibrate must be one of none, quick, full" in bad.stderr
    bad = xytune("bench", "sim-vs-real", "--profile", table, "--recalibrate", "quick", "--steps-per-load", "2")
    assert bad.exit_code == 2 and "--steps-per-load must be at least 4" in bad.stderr
