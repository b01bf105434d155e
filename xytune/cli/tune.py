"""`xytune calibrate-steps` and `xytune tune`: whole-step costs into a table, and serving settings searched on it
with the serving simulator (see xytune/tune.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail, warned


@app.command("calibrate-steps")
def calibrate_steps(
    profile: Path = typer.Option(..., "--profile", help="Cost table of this machine; the fit is stored in it."),
    model: str = typer.Option(None, help="Preset name, .gguf file or Hugging Face folder [default: the table's]."),
    dtypes: str = typer.Option(None, "--dtypes", help="Comma list [default: the table's dtypes]."),
    device: str = typer.Option(None, help="cpu, cuda[:N], npu[:N] [default: the table's backend]."),
    threads: int = typer.Option(None, help="CPU threads [default: torch's]."),
    steps_per_load: int = typer.Option(32, help="Steps timed under each of the six loads (fewer: quicker, rougher)."),
    quick: bool = typer.Option(False, "--quick", help="A small grid of step shapes: a quarter of the time, a rougher "
                               "fit (a first look at a machine)."),
):
    """Run real engine steps (a grid of step shapes, then closed-loop loads) and store what whole steps take
    (GEMMs, attention, norms, sampling, scheduling) in the table, so `xytune tune` can simulate serving on it
    anywhere."""
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModelError
    from xytune.profiler.table import TableError
    from xytune.runtime.engine.step_calibration import calibrate_table

    try:
        fits = calibrate_table(str(profile), model, device, dtypes.split(",") if dtypes else None, threads,
                               progress=lambda msg: console.print(msg, highlight=False), steps_per_load=steps_per_load,
                               quick=quick)
    except (TableError, CostModelError, ModelLoadError, ValueError, OSError) as exc:
        fail(str(exc))
    for dtype, fit in fits.items():
        console.print(f"{dtype}: {fit['steps']} steps fitted, median error {fit['median_ape']:.1%}, "
                      f"p90 {fit['p90_ape']:.1%}", highlight=False)
    console.print(f"[green]stored[/] engine_steps in {profile}", highlight=False)


@app.command()
def tune(
    profile: Path = typer.Option(..., "--profile", help="Cost table of the machine that will serve (any machine's: "
                                 "the simulator needs only the table)."),
    slo_ttft_ms: float = typer.Option(..., help="Time-to-first-token SLO."),
    slo_tpot_ms: float = typer.Option(..., help="Time-per-output-token SLO."),
    workload: str = typer.Option("synthetic", help="synthetic, or a JSONL file of {\"prompt\", \"max_tokens\"} "
                                 "(text prompts are tokenized with --model)."),
    num_prompts: int = typer.Option(100, help="Requests per simulated rate."),
    input_len: int = typer.Option(256, help="Mean prompt tokens (synthetic)."),
    output_len: int = typer.Option(48, help="Mean new tokens (synthetic; default max_tokens for a file)."),
    sweep_rates: str = typer.Option(None, help="Comma list of request rates [default: around where vLLM's default "
                                    "settings stop meeting the SLOs on this table]."),
    policies: str = typer.Option(None, help="Comma list of policies to consider [default: all]."),
    acceptance_rate: float = typer.Option(0.0, help="Chance a speculative draft token is accepted; above 0, "
                                          "candidates with 2 and 4 speculative tokens are simulated too."),
    kv_cache_gb: float = typer.Option(1.0, help="KV cache of the server, as `xytune serve --kv-cache-gb`."),
    dtype: str = typer.Option(None, help="The table's dtype to serve in [default: its fastest]."),
    model: str = typer.Option(None, help="Tokenizer for text prompts [default: the table's model]."),
    trials: int = typer.Option(40, help="Candidates Optuna draws when the space is too large to simulate whole."),
    seed: int = typer.Option(0, help="Seed of lengths, tokens, arrivals and the search."),
    top: int = typer.Option(5, help="Candidates to show."),
    json_out: Path = typer.Option(None, "--json", help="Write the winner as settings `xytune export --from-tune` "
                                  "reads, with every candidate's figures under \"why\"."),
    plot: Path = typer.Option(None, help="Plot predicted TTFT and TPOT p90 against rate for the top candidates."),
):
    """Search the serving settings that carry the most load within the SLOs, by simulating the table's machine."""
    import json

    from xytune.bench.serve import BenchPrompt
    from xytune.model_config import ModelLoadError
    from xytune.profiler.cost_model import CostModel, CostModelError
    from xytune.profiler.table import TableError, read_table
    from xytune.runtime.engine.scheduler import POLICIES
    from xytune.tune import SearchSpace, Simulator, TuneError, Workload, plot_candidates, settings_json
    from xytune.tune import tune as run_tune

    from .bench import _checked_rates, token_prompts

    rates = _checked_rates(sweep_rates, num_prompts, input_len, output_len) if sweep_rates else None
    if not 0.0 <= acceptance_rate <= 1.0:
        fail(f"--acceptance-rate must be within [0, 1], not {acceptance_rate:g}.")
    chosen = tuple(p.strip() for p in policies.split(",")) if policies else POLICIES
    if not chosen or any(p not in POLICIES for p in chosen):
        fail(f"--policies takes names out of {', '.join(POLICIES)}, not {policies!r}.")
    if min(num_prompts, input_len, output_len, trials, top) < 1:
        fail("--num-prompts, --input-len, --output-len, --trials and --top must be positive.")
    try:
        table = read_table(profile)  # no device check: the table usually comes from the machine that will serve
        if not len(table.rows):
            fail(f"{profile} holds no measurements.")
        cost_model = CostModel(table, formats=("float",))
        sim = warned(Simulator, cost_model, dtype or cost_model.fastest_dtype())
        if workload == "synthetic":
            prompts = token_prompts("synthetic", num_prompts, input_len, output_len, seed,
                                    vocab_size=cost_model.geometry.vocab_size)
        else:
            prompts = token_prompts(workload, num_prompts, input_len, output_len, seed,
                                    model=model or cost_model.geometry.name)
        work = Workload([BenchPrompt(p.prompt, p.max_tokens) for p in prompts], seed, acceptance_rate, kv_cache_gb)
        space = SearchSpace.for_table(cost_model, slo_tpot_ms, (0, 2, 4) if acceptance_rate > 0 else (0,))
        space = SearchSpace(chosen, *[getattr(space, f) for f in ("budgets", "seqs", "aligns", "step_targets_ms",
                                                                    "speculative_tokens")])
        with console.status("simulating...") as status:
            result = run_tune(sim, work, slo_ttft_ms, slo_tpot_ms, space, rates, trials, seed, status.update)
    except (TableError, CostModelError, TuneError, ModelLoadError, ValueError, OSError, RuntimeError) as exc:
        fail(str(exc))
    _render(result, top, slo_ttft_ms, slo_tpot_ms)
    if json_out:
        json_out.write_text(json.dumps(settings_json(result, str(profile), slo_ttft_ms, slo_tpot_ms), indent=2))
        console.print(f"[green]wrote[/] {json_out} (xytune export --profile {profile} --from-tune {json_out} "
                      "-o vllm.yaml)", highlight=False, soft_wrap=True)
    if plot:
        with console.status("plotting..."):
            written = plot_candidates(result, sim, work, slo_ttft_ms, slo_tpot_ms, plot)
        console.print(f"[green]wrote[/] {written}", highlight=False)
    if not result.met:
        raise typer.Exit(1)


