"""`xytune profile`, `show`, `plot`, `compare`: make a cost table and report on it.

A typer command declares each of its options as a parameter with its help text, so the commands
with many options run past 60 lines; their bodies are short.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import typer

from xytune.reports import DEFAULT_ALPHA, DEFAULT_THRESHOLD

from .app import _interrupt, app, console, fail


def _checked_buckets(buckets: str) -> list[int]:
    """``--buckets``: a comma list of positive M values (one line and exit 2 when it is not)."""
    try:
        ms = sorted({int(b) for b in buckets.split(",")})
    except ValueError:
        fail(f"--buckets must be a comma list of integers, not {buckets!r}.")
    if ms[0] < 1:
        fail("--buckets must all be at least 1.")
    return ms


@app.command()
def profile(
    device: str = typer.Option("cpu", help="cpu, cuda[:N], npu[:N], ascend910b or ascend910b1..b4."),
    model: str = typer.Option("smollm2-135m", help="Preset name, .gguf file or Hugging Face folder."),
    output: Path = typer.Option(None, "--output", "-o", help="Parquet cost table to write "
                                "[default: ./<device>-<model>.parquet]."),
    tp: int = typer.Option(1, help="Tensor-parallel degree: GEMMs are sharded per rank."),
    dtypes: str = typer.Option(None, "--dtypes", help="Comma list [default: float32,bfloat16 on CPU; "
                               "bfloat16,float16 elsewhere]."),
    max_tokens: int = typer.Option(4096, help="Largest M (tokens per step) to profile."),
    max_seqs: int = typer.Option(256, help="Largest M for lm_head (one sampled token per sequence)."),
    buckets: str = typer.Option(None, help="Explicit comma list of M buckets (overrides the default spacing)."),
    targets: str = typer.Option(None, help="Comma list of targets to profile (qkv,o,gate_up,down,lm_head,attention)."),
    search: str = typer.Option("auto", help="grid | optuna | auto (grid for small config spaces)."),
    trials: int = typer.Option(24, help="Timed Optuna trials per shape."),
    storage: str = typer.Option(None, help="Optuna storage that workers and resumed runs share: a database URL "
                                "(sqlite:///s.db, postgresql://user@host/db); anything else is a journal file."),
    budget_ms: float = typer.Option(None, help="Sampling time per point in ms."),
    threads: int = typer.Option(None, help="CPU threads (set and recorded) [default: torch's]."),
    quick: bool = typer.Option(False, "--quick", help="Coarse buckets and short timing: about a minute on 2 cores."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial table, skipping finished rows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing table."),
    seed: int = typer.Option(0, help="Seed of the Optuna sampler."),
    checkpoint_s: float = typer.Option(5.0, help="Seconds between checkpoints of the partial table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    quantization: str = typer.Option("none", help="GEMM weight formats to time beside float: none | int8 | int4 | "
                                     "auto (all, so serve --quantization auto can choose from the table)."),
    engine_steps: bool = typer.Option(None, "--engine-steps/--no-engine-steps", help="After the sweep, fit whole "
                                      "engine steps into the table (`xytune calibrate-steps`; about 1.5 minutes per "
                                      "dtype) [default: on, off with --quick or --targets]."),
):
    """Sweep GEMM shape buckets and kernel configs on DEVICE into a Parquet cost table."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.kernels.quantized import swept_formats
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.profiler.geometry import GeometryError, resolve_geometry
    from xytune.profiler.primitives import DTYPES
    from xytune.profiler.sweep import Sweep, SweepError, SweepSettings, default_dtypes, m_buckets, quick_buckets
    from xytune.profiler.table import TableError

    try:
        formats = swept_formats(quantization)
    except ValueError as exc:
        fail(str(exc))
    try:
        dev = get_device(device, threads=threads)
        geometry = resolve_geometry(model, tp=tp)
        dts = [d.strip() for d in dtypes.split(",")] if dtypes else default_dtypes(dev.backend)
        bad = [d for d in dts if d not in DTYPES]
        if bad:
            fail(f"Unknown dtype(s) {bad}; choose from {list(DTYPES)}.")
        ms = _checked_buckets(buckets) if buckets else (quick_buckets if quick else m_buckets)(max_tokens)
        settings = (SweepSettings.quick(dts, max_tokens) if quick else SweepSettings(dtypes=dts, buckets=ms))
        if checkpoint_s < 0:
            fail("--checkpoint-s must be >= 0.")
        settings = replace(settings, buckets=ms, max_seqs=max_seqs, search=search, trials=trials, storage=storage,
                           weight_formats=formats,
                           seed=seed, checkpoint_every_s=checkpoint_s,
                           targets=[t.strip() for t in targets.split(",")] if targets else None)
        if budget_ms is not None:
            if budget_ms <= 0:
                fail("--budget-ms must be positive.")
            settings = replace(settings, timing=replace(settings.timing, budget_s=budget_ms / 1e3))
        out = output or Path(f"{dev.backend}-{geometry.name}.parquet")
        sweep = Sweep(dev, geometry, settings, out, resume=resume, overwrite=overwrite)
    except (DeviceError, GeometryError, SweepError, TableError) as exc:
        fail(str(exc))

    signal.signal(signal.SIGTERM, _interrupt)
    console.print(f"profiling {geometry.name} (tp={tp}) on {dev.name}: {len(sweep.groups)} shape groups, "
                  f"dtypes {','.join(dts)}, M up to {max(ms)} -> {out}")
    try:
        table = sweep.run(progress=progress)
    except KeyboardInterrupt:
        if not sweep.table.meta:  # stopped while measuring the peaks, before the first checkpoint
            fail(f"interrupted before the first checkpoint; nothing was written to {out}.", code=130)
        fail(f"interrupted; the partial table ({len(sweep.table.rows)} rows) is saved in {out}; "
             "rerun with --resume to finish it.", code=130)
    console.print(f"[green]wrote[/] {out}: {len(table.rows)} rows")
    if engine_steps if engine_steps is not None else not (quick or targets):
        _calibrate_engine_steps(out, model, device, threads)


