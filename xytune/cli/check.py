"""`xytune check`: the first thing to run on a new machine (see xytune/check.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from .app import app, console, fail


@app.command()
def check(
    device: str = typer.Option("cpu", help="cpu, cuda[:N], npu[:N], ascend910b or ascend910b1..b4."),
    model: str = typer.Option("smollm2-135m", help="Model whose shapes are profiled and which generates."),
    profile_max_tokens: int = typer.Option(256, help="Largest M of the short profile."),
    tokens: int = typer.Option(8, help="Greedy tokens the engine generates."),
    output: Path = typer.Option(None, "--output", "-o", help="Keep the short profile's table here "
                                "[default: a temporary file]."),
    threads: int = typer.Option(None, help="CPU threads [default: torch's]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (one object per check)."),
):
    """Probe, verify and time DEVICE: every kernel backend against float64, a short profile, a few tokens.

    Exit 0 when every check passes (checks of backends the device lacks are skipped), 1 when one fails, 2 when
    the device is not usable here."""
    # heavy (torch, the runtime): imported when the command runs, so `xytune --help` starts at once
    from xytune.check import FAIL, as_dicts, run_checks
    from xytune.profiler.devices import DeviceError, get_device
    from xytune.profiler.geometry import GeometryError, resolve_geometry

    if profile_max_tokens < 1 or tokens < 1:
        fail("--profile-max-tokens and --tokens must be at least 1.")
    try:
        dev = get_device(device, threads=threads)
        resolve_geometry(model)
    except (DeviceError, GeometryError) as exc:
        fail(str(exc))
    if not as_json:
        console.print(f"checking {dev.name} ({dev.fingerprint().get('device_name')}) with {model}")
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}

    def show(r) -> None:
        if not as_json:
            console.print(f"[{colours[r.status]}]{r.status:>4}[/] {r.name} ({r.seconds:.1f} s)", highlight=False)

    results = run_checks(dev, model, profile_max_tokens, tokens, output, on_result=show)
    if as_json:
        sys.stdout.write(json.dumps({"device": dev.name, "model": model, "checks": as_dicts(results)}, indent=1)
                         + "\n")
    else:
        table = Table(title=f"xytune check on {dev.name}")
        for column in ("check", "result", "detail", "s"):
            table.add_column(column, overflow="fold")
        for r in results:
            table.add_row(r.name, f"[{colours[r.status]}]{r.status}[/]", r.detail, f"{r.seconds:.1f}")
        console.print(table)
    raise typer.Exit(1 if any(r.status == FAIL for r in results) else 0)