def _render(result, top: int, slo_ttft_ms: float, slo_tpot_ms: float) -> None:
    from rich.table import Table

    t = Table("#", "setting", "capacity req/s", "SLO met", "TTFT p90 ms", "TPOT p90 ms", "goodput req/s",
              title=f"simulated on the table ({result.source}); SLOs TTFT <= {slo_ttft_ms:g} ms, "
                    f"TPOT <= {slo_tpot_ms:g} ms; rates {', '.join(f'{r:g}' for r in result.rates)}")
    for i, s in enumerate(result.ranked[:top]):
        row = s.at_capacity()
        t.add_row(str(i + 1), s.candidate.name, "none" if s.capacity is None else f"{s.capacity:g}",
                  f"{row['slo_attainment']:.0%}", _ms(row, "p90_ttft_ms"), _ms(row, "p90_tpot_ms"),
                  f"{row['request_goodput']:.2f}")
    console.print(t)
    console.print(f"{result.trials} settings simulated. {'Recommended' if result.met else 'No setting meets the SLOs'}: "
                  f"{result.why()}.", highlight=False, soft_wrap=True)
    if result.met:
        console.print(f"serve with: xytune serve {' '.join(result.winner.candidate.serve_flags())}", highlight=False,
                      soft_wrap=True)


def _ms(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else f"{row[key]:.0f}"