def _calibrate_engine_steps(out: Path, model: str, device: str, threads: int | None) -> None:
    """The table's engine-step fit, for `xytune tune`; a model that cannot be loaded here only skips it."""
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError
    from xytune.runtime.engine.step_calibration import calibrate_table

    try:
        fits = calibrate_table(str(out), model, device, threads=threads,
                               progress=lambda msg: console.print(msg, highlight=False))
    except (ModelLoadError, CostModelError, ValueError, OSError) as exc:
        console.print(f"[yellow]note:[/] no engine-step fit in {out} ({exc}); `xytune tune` will count the GEMM and "
                      "attention rows only.", highlight=False, soft_wrap=True)
        return
    for dtype, fit in fits.items():
        console.print(f"engine steps, {dtype}: {fit['steps']} fitted, median error {fit['median_ape']:.1%}",
                      highlight=False)


@app.command()
def show(
    table: Path = typer.Argument(..., help="A cost table (.parquet)."),
    format: str = typer.Option("table", "--format", help="table | json"),
):
    """Summarise a cost table: device, fingerprint, counts, best primitive per op and M."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.profiler.table import TableError, read_table
    from xytune.reports.summary import render_summary, summarize_table

    if format not in ("table", "json"):
        fail(f"--format must be table or json, not {format!r}.")
    try:
        summary = summarize_table(read_table(table))
    except TableError as exc:
        fail(str(exc))
    if format == "json":
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render_summary(summary, console)


@app.command()
def plot(
    table: Path = typer.Argument(..., help="A cost table (.parquet)."),
    output: Path = typer.Option(..., "--output", "-o", help="Image to write (.png, .svg, .pdf)."),
    dtype: str = typer.Option(None, help="Which dtype to plot [default: the table's first]."),
):
    """Plot latency and fraction of peak against M per primitive, the best choice marked."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.profiler.table import TableError, read_table
    from xytune.reports.plot import plot_table

    try:
        out = plot_table(read_table(table), output, dtype)
    except (TableError, ValueError) as exc:
        fail(str(exc))
    console.print(f"[green]wrote[/] {out}")


