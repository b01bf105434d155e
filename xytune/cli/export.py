"""`xytune export`: settings for vLLM / vllm-ascend from a cost table (see xytune/export.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail


@app.command()
def export(
    profile: Path = typer.Option(..., "--profile", help="Cost table (.parquet) of the machine that will serve."),
    format: str = typer.Option("vllm", "--format", help="vllm | vllm-ascend (a `vllm serve --config` YAML) | "
                               "json (LLM(...) keyword arguments, rows in FILE.sources.json)."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    from_tune: Path = typer.Option(None, "--from-tune", help="Settings JSON: policy, max_num_batched_tokens, "
                                   "max_num_seqs [, long_prefill_token_threshold, num_speculative_tokens, why]."),
    slo_tpot_ms: float = typer.Option(100.0, help="Without --from-tune: the TPOT SLO the largest step must "
                                      "fit (sets max-num-seqs and max-num-batched-tokens)."),
    dtype: str = typer.Option(None, help="The table's dtype to read costs in [default: its fastest]."),
):
    """Write the serving settings a cost table supports, in the config file vLLM or vllm-ascend reads.

    Capture sizes are the batch sizes just before the step's cost jumps; every field cites its table rows."""
    # heavy (torch, pandas): imported when the command runs, so `xytune --help` starts at once
    from xytune.export import FORMATS, ExportError, TuneSettings, plan_export, write_export
    from xytune.profiler.cost_model import CostModel, CostModelError
    from xytune.profiler.table import TableError, read_table

    if format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}.")
    if slo_tpot_ms <= 0:
        fail("--slo-tpot-ms must be positive.")
    try:
        tune = TuneSettings.read(from_tune) if from_tune else None
        table = read_table(profile)  # no device check: the table usually comes from the machine that will serve
        if not len(table.rows):
            fail(f"{profile} holds no measurements.")
        cost_model = CostModel(table, formats=("float",))  # vLLM runs its own float GEMMs
        plan = plan_export(cost_model, str(profile), dtype or cost_model.fastest_dtype(), tune, slo_tpot_ms)
        written = write_export(plan, format, output)
    except (ExportError, TableError, CostModelError, OSError) as exc:
        fail(str(exc))
    s = plan.settings
    if not table.complete:
        console.print(f"[yellow]note:[/] {profile} is a partial table (its sweep did not finish).",
                      soft_wrap=True)
    console.print(f"max_num_seqs {s['max_num_seqs'].value}, max_num_batched_tokens "
                  f"{s['max_num_batched_tokens'].value} (from {plan.origin}); capture sizes "
                  f"{s['cudagraph_capture_sizes'].value}", highlight=False, soft_wrap=True)
    if "weight_nz_mode" in s:
        nz = s["weight_nz_mode"]
        console.print(f"weight_nz_mode {nz.value}: {nz.why}", highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {', '.join(map(str, written))}", highlight=False, soft_wrap=True)
    if format != "json":
        console.print(f"run: vllm serve MODEL --config {output}", highlight=False, soft_wrap=True)
