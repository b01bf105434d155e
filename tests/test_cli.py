"""The CLI end to end, as a user runs it: real subprocesses, real files."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REFERENCE_TABLE, resampled

from xytune.profiler.devices import get_device
from xytune.profiler.probe import usable_primitives
from xytune.profiler.table import KEY_COLUMNS, CostTable, read_table, write_table

# the float-weight primitives that run on this machine (a default profile's)
PRIMS = len([p for p in usable_primitives("gemm", get_device("cpu"), "float32")[0] if p.weight_format == "float"])
REFERENCE = REFERENCE_TABLE  # a table from some machine: read with --allow-mismatch

SMALL = ["--buckets", "1,2,8", "--targets", "qkv,o", "--dtypes", "float32", "--budget-ms", "1", "--no-progress"]


def xytune(*args, check=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "xytune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def test_profile_show_plot_compare_end_to_end(tmp_path):
    table = tmp_path / "cpu.parquet"
    xytune("profile", "--device", "cpu", "--threads", "1", "-o", table, *SMALL, check=0)
    rows = read_table(table).rows
    assert len(rows) == 2 * 3 * PRIMS and not rows.duplicated(KEY_COLUMNS).any()

    shown = json.loads(xytune("show", table, "--format", "json", check=0).stdout)
    assert shown["complete"] and shown["counts"]["rows"] == 2 * 3 * PRIMS
    assert shown["fingerprint"]["threads"] == 1
    assert {(b["target"], b["m"]) for b in shown["best"]} == {(t, m) for t in ("qkv", "o") for m in (1, 2, 8)}
    text = xytune("show", table, check=0).stdout
    assert "Best per bucket" in text
    fp = shown["fingerprint"]
    if fp["cpu_model"] or fp["cpu_caches"]:  # what this machine's kernel reports, shown as the table holds it
        assert f"CPU: {'; '.join(x for x in (fp['cpu_model'], fp['cpu_caches']) if x)}" in text

    png = tmp_path / "plot.png"
    xytune("plot", table, "-o", png, check=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = tmp_path / "report.md"
    xytune("compare", table, table, "--report", report, check=0)
    assert "PASS" in report.read_text()

    # CI: the rows slower than base go back for re-timing; their samples pool, the rest stay as they were
    again = tmp_path / "again.parquet"
    xytune("profile", "--device", "cpu", "--threads", "1", "-o", again, *SMALL, check=0)
    suspects, ratios = tmp_path / "suspects.json", tmp_path / "ratios.png"
    xytune("compare", table, again, "--threshold", "0", "--suspects", suspects, "--plot", ratios,
           "--report", report)
    assert report.read_text().count("# xytune cost-table comparison") == 2  # appended, not overwritten
    assert ratios.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = json.loads(suspects.read_text())
    before = read_table(again).rows
    slower = before.merge(read_table(table).rows, on=KEY_COLUMNS, suffixes=("", "_base"))
    assert len(keys) == int((slower["median_s"] > slower["median_s_base"]).sum()) > 0
    xytune("retime", again, suspects, "--threads", "1", check=0)
    after = read_table(again).rows
    grew = after["n_samples"] > before["n_samples"]
    assert set(map(tuple, after.loc[grew, KEY_COLUMNS].values)) == {tuple(k[c] for c in KEY_COLUMNS) for k in keys}
    assert all(list(a[:len(b)]) == list(b) for a, b in zip(after.loc[grew, "samples_s"], before.loc[grew, "samples_s"]))
    # each call is one more process: its own median joins the profile's
    assert all(len(p) == 2 and p[0] == m for p, m in zip(after.loc[grew, "process_medians_s"], before.loc[grew, "median_s"]))
    assert all(p[1] == pytest.approx(float(np.median(s[len(b):])))
               for p, s, b in zip(after.loc[grew, "process_medians_s"], after.loc[grew, "samples_s"],
                                  before.loc[grew, "samples_s"]))
    xytune("retime", again, suspects, "--threads", "1", "--fresh", check=0)  # fresh: the old samples are gone
    fresh = read_table(again).rows.loc[grew]
    assert all(set(a).isdisjoint(b) for a, b in zip(fresh["samples_s"], after.loc[grew, "samples_s"]))
    assert all(p == [m] for p, m in zip(fresh["process_medians_s"], fresh["median_s"]))

    # base and head re-timed by two processes in turns, row by row, two rounds (the first replacing)
    base, head, turns = tmp_path / "base.parquet", tmp_path / "head.parquet", tmp_path / "turns"
    shutil.copy(table, base)
    shutil.copy(again, head)
    cmd = [sys.executable, "-m", "xytune.cli", "retime"]
    opts = ["--threads", "1", "--fresh", "--rounds", "2", "--take-turns", str(turns), "--turn-timeout-s", "120"]
    second = subprocess.Popen([*cmd, str(head), str(suspects), *opts], stdout=subprocess.PIPE, text=True)
    xytune("retime", base, suspects, *opts, "--first", check=0)
    assert second.wait(timeout=120) == 0 and f"re-timed {len(keys)} of {len(keys)} rows" in second.stdout.read()
    for path, old in ((base, read_table(table).rows), (head, read_table(again).rows)):
        new = read_table(path).rows.merge(old, on=KEY_COLUMNS, suffixes=("", "_old"))
        named = new.set_index(KEY_COLUMNS).index.isin([tuple(k[c] for c in KEY_COLUMNS) for k in keys])
        assert all(set(a).isdisjoint(b) for a, b in zip(new.loc[named, "samples_s"], new.loc[named, "samples_s_old"]))
        assert (new.loc[named, "n_samples"] >= 2 * 5).all()  # two rounds of at least min_samples each
    alone = subprocess.run([*cmd, str(head), str(suspects), "--threads", "1", "--take-turns", str(tmp_path / "t2"),
                            "--turn-timeout-s", "1"], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "did not hand over its turn" in alone.stderr + alone.stdout
    assert "Traceback" not in alone.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, needle in [
        (["profile", "--device", "tpu"], "Unknown device"),
        (["profile", "--device", "cuda"], "CUDA"),
        (["profile", "--device", "npu"], "torch_npu"),
        (["profile", "--model", "no-such-model"], "Unknown model"),
        (["profile", "--dtypes", "float8", "-o", tmp_path / "x.parquet"], "Unknown dtype"),
        (["profile", "--search", "random", "-o", tmp_path / "x.parquet"], "--search"),
        (["show", tmp_path / "missing.parquet"], "does not exist"),
        (["compare", tmp_path / "a.parquet", tmp_path / "b.parquet"], "does not exist"),
    ]:
        proc = xytune(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_compare_exit_codes(tmp_path, synthetic_table):
    base, new, other = tmp_path / "base.parquet", tmp_path / "new.parquet", tmp_path / "other.parquet"
    write_table(base, resampled(synthetic_table, noise=0.02, seed=1))
    write_table(new, resampled(synthetic_table, scale_rows=[4, 9], factor=1.25, noise=0.02, seed=2))
    report = tmp_path / "summary.md"
    proc = xytune("compare", base, new, "--report", report, check=1)
    assert "FAIL" in proc.stdout and report.read_text().count("| gemm |") == 2
    # stdout is the report as written, one table row per line at any width (a console would wrap it at 80)
    assert proc.stdout.strip() == report.read_text().strip() and max(map(len, proc.stdout.splitlines())) > 80
    partial = tmp_path / "partial.parquet"
    write_table(partial, CostTable(synthetic_table.rows, {**synthetic_table.meta, "complete": False}))
    assert "partial" in xytune("compare", base, partial, check=2).stderr
    xytune("compare", base, new, "--threshold", "0.5", check=0)
    geometry = {**synthetic_table.meta["geometry"], "tp": 3}
    write_table(other, CostTable(synthetic_table.rows, {**synthetic_table.meta, "geometry": geometry}))
    assert "different models" in xytune("compare", base, other, check=2).stderr
    elsewhere = tmp_path / "elsewhere.parquet"
    fp = {**synthetic_table.meta["fingerprint"], "device_name": "AMD EPYC 7B13", "isa": ["avx2", "fma"]}
    write_table(elsewhere, CostTable(synthetic_table.rows, {**synthetic_table.meta, "fingerprint": fp}))
    refused = xytune("compare", base, elsewhere, check=2)
    assert "different devices" in refused.stderr and len(refused.stderr.strip().splitlines()) <= 3
    allowed = xytune("compare", base, elsewhere, "--allow-mismatch", "--report", report)
    assert allowed.returncode in (0, 1) and "Warning: the tables come from different devices" in report.read_text()


def test_sigterm_leaves_a_partial_table_that_resume_finishes(tmp_path):
    table = tmp_path / "t.parquet"
    args = ["profile", "-o", table, "--buckets", ",".join(map(str, range(1, 33))), "--targets", "qkv,o,down",
            "--dtypes", "float32", "--budget-ms", "20", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "xytune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not table.exists() and time.time() < deadline:  # the first checkpoint (0 rows) follows the peaks
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    partial = read_table(table)
    assert not partial.complete and 0 < len(partial.rows) < 32 * 3 * PRIMS

    xytune(*args, "--resume", check=0)
    final = read_table(table)
    assert final.complete and len(final.rows) == 32 * 3 * PRIMS
    assert not final.rows.duplicated(KEY_COLUMNS).any()


def test_sigkill_leaves_the_last_checkpoint_readable_and_resumable(tmp_path):
    table = tmp_path / "t.parquet"
    args = ["profile", "-o", table, "--buckets", ",".join(map(str, range(1, 41))), "--targets", "qkv,o",
            "--dtypes", "float32", "--budget-ms", "20", "--no-progress", "--threads", "1", "--checkpoint-s", "0.5"]
    proc = subprocess.Popen([sys.executable, "-m", "xytune.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint that holds some rows
        if table.exists() and len(read_table(table).rows) > 0:
            break
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler runs, only the atomic checkpoints protect the file
    proc.wait(timeout=30)
    partial = read_table(table)
    assert not partial.complete and 0 < len(partial.rows) < 40 * 2 * PRIMS
    assert not [p for p in tmp_path.iterdir() if p.name != "t.parquet"], "a temp file was left behind"
    xytune(*args, "--resume", check=0)
    final = read_table(table)
    assert final.complete and len(final.rows) == 40 * 2 * PRIMS
    assert not final.rows.duplicated(KEY_COLUMNS).any()


def test_bench_kernels_writes_its_figures_and_meta_matches_the_sdpa_loop(tmp_path):
    """Small sizes on the reference table: every row measured, Meta-Attention's output equal to the loop's."""
    out = tmp_path / "kernels.json"
    xytune("bench", "kernels", "--profile", REFERENCE, "--allow-mismatch",
           "--requests", "3,5", "--ms", "1,40", "--gemms", "qkv,down", "--repeats", "1", "--json", out, check=0)
    got = json.loads(out.read_text())
    assert [r["requests"] for r in got["attention"]] == [3, 5]
    for r in got["attention"]:
        assert r["max_abs_err"] < 0.05  # bf16 against the float32 loop
        assert r["meta_ms"] > 0 and r["vs_loop"] == pytest.approx(r["loop_ms"] / r["meta_ms"])
    assert {(r["gemm"], r["m"]) for r in got["gemm"]} == {(g, m) for g in ("qkv", "down") for m in (1, 40)}
    bad = xytune("bench", "kernels", "--profile", REFERENCE, "--allow-mismatch",
                 "--requests", "0")
    assert bad.returncode != 0 and "positive" in bad.stderr and "Traceback" not in bad.stderr
