"""Config search for primitives with a tile space: exhaustive over the valid grid, or Optuna's TPE.

A search never times a config twice: configs already timed (by this run, an earlier run being resumed, or
other workers sharing an Optuna storage) are answered from what they measured. A config that fails when
run (a Triton tile out of resources) counts as tried and is never proposed again.

Workers on many processes or hosts share one study through a storage (a journal file or a database). A
worker claims a config in the storage before it times it (the trial's ``config`` attribute) and then reads
the storage back: if another live trial claims the same config, it leaves the config to that one. Each
worker writes before it reads, so of two workers that claim one config at least the later reader sees the
other: never both time it.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timedelta
from typing import Callable

from xytune.profiler.devices import Device
from xytune.profiler.primitives import Config, Primitive, Shape
from xytune.profiler.table import canonical_json

GRID_LIMIT = 64  # spaces up to this size are searched exhaustively under --search auto


SEARCHES = ("auto", "grid", "optuna")
# Proposals in a row that time nothing new (pruned, known, or another worker's) before the grid's next free config
# is asked for instead: TPE repeats its favourites once it has converged, a small space runs out of new ones.
REPEATS_BEFORE_GRID = 10
# A claim older than this whose trial never finished is a worker killed hard (SIGKILL, a lost host): its config is
# free again. Timing one config takes seconds (a Triton compile included); the margin covers hosts' clock skew.
STALE_CLAIM = timedelta(minutes=10)
SCHEMA_RACE_RETRIES = 4  # opening a database whose Optuna tables another worker creates at the same moment
DATABASE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # SQLAlchemy's dialect[+driver]://...


class ConfigFailed(RuntimeError):
    """One config of a primitive raised on this device (out of resources, an op the chip refuses, ...)."""


class StorageError(ValueError):
    """An Optuna storage that cannot be opened (a bad URL, a database that does not answer, a path not writable)."""


def storage_kind(spec: str | None) -> str | None:
    """What a table's metadata keeps of ``--storage``: ``journal`` or the URL's scheme, never the URL (a password)."""
    if spec is None:
        return None
    return spec.split("://", 1)[0] if DATABASE_URL.match(spec) else "journal"


def open_storage(spec: str | None):
    """``--storage`` as an Optuna storage: a database URL (``sqlite:///``, ``postgresql://``, ...) as is, anything
    else a journal file (shared by processes, or by hosts over a network file system). None: in memory."""
    if spec is None:
        return None
    # optuna 5.0.0, optuna/storages/__init__.py: a string storage is always RDBStorage(url), so a journal needs
    # JournalStorage(JournalFileBackend(path)) (optuna/storages/journal/_file.py).
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

    if DATABASE_URL.match(spec):
        try:
            shown = make_url(spec).render_as_string(hide_password=True)
        except ArgumentError:
            shown = f"{storage_kind(spec)}://..."
        try:
            for attempt in range(SCHEMA_RACE_RETRIES):  # workers started together all create Optuna's tables
                try:
                    return optuna.storages.RDBStorage(spec)
                except (IntegrityError, ProgrammingError):  # another worker created them first: they exist now
                    if attempt == SCHEMA_RACE_RETRIES - 1:
                        raise
                    time.sleep(0.2 * (attempt + 1))
        except ImportError as exc:  # optuna hides which driver is missing in the cause
            raise StorageError(f"Cannot open the Optuna storage {shown}: {_first_line(exc.__cause__ or exc)} "
                               "(install the database's Python driver, e.g. psycopg for postgresql://).") from None
        except (ValueError, RuntimeError, SQLAlchemyError) as exc:
            raise StorageError(f"Cannot open the Optuna storage {shown}: {_first_line(exc)}") from None
    try:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec))
    except OSError as exc:
        raise StorageError(f"Cannot use {spec} as an Optuna journal file: {exc.strerror or exc}.") from None
    except (ValueError, LookupError, TypeError) as exc:  # the replay of lines that are not a journal's
        raise StorageError(f"{spec} is not an Optuna journal file ({type(exc).__name__}: {_first_line(exc)}); "
                           "give a database as a URL, e.g. sqlite:///study.db.") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    """Run TPE over ``primitive.space`` until ``trials`` configs have been timed (by this worker or others
    sharing ``storage``). ``objective`` is called once per new valid config and returns seconds.
    Invalid configs are pruned without being timed; configs already in ``done`` (canonical JSON -> seconds),
    finished in the study, or being timed by another worker are never timed again. ``trial_attrs`` adds user
    attributes to each newly timed trial (the sweep stores its row there, so workers sharing a storage see each
    other's rows). Returns the study.
    """
    import optuna  # heavy (about a second to import): only when a space is searched with TPE

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = dict(done or {})
    study = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3))),
    )
    valid = [c for c in primitive.grid() if primitive.invalid(shape, c, dtype, device) is None]
    target = min(trials, len(valid))

    def run_trial(trial) -> float:
        return _run_trial(optuna, study, trial, primitive, shape, dtype, device, objective, done, trial_attrs)

    repeats = 0
    while len(done) + len(busy := _sync(optuna, study, done)) < target:
        if repeats >= REPEATS_BEFORE_GRID:  # TPE keeps proposing pruned or known configs: take the grid's next
            free = next((c for c in valid if canonical_json(c) not in done.keys() | busy), None)
            if free is None:
                break
            study.enqueue_trial(free)
        known = len(done)
        study.optimize(run_trial, n_trials=1)
        repeats = 0 if len(done) > known else repeats + 1
    return study


def _sync(optuna, study, done: dict[str, float], mine: int | None = None) -> set[str]:
    """Add the configs other workers (or earlier runs) finished to ``done``; return those another live trial
    (not ``mine``) is timing now."""
    State = optuna.trial.TrialState
    busy, now = set(), datetime.now()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("config")
        if key is None or t.number == mine:
            continue
        if t.state == State.COMPLETE:
            done.setdefault(key, t.value)
        elif t.state == State.PRUNED and "failed" in t.user_attrs:
            done.setdefault(key, math.inf)
        elif t.state == State.RUNNING and now - t.datetime_start < STALE_CLAIM:
            busy.add(key)
    return busy - done.keys()


def _run_trial(optuna, study, trial, primitive: Primitive, shape: Shape, dtype: str, device: Device,
               objective: Callable[[Config], float], done: dict[str, float], trial_attrs: Callable[[], dict]):
    """One TPE trial: an invalid config is pruned untimed, a known one answered from ``done``, one that another
    worker claims left to it."""
    config = {k: trial.suggest_categorical(k, list(v)) for k, v in primitive.space.items()}
    reason = primitive.invalid(shape, config, dtype, device)
    if reason is not None:
        trial.set_user_attr("pruned", reason)
        raise optuna.TrialPruned(reason)
    key = canonical_json(config)
    trial.set_user_attr("config", key)  # the claim: written before the storage is read back
    busy = _sync(optuna, study, done, mine=trial.number)
    if key in done:
        return done[key]
    if key in busy:
        trial.set_user_attr("pruned", "being timed by another worker")
        raise optuna.TrialPruned("being timed by another worker")
    try:
        seconds = objective(config)
    except ConfigFailed as exc:  # tried once, never again (by any worker): it counts as done, with no row
        done[key] = math.inf
        trial.set_user_attr("failed", str(exc))
        raise optuna.TrialPruned(str(exc)) from None
    done[key] = seconds
    for name, value in trial_attrs().items():
        trial.set_user_attr(name, value)
    return seconds