@app.command()
def compare(
    base: Path = typer.Argument(..., help="Baseline cost table."),
    new: Path = typer.Argument(..., help="New cost table."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, help="Relative slowdown that counts (0.10 = 10%)."),
    alpha: float = typer.Option(DEFAULT_ALPHA, help="Per-row significance level of the Mann-Whitney U test."),
    report: Path = typer.Option(None, help="Append the markdown report to this file (e.g. $GITHUB_STEP_SUMMARY)."),
    plot: Path = typer.Option(None, help="Write a new/base ratio against M plot here (PNG)."),
    suspects: Path = typer.Option(None, help="Write the rows slower beyond the threshold (JSON) for "
                                  "`xytune retime` to time again before the verdict."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch",
                                        help="Compare tables of different devices (the report says so on top)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Compare a table whose sweep did not finish (the report says so)."),
):
    """Compare two cost tables; exit 1 on a significant regression beyond the threshold."""
    # heavy (pandas, scipy, matplotlib): imported when the command runs, so `xytune --help` starts at once
    from xytune.profiler.table import KEY_COLUMNS, TableError, read_table
    from xytune.reports.compare import CompareError, compare_tables, markdown_report, plot_ratios

    try:
        result = compare_tables(read_table(base), read_table(new), threshold, alpha, allow_mismatch, allow_partial)
    except (TableError, CompareError) as exc:
        fail(str(exc))
    text = markdown_report(result, str(base), str(new))
    try:
        if report:
            report.parent.mkdir(parents=True, exist_ok=True)
            with report.open("a") as f:  # a job summary collects several steps' reports
                f.write(text + "\n")
        if plot:
            plot_ratios(result, plot)
        if suspects:
            suspects.write_text(json.dumps(result.suspects[KEY_COLUMNS].to_dict("records"), indent=1))
    except OSError as exc:
        fail(str(exc))
    sys.stdout.write(text + "\n")  # plain text: a console would wrap the markdown tables at its width
    raise typer.Exit(1 if len(result.regressions) else 0)


@app.command()
def retime(
    table: Path = typer.Argument(..., help="Cost table to update in place."),
    rows: Path = typer.Argument(..., help="JSON list of row keys (what `compare --suspects` writes)."),
    device: str = typer.Option("cpu", help="The device the table was measured on: cpu, cuda[:N], npu[:N]."),
    threads: int = typer.Option(None, help="CPU threads [default: torch's]."),
    fresh: bool = typer.Option(False, "--fresh", help="This call's samples replace the rows' earlier ones."),
    rounds: int = typer.Option(1, help="Times each row is re-timed in this process; the samples are pooled."),
    take_turns: Path = typer.Option(None, help="A fresh folder shared with a second `retime` (the other commit's "
                                               "table, the same rows and rounds): the two time row by row in turns."),
    first: bool = typer.Option(False, "--first", help="With --take-turns: this process times first."),
    turn_timeout_s: float = typer.Option(600.0, help="With --take-turns: how long to wait for the other's turn."),
):
    """Time some rows of a table again on this device and pool the samples (CI: base and head take turns)."""
    # heavy (torch): imported when the command runs, so `xytune --help` starts at once
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.profiler.retime import Turns, retime_rows
    from xytune.profiler.sweep import SweepError

    turns = None
    try:
        keys = json.loads(rows.read_text())
        dev = get_device(device, threads=threads)
        turns = Turns(take_turns, first, turn_timeout_s) if take_turns else None
        n = retime_rows(table, dev, keys if isinstance(keys, list) else [], fresh=fresh, rounds=rounds, turns=turns)
    except (OSError, ValueError, DeviceError, SweepError) as exc:
        fail(str(exc))
    finally:
        if turns is not None:
            turns.close()
    console.print(f"re-timed {n} of {len(keys)} rows in {table}")
