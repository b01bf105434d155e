"""`xytune calibrate-steps` and `xytune tune`: whole-step costs into a table, and serving settings searched on it
with the serving simulator (see xytune/tune.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail


@app.command("calibrate-steps")
def calibrate_steps(
    profile: Path = typer.Option(..., "--profile", help="Cost table of this machine; the fit is stored in it."),
    model: str = typer.Option(None, help="Preset name, .gguf file or Hugging Face folder [default: the table's]."),
    dtypes: str = typer.Option(None, "--dtypes", help="Comma list [default: the table's dtypes]."),
    device: str = typer.Option(None, help="cpu, cuda[:N], npu[:N] [default: the table's backend]."),
    threads: int = typer.Option(None, help="CPU threads [default: torch's]."),
):
    """Run a fixed mix of real engine steps and store what whole steps take (GEMMs, attention, norms, sampling,
    scheduling) in the table, so `xytune tune` can simulate serving on it anywhere."""
    from xytune.profiler.cost_model import CostModelError
    from xytune.profiler.table import TableError
    from xytune.runtime.engine.step_calibration import calibrate_table

    try:
        fits = calibrate_table(str(profile), model, device, dtypes.split(",") if dtypes else None, threads,
                               progress=lambda msg: console.print(msg, highlight=False))
    except (TableError, CostModelError, ValueError, OSError) as exc:
        fail(str(exc))
    for dtype, fit in fits.items():
        console.print(f"{dtype}: {fit['steps']} steps fitted, median error {fit['median_ape']:.1%}, "
                      f"p90 {fit['p90_ape']:.1%}", highlight=False)
    console.print(f"[green]stored[/] engine_steps in {profile}", highlight=False)
