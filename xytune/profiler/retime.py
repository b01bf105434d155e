"""Re-timing rows of an existing table on the device that made it (``xytune retime``): the second look a
CI regression check takes at the rows a comparison found suspicious."""

from __future__ import annotations

import json
import os
import select
from pathlib import Path

import torch

from xytune.profiler.devices import Device, fingerprint_mismatches
from xytune.profiler.peaks import roofline_fraction
from xytune.profiler.primitives import REGISTRY
from xytune.profiler.sweep import SweepError
from xytune.profiler.table import KEY_COLUMNS, TableError, read_table, write_table
from xytune.profiler.timing import TimingPolicy, measure, summarize


class Turns:
    """Two processes taking turns: base and head of a CI check, each with its own commit installed, time the
    same rows one after the other, row by row, so a slow phase of a shared machine falls on both alike
    (separate runs a minute apart do not compare row by row on a noisy runner).

    Each process blocks on its own FIFO in ``folder`` until the other hands it the turn by writing a byte
    there; a waiting process uses no CPU. The first process's first turn also waits: the second hands it
    over when it is ready to time, so the first rows are not timed while the other process still starts up
    (imports, reading its table) on the same cores. POSIX only; give both processes a fresh folder.
    """

    def __init__(self, folder: Path, first: bool, timeout_s: float = 600.0):
        me, other = ("first", "second") if first else ("second", "first")
        folder.mkdir(parents=True, exist_ok=True)
        for name in (me, other):
            try:
                os.mkfifo(folder / name)
            except FileExistsError:
                pass
        self._mine = os.open(folder / me, os.O_RDWR)  # read-write: opening does not wait for the other side
        self._theirs = os.open(folder / other, os.O_RDWR)
        self._has_turn, self._started, self.timeout_s = False, first, timeout_s

    def take(self) -> None:
        if not self._started:  # the second process: ready, so the first may start
            self._started = True
            self.hand_over()
        if self._has_turn:
            return
        ready, _, _ = select.select([self._mine], [], [], self.timeout_s)
        if not ready:
            raise SweepError(f"the other re-timing process did not hand over its turn within {self.timeout_s:g} s "
                             "(is it running, with the same rows and rounds?).")
        os.read(self._mine, 1)
        self._has_turn = True

    def hand_over(self) -> None:
        os.write(self._theirs, b"t")
        self._has_turn = False

    def close(self) -> None:
        os.close(self._mine)
        os.close(self._theirs)


def retime_rows(path: Path, device: Device, keys: list[dict], fresh: bool = False, rounds: int = 1,
                turns: Turns | None = None) -> int:
    """Time the rows of the table at ``path`` named by ``keys`` again, ``rounds`` times, and pool the new
    samples with theirs (``fresh``: the first round replaces them).

    A CI job times the rows a comparison found suspicious again, base and head taking turns (as asv's
    ``continuous`` does), so a slow minute of a shared runner does not decide the verdict. With ``turns``
    the two processes alternate row by row (both must be given the same keys and rounds: a key this table
    lacks still takes its turn). Each call appends the median of its own samples to a row's
    ``process_medians_s`` (``fresh``: in place of the earlier ones), so calls in separate processes give
    ``compare`` the spread between processes. Rows keep the table's timing policy. Returns the number of
    rows re-timed.
    """
    try:
        table = read_table(path)
    except TableError as exc:
        raise SweepError(str(exc)) from None
    fatal, _ = fingerprint_mismatches(table.meta["fingerprint"], device.fingerprint())
    if fatal:
        raise SweepError(f"{path} was measured on another device ({fatal[0]}); re-time it there.")
    if rounds < 1:
        raise SweepError(f"rounds must be at least 1, got {rounds}.")
    try:
        wanted = list(dict.fromkeys(tuple(str(k[c]) for c in KEY_COLUMNS) for k in keys))
    except (KeyError, TypeError):
        raise SweepError(f"each row to re-time needs {', '.join(KEY_COLUMNS)}.") from None
    timing = TimingPolicy(**table.meta["sweep"]["timing"])
    rows = table.rows
    index = {tuple(str(rows.at[i, c]) for c in KEY_COLUMNS): i for i in rows.index}
    this_call: dict[int, list[float]] = {}
    for _ in range(rounds):
        for key in wanted:
            if turns is not None:
                turns.take()
            i = index.get(key)
            if i is not None and rows.at[i, "primitive"] in REGISTRY:
                this_call.setdefault(i, []).extend(_time_again(rows, i, device, timing))
            if turns is not None:
                turns.hand_over()
    for i, samples in this_call.items():
        earlier = [] if fresh else list(rows.at[i, "samples_s"])
        earlier_processes = [] if fresh else list(rows.at[i, "process_medians_s"])
        _set_samples(rows, i, earlier + samples, table.meta["peaks"])
        rows.at[i, "process_medians_s"] = earlier_processes + [summarize(samples)["median_s"]]
    write_table(path, table)
    return len(this_call)


def _time_again(rows, i, device: Device, timing: TimingPolicy) -> list[float]:
    """New samples of row ``i``, timed as the table's sweep timed it."""
    row = rows.loc[i]
    shape, config = json.loads(row["shape"]), json.loads(row["config"])
    fn = REGISTRY[row["primitive"]].make(shape, config, row["dtype"], device)
    with torch.inference_mode():
        fn()
    return measure(fn, device, timing)


def _set_samples(rows, i, samples: list[float], peaks: dict) -> None:
    """Row ``i``'s samples and the statistics that follow from them."""
    row = rows.loc[i]
    stats = summarize(samples)
    stats["n_samples"] = stats.pop("n")
    stats.update(roofline_fraction(row["flops"], row["bytes"], stats["median_s"], row["dtype"], peaks))
    rows.at[i, "samples_s"] = samples
    for column, value in stats.items():
        rows.at[i, column] = value
