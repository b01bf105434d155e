"""Config search for primitives with a tile space: exhaustive over the valid grid, or Optuna's TPE.

A search never times a config twice: configs already timed (by this run, an earlier run being resumed, or
other workers sharing an Optuna storage) are answered from what they measured. A config that fails when
run (a Triton tile out of resources) counts as tried and is never proposed again.
"""

from __future__ import annotations

import math
from typing import Callable

from xytune.profiler.devices import Device
from xytune.profiler.primitives import Config, Primitive, Shape
from xytune.profiler.table import canonical_json

GRID_LIMIT = 64  # spaces up to this size are searched exhaustively under --search auto


SEARCHES = ("auto", "grid", "optuna")


class ConfigFailed(RuntimeError):
    """One config of a primitive raised on this device (out of resources, an op the chip refuses, ...)."""


def use_optuna(primitive: Primitive, search: str) -> bool:
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}.")
    if not primitive.space:
        return False
    return search == "optuna" or (search == "auto" and primitive.space_size() > GRID_LIMIT)


def optuna_search(
    primitive: Primitive,
    shape: Shape,
    dtype: str,
    device: Device,
    objective: Callable[[Config], float],
    trials: int,
    *,
    done: dict[str, float] | None = None,
    study_name: str = "xytune",
    storage=None,
    seed: int = 0,
    trial_attrs: Callable[[], dict] = lambda: {},
):
    """Run TPE over ``primitive.space`` until ``trials`` configs have been timed.
    ``objective`` is called once per new valid config and returns seconds.
    Invalid configs are pruned without being timed; configs already in
    ``done`` (canonical JSON -> seconds) are answered from it, so a resumed or
    shared study never times a config twice. ``trial_attrs`` adds user
    attributes to each newly timed trial (the sweep stores its row there, so
    workers sharing a storage see each other's rows). Returns the study.
    """
    import optuna  # heavy (about a second to import): only when a space is searched with TPE

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = dict(done or {})
    study = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3))),
    )
    for t in study.trials:  # configs other workers (or an earlier run) already timed
        if t.state == optuna.trial.TrialState.COMPLETE and "config" in t.user_attrs:
            done.setdefault(t.user_attrs["config"], t.value)
    valid_total = sum(1 for c in primitive.grid() if primitive.invalid(shape, c, dtype, device) is None)
    target = min(trials, valid_total)

    def run_trial(trial) -> float:
        return _run_trial(optuna, trial, primitive, shape, dtype, device, objective, done, trial_attrs)

    attempts = 0
    while len(done) < target and attempts < 20 * max(trials, 1):
        attempts += 1
        study.optimize(run_trial, n_trials=1)
    if len(done) < target:  # TPE kept proposing pruned or repeated configs: fill from the grid
        _fill_from_grid(primitive, shape, dtype, device, objective, done, target)
    return study


def _run_trial(optuna, trial, primitive: Primitive, shape: Shape, dtype: str, device: Device,
               objective: Callable[[Config], float], done: dict[str, float], trial_attrs: Callable[[], dict]):
    """One TPE trial: an invalid config is pruned untimed, a known one answered from ``done``."""
    config = {k: trial.suggest_categorical(k, list(v)) for k, v in primitive.space.items()}
    reason = primitive.invalid(shape, config, dtype, device)
    if reason is not None:
        trial.set_user_attr("pruned", reason)
        raise optuna.TrialPruned(reason)
    key = canonical_json(config)
    trial.set_user_attr("config", key)
    if key in done:
        return done[key]
    try:
        seconds = objective(config)
    except ConfigFailed as exc:  # tried once, never again: it counts as done, with no row
        done[key] = math.inf
        trial.set_user_attr("pruned", str(exc))
        raise optuna.TrialPruned(str(exc)) from None
    done[key] = seconds
    for name, value in trial_attrs().items():
        trial.set_user_attr(name, value)
    return seconds


def _fill_from_grid(primitive: Primitive, shape: Shape, dtype: str, device: Device,
                    objective: Callable[[Config], float], done: dict[str, float], target: int) -> None:
    for config in primitive.grid():
        if len(done) >= target:
            return
        key = canonical_json(config)
        if key not in done and primitive.invalid(shape, config, dtype, device) is None:
            try:
                done[key] = objective(config)
            except ConfigFailed:
                done[key] = math.inf


