"""The offline sweep: shape buckets x primitives x dtypes x configs -> timed rows.

Small config spaces are searched exhaustively; large ones with Optuna (TPE,
a budget of timed trials per shape), invalid configs pruned before they are
timed. The table is checkpointed atomically as rows arrive, so an interrupted
sweep leaves a valid partial table and ``resume`` skips every finished row.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xytune.profiler.calibrate import measure_tuning, split_margin
from xytune.profiler.devices import Device, fingerprint_mismatches
from xytune.profiler.geometry import ModelGeometry
from xytune.profiler.host_memory import keep_freed_memory
from xytune.profiler.peaks import measure_peaks, roofline_fraction
from xytune.profiler.primitives import Config, Primitive, Shape, primitives_for, release_operands
from xytune.profiler.probe import Pruned, failure_reason, usable_primitives
from xytune.profiler.search import (
    SEARCHES,
    ConfigFailed,
    StorageError,
    open_storage,
    optuna_search,
    storage_kind,
    use_optuna,
)
from xytune.profiler.table import CostTable, TableError, canonical_json, empty_rows, new_meta, read_table, write_table
from xytune.profiler.timing import DEFAULT_TIMING, QUICK_TIMING, TimingPolicy, measure, measure_interleaved, summarize


def default_dtypes(backend: str) -> list[str]:
    """The dtypes a profile tries: each is probed, one that does not run is pruned, the table says which is fast."""
    return ["float32", "bfloat16"] if backend == "cpu" else ["bfloat16", "float16"]


class SweepError(ValueError):
    """A sweep that cannot start (bad settings, a table that cannot be resumed)."""


def m_buckets(max_tokens: int, dense_until: int = 16, per_octave: int = 4) -> list[int]:
    """Token counts to profile: every M up to ``dense_until``, then ``per_octave`` steps per doubling."""
    if max_tokens < 1:
        raise SweepError(f"--max-tokens must be at least 1, got {max_tokens}.")
    buckets = list(range(1, min(dense_until, max_tokens) + 1))
    lo = dense_until
    while lo < max_tokens:
        step = max(1, lo // per_octave)
        buckets.extend(range(lo + step, 2 * lo + 1, step))
        lo *= 2
    out = sorted({b for b in buckets if b <= max_tokens} | {max_tokens})
    return out


def quick_buckets(max_tokens: int) -> list[int]:
    """Powers of two up to ``max_tokens`` (and ``max_tokens`` itself): a coarse, fast sweep."""
    if max_tokens < 1:
        raise SweepError(f"--max-tokens must be at least 1, got {max_tokens}.")
    out, m = [], 1
    while m < max_tokens:
        out.append(m)
        m *= 2
    return out + [max_tokens]


@dataclass
class SweepSettings:
    dtypes: list[str]
    buckets: list[int]
    max_seqs: int = 256  # lm_head only sees the sampled tokens, at most one per sequence
    targets: list[str] | None = None  # GEMM names; None = all
    search: str = "auto"  # auto | grid | optuna
    trials: int = 24
    storage: str | None = None  # Optuna storage: a journal file path or a database URL (see search.open_storage)
    seed: int = 0
    timing: TimingPolicy = field(default_factory=lambda: DEFAULT_TIMING)
    checkpoint_every_s: float = 5.0
    attention: bool = True  # also sweep Meta-Attention tile sizes
    weight_formats: tuple[str, ...] = ("float",)  # GEMM weight formats timed (kernels/quantized.swept_formats)
    quick_attention: bool = False  # one shape per attention tile class

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timing"] = asdict(self.timing)
        d["storage"] = storage_kind(self.storage)  # a database URL may hold a password: the table keeps its kind
        return d

    @classmethod
    def quick(cls, dtypes: list[str], max_tokens: int = 4096, **kw) -> "SweepSettings":
        return cls(dtypes=dtypes, buckets=quick_buckets(max_tokens), timing=QUICK_TIMING, quick_attention=True, **kw)


@dataclass(frozen=True)
class ShapeGroup:
    """One shape of one op for one primitive and dtype: the unit a search runs over."""

    op: str
    target: str
    shape: tuple  # sorted (key, value) pairs, hashable
    primitive: Primitive
    dtype: str

    @property
    def shape_dict(self) -> Shape:
        return dict(self.shape)

    @property
    def study_name(self) -> str:
        return f"{self.op}/{self.target}/{canonical_json(self.shape_dict)}/{self.primitive.name}/{self.dtype}"


def plan_groups(geometry: ModelGeometry, settings: SweepSettings, backend: str,
                usable: Callable[[str, str], list[Primitive]] | None = None) -> list[ShapeGroup]:
    """Every (target GEMM, M bucket, dtype, primitive) to profile, in cache-friendly order.

    ``usable(op, dtype)`` lists the primitives that probed fine on the device (default: every registered one).
    """
    usable = usable or (lambda op, dtype: primitives_for(op, backend, dtype))
    groups = []
    gemms = geometry.gemms()
    if settings.targets:
        unknown = set(settings.targets) - {g.name for g in gemms} - {"attention"}
        if unknown:
            raise SweepError(f"Unknown target(s) {sorted(unknown)}; choose from "
                             f"{[g.name for g in gemms] + ['attention']}.")
        gemms = [g for g in gemms if g.name in settings.targets]
    if not settings.targets or "attention" in settings.targets:
        groups.extend(_attention_groups(geometry, settings, usable))
    for g in gemms:
        for dtype in settings.dtypes:
            prims = [p for p in usable("gemm", dtype) if p.weight_format in settings.weight_formats]
            if not prims:
                raise SweepError(f"No GEMM primitive for {dtype} on {backend}.")
            ms = settings.buckets if g.name != "lm_head" else [m for m in settings.buckets if m <= settings.max_seqs]
            for m in ms:
                shape = tuple(sorted({"m": m, "n": g.n, "k": g.k}.items()))
                groups.extend(ShapeGroup("gemm", g.name, shape, p, dtype) for p in prims)
    return groups


ATTENTION_DECODE = ((8, 256), (32, 512), (64, 2048))  # (requests, longest context) of the decode-class sweep
# (requests, chunk tokens, cached before) of the prefill class: a long prompt, later chunks, a mixed step's chunks
ATTENTION_PREFILL = ((1, 512, 0), (4, 128, 256), (6, 48, 200))
# decodes alone (no speculative verify among them), from a lone request up: where the per-request SDPA loop
# stops beating Meta-Attention for a decode step (AttentionPaths)
PLAIN_DECODE = ((1, 256), (4, 256), (16, 256))
QUICK_ATTENTION_DECODE, QUICK_ATTENTION_PREFILL = ((32, 512),), ((1, 512, 0),)


def _attention_groups(geometry: ModelGeometry, settings: SweepSettings, usable) -> list[ShapeGroup]:
    """Meta-Attention tile classes x key lengths x head packing (the model's GQA group) to profile."""
    if not settings.attention:
        return []
    heads = {"heads": geometry.heads_per_rank, "kv_heads": geometry.kv_heads_per_rank, "k": geometry.head_dim}
    groups = []
    for dtype in settings.dtypes:
        decode = QUICK_ATTENTION_DECODE if settings.quick_attention else ATTENTION_DECODE
        prefill = QUICK_ATTENTION_PREFILL if settings.quick_attention else ATTENTION_PREFILL
        shapes = {"attention.decode": [{"m": m, "n": n, **heads} for m, n in decode],
                  "attention.decode_plain": [{"m": m, "n": n, "verify_every": 0, **heads} for m, n in PLAIN_DECODE],
                  "attention.prefill": [{"m": m, "q": q, "n": n, **heads} for m, q, n in prefill]}
        for p in usable("attention", dtype):
            for target in p.targets or tuple(shapes):
                groups.extend(ShapeGroup("attention", target, tuple(sorted(s.items())), p, dtype)
                              for s in shapes[target])
    return groups


def valid_grid(group: ShapeGroup, device: Device) -> list[Config]:
    p = group.primitive
    return [c for c in p.grid() if p.invalid(group.shape_dict, c, group.dtype, device) is None]


class Sweep:
    """Runs a planned sweep into a cost table at ``out``, checkpointing as it goes."""

    def __init__(self, device: Device, geometry: ModelGeometry, settings: SweepSettings, out: str | Path,
                 resume: bool = False, overwrite: bool = False):
        self.device, self.geometry, self.settings, self.out = device, geometry, settings, Path(out)
        self.pruned: list[Pruned] = []
        self.settings.dtypes = self._runnable_dtypes(settings.dtypes)
        self.groups = plan_groups(geometry, settings, device.backend, self._usable)
        if settings.search not in SEARCHES:
            raise SweepError(f"--search must be one of {', '.join(SEARCHES)}, not {settings.search!r}.")
        if settings.trials < 1:
            raise SweepError(f"--trials must be at least 1, got {settings.trials}.")
        self.table = self._start_table(resume, overwrite)
        try:
            self.storage = open_storage(settings.storage)  # once: every Optuna study of the sweep lives there
        except StorageError as exc:
            raise SweepError(str(exc)) from None
        self.done = self.table.keys()
        self.pending: list[dict] = []
        self.last_row: dict = {}
        self._last_write = time.monotonic()

    def _usable(self, op: str, dtype: str) -> list[Primitive]:
        """The primitives that probed fine here; the others are recorded in ``pruned`` (once)."""
        usable, pruned = usable_primitives(op, self.device, dtype)
        self.pruned.extend(p for p in pruned if p not in self.pruned)
        return usable

    def _runnable_dtypes(self, dtypes: list[str]) -> list[str]:
        """The dtypes in which at least one GEMM primitive runs here (a dtype without any is left out)."""
        keep = [d for d in dtypes if self._usable("gemm", d)]
        if not keep:
            reasons = "; ".join(f"{p.primitive} {p.dtype}: {p.reason}" for p in self.pruned[:3])
            raise SweepError(f"No GEMM primitive runs on {self.device.name} in {', '.join(dtypes)} ({reasons}).")
        return keep

    def _start_table(self, resume: bool, overwrite: bool) -> CostTable:
        if self.out.exists() and not (resume or overwrite):
            raise SweepError(f"{self.out} exists; pass --resume to continue it or --overwrite to replace it.")
        if self.out.exists() and resume:
            try:
                table = read_table(self.out)
            except TableError as exc:
                raise SweepError(f"Cannot resume: {exc}") from None
            fatal, _ = fingerprint_mismatches(table.meta["fingerprint"], self.device.fingerprint())
            if fatal:
                raise SweepError(f"Cannot resume {self.out}: it was measured on another device ({fatal[0]}).")
            if table.meta["geometry"] != self.geometry.to_dict():
                raise SweepError(f"Cannot resume {self.out}: it profiles {table.meta['geometry']['name']}, "
                                 f"not {self.geometry.name}.")
            table.meta["complete"] = False
            table.meta["sweep"] = self.settings.to_dict()
            known = [Pruned(**p) for p in table.meta.get("pruned", [])]
            self.pruned = known + [p for p in self.pruned if p not in known]
            return table
        return CostTable(empty_rows(), {})  # meta filled in by run() once peaks are measured

    # -- rows ------------------------------------------------------------

    def _row(self, group: ShapeGroup, config: Config, samples: list[float]) -> dict:
        shape = group.shape_dict
        flops, nbytes = group.primitive.work(shape, group.dtype)
        stats = summarize(samples)
        return {
            "op": group.op, "target": group.target,
            "m": shape.get("m", -1), "n": shape.get("n", -1), "k": shape.get("k", -1),
            "shape": canonical_json(shape), "primitive": group.primitive.name, "dtype": group.dtype,
            "config": canonical_json(config), "samples_s": samples,
            "process_medians_s": [stats["median_s"]], "n_samples": stats.pop("n"), **stats,
            "flops": flops, "bytes": nbytes,
            **roofline_fraction(flops, nbytes, stats["median_s"], group.dtype, self.table.meta["peaks"]),
        }

    def _key(self, group: ShapeGroup, config: Config) -> tuple:
        return (group.op, group.target, canonical_json(group.shape_dict), group.primitive.name, group.dtype,
                canonical_json(config))

    def _runnable(self, group: ShapeGroup, config: Config):
        """The timed closure of one config after one untimed call, or None (recorded as pruned) if it fails."""
        try:
            fn = group.primitive.make(group.shape_dict, config, group.dtype, self.device)
            with torch.inference_mode():
                fn()
            self.device.synchronize()
            return fn
        except Exception as exc:  # a config this device cannot run: one line in the table, the sweep goes on
            self._prune(group, config, exc)
            return None

    def _prune(self, group: ShapeGroup, config: Config, exc: Exception) -> None:
        self.pruned.append(Pruned(group.primitive.name, group.dtype, failure_reason(exc), canonical_json(config)))

    def _measured(self, group: ShapeGroup, config: Config, fn) -> list[float] | None:
        """Samples of one config, or None (recorded as pruned) when it fails while timed: a kernel that ran
        once can still fail later (a launch out of resources on another stream, an async device error)."""
        try:
            return measure(fn, self.device, self.settings.timing)
        except Exception as exc:
            self._prune(group, config, exc)
            return None

    def _time(self, group: ShapeGroup, config: Config) -> float:
        fn = self._runnable(group, config)
        samples = None if fn is None else self._measured(group, config, fn)
        if samples is None:
            raise ConfigFailed(self.pruned[-1].reason)
        return self._record(group, config, samples)

    def _record(self, group: ShapeGroup, config: Config, samples: list[float]) -> float:
        row = self._row(group, config, samples)
        self.last_row = row
        self.pending.append(row)
        self.done.add(self._key(group, config))
        if time.monotonic() - self._last_write >= self.settings.checkpoint_every_s:
            self.checkpoint()
        return row["median_s"]

    def checkpoint(self, complete: bool = False) -> None:
        if self.pending:
            frames = [f for f in (self.table.rows, pd.DataFrame(self.pending)) if len(f)]
            self.table.rows = pd.concat(frames, ignore_index=True)
            self.pending = []
        self.table.meta["complete"] = complete
        self.table.meta["pruned"] = [p.to_dict() for p in self.pruned]
        write_table(self.out, self.table)
        self._last_write = time.monotonic()

    # -- running -----------------------------------------------------------

    def group_work(self, group: ShapeGroup) -> int:
        """How many timed configs a group contributes (the progress bar's unit)."""
        if use_optuna(group.primitive, self.settings.search):
            return min(self.settings.trials, len(valid_grid(group, self.device)))
        return len(valid_grid(group, self.device))

    def unmeasured(self) -> list[ShapeGroup]:
        """The planned groups the table has no row of yet: all of them for a new table; for a resumed one, what
        the sweep plans now and the table lacks (a group added since it was made, or one not reached)."""
        return [g for g in self.groups if self._group_rows(g).empty]

    def _group_rows(self, group: ShapeGroup) -> pd.DataFrame:
        op, target, shape, prim, dtype, _ = self._key(group, {})
        r = self.table.rows
        return r[(r["op"] == op) & (r["target"] == target) & (r["shape"] == shape)
                 & (r["primitive"] == prim) & (r["dtype"] == dtype)]

    def _adopt_shared_rows(self, study) -> None:
        """Add rows that other workers of a shared Optuna study timed (the table is the record)."""
        for t in study.trials:
            row = t.user_attrs.get("row")
            if row is not None:
                key = tuple(row[c] for c in ("op", "target", "shape", "primitive", "dtype", "config"))
                if key not in self.done:
                    self.pending.append(row)
                    self.done.add(key)

    def run_group(self, group: ShapeGroup, advance: Callable[[int], None] = lambda n: None) -> None:
        if use_optuna(group.primitive, self.settings.search):
            existing = self._group_rows(group)
            done = dict(zip(existing["config"], existing["median_s"]))

            def objective(config):
                seconds = self._time(group, config)
                advance(1)
                return seconds

            advance(min(len(done), self.group_work(group)))
            study = optuna_search(group.primitive, group.shape_dict, group.dtype, self.device, objective,
                                  self.settings.trials, done=done, study_name=group.study_name,
                                  storage=self.storage, seed=self.settings.seed,
                                  trial_attrs=lambda: {"row": self.last_row})
            self._adopt_shared_rows(study)
            return
        grid = valid_grid(group, self.device)
        advance(len(grid) - len(todo := [c for c in grid if self._key(group, c) not in self.done]))
        # a grid's configs are compared with each other: time them in turns (see measure_interleaved)
        runnable = [(c, fn) for c in todo if (fn := self._runnable(group, c)) is not None]
        advance(len(todo) - len(runnable))
        try:
            timed = measure_interleaved([fn for _, fn in runnable], self.device, self.settings.timing)
        except Exception:  # one config failed while timed: time them one at a time, so only that one is pruned
            timed = [self._measured(group, config, fn) for config, fn in runnable]
        for (config, _), samples in zip(runnable, timed):
            if samples is not None:
                self._record(group, config, samples)
            advance(1)

    def run(self, progress: bool = True) -> CostTable:
        """Measure peaks (fresh tables only), then every group; returns the completed table."""
        keep_freed_memory()  # time the primitives under the engine's allocator settings
        if not self.table.meta:
            peaks = measure_peaks(self.device, self.settings.dtypes)
            self.table.meta = new_meta(self.device.fingerprint(), self.geometry.to_dict(), peaks,
                                       self.settings.to_dict())
            self.checkpoint()
        tuning = self.table.meta.setdefault("tuning", {})
        missing = [d for d in self.settings.dtypes if d not in tuning]
        if missing:  # the machine constants the kernels switch on (a resumed table keeps its own)
            tuning.update(measure_tuning(self.device, missing, self.geometry))
        try:
            self._run_groups(self.groups, progress)
        except BaseException:
            self.checkpoint(complete=False)  # Ctrl-C / SIGTERM / error: keep what was measured
            raise
        finally:
            release_operands()
        self._finish_tuning()
        self.checkpoint(complete=True)
        return self.table

    def _finish_tuning(self) -> None:
        """Constants that come from the rows themselves (the measurements' own spread)."""
        self.checkpoint()  # pending rows into the table
        rows = self.table.rows
        for dtype, figures in self.table.meta["tuning"].items():
            figures["split_margin"] = split_margin(rows[rows["dtype"] == dtype])

    def _run_groups(self, groups: Iterable[ShapeGroup], progress: bool) -> None:
        if not progress:
            for g in groups:
                self.run_group(g)
            return

        total = sum(self.group_work(g) for g in self.groups)
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("profiling", total=total)
            for g in groups:
                bar.update(task, description=f"{g.target} M={g.shape_dict.get('m')} {g.primitive.name} {g.dtype}")
                self.run_group(g, advance=lambda n: bar.advance(task, n))
