"""Re-timing rows of an existing table on the device that made it (``xytune retime``): the second look a
CI regression check takes at the rows a comparison found suspicious."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xytune.profiler.devices import Device, fingerprint_mismatches
from xytune.profiler.peaks import roofline_fraction
from xytune.profiler.primitives import REGISTRY
from xytune.profiler.sweep import SweepError
from xytune.profiler.table import KEY_COLUMNS, TableError, read_table, write_table
from xytune.profiler.timing import TimingPolicy, measure, summarize


def retime_rows(path: Path, device: Device, keys: list[dict], fresh: bool = False) -> int:
    """Time the rows of the table at ``path`` named by ``keys`` again and pool the new samples with theirs
    (``fresh``: replace them).

    A CI job times the rows a comparison found suspicious again, base and head taking turns (as asv's
    ``continuous`` does), so a slow minute of a shared runner does not decide the verdict; the first round
    replaces the samples of the separate runs, the next ones add to them. Rows keep the table's timing
    policy; keys the table lacks are skipped. Returns the number of rows re-timed.
    """
    try:
        table = read_table(path)
    except TableError as exc:
        raise SweepError(str(exc)) from None
    fatal, _ = fingerprint_mismatches(table.meta["fingerprint"], device.fingerprint())
    if fatal:
        raise SweepError(f"{path} was measured on another device ({fatal[0]}); re-time it there.")
    try:
        wanted = {tuple(str(k[c]) for c in KEY_COLUMNS) for k in keys}
    except (KeyError, TypeError):
        raise SweepError(f"each row to re-time needs {', '.join(KEY_COLUMNS)}.") from None
    timing = TimingPolicy(**table.meta["sweep"]["timing"])
    rows = table.rows
    retimed = 0
    for i in rows.index:
        row = rows.loc[i]
        if tuple(str(row[c]) for c in KEY_COLUMNS) not in wanted or row["primitive"] not in REGISTRY:
            continue
        shape, config = json.loads(row["shape"]), json.loads(row["config"])
        fn = REGISTRY[row["primitive"]].make(shape, config, row["dtype"], device)
        with torch.inference_mode():
            fn()
        samples = ([] if fresh else list(row["samples_s"])) + measure(fn, device, timing)
        stats = summarize(samples)
        stats["n_samples"] = stats.pop("n")
        stats.update(roofline_fraction(row["flops"], row["bytes"], stats["median_s"], row["dtype"],
                                       table.meta["peaks"]))
        rows.at[i, "samples_s"] = samples
        for column, value in stats.items():
            rows.at[i, column] = value
        retimed += 1
    write_table(path, table)
    return retimed
