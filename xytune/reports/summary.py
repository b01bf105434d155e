"""What a cost table says, for people (``xytune show``) and for scripts (``--format json``)."""

from __future__ import annotations

import json

import pandas as pd
from rich.table import Table

from xytune.profiler.table import CostTable


def best_per_bucket(rows: pd.DataFrame) -> pd.DataFrame:
    """The fastest (primitive, config) for each op, target, dtype and shape (for GEMMs: each M)."""
    idx = rows.groupby(["op", "target", "dtype", "shape"])["median_s"].idxmin()
    cols = ["op", "target", "dtype", "m", "n", "k", "primitive", "config", "median_s", "frac_peak"]
    return rows.loc[idx, cols].sort_values(["op", "target", "dtype", "m"]).reset_index(drop=True)


def summarize_table(table: CostTable) -> dict:
    rows, meta = table.rows, table.meta
    best = best_per_bucket(rows)
    return {
        "complete": table.complete,
        "schema_version": meta["schema_version"],
        "xytune_version": meta.get("xytune_version"),
        "created_at": meta.get("created_at"),
        "updated_at": meta.get("updated_at"),
        "fingerprint": meta["fingerprint"],
        "geometry": meta["geometry"],
        "peaks": meta["peaks"],
        "tuning": meta.get("tuning", {}),
        "pruned": meta.get("pruned", []),
        "counts": {
            "rows": int(len(rows)),
            "ops": sorted(set(rows["op"])),
            "targets": sorted(set(rows["target"])),
            "primitives": sorted(set(rows["primitive"])),
            "dtypes": sorted(set(rows["dtype"])),
            "m_buckets": int(rows["m"].nunique()),
            "samples": int(rows["n_samples"].sum()),
        },
        "best": [
            {**r, "config": json.loads(r["config"]), "m": int(r["m"]), "n": int(r["n"]), "k": int(r["k"])}
            for r in best.to_dict("records")
        ],
    }


def render_summary(summary: dict, console) -> None:
    """Print ``summary`` with rich tables."""
    fp, counts, peaks = summary["fingerprint"], summary["counts"], summary["peaks"]
    state = "complete" if summary["complete"] else "[yellow]partial (sweep did not finish)[/]"
    console.print(f"[bold]{fp.get('device_name')}[/] ({fp.get('backend')}, {fp.get('compute_units')} units, "
                  f"threads={fp.get('threads')}), torch {fp.get('torch')}, xytune {summary['xytune_version']}")
    console.print(f"model {summary['geometry']['name']} tp={summary['geometry']['tp']}; {counts['rows']} rows, "
                  f"{counts['samples']} samples, {counts['m_buckets']} M buckets; {state}; "
                  f"created {summary['created_at']}")
    flops = ", ".join(f"{dt} {v / 1e9:,.1f} GFLOP/s" for dt, v in peaks["gemm_flops"].items())
    console.print(f"peaks: {flops}; copy {peaks['copy_bytes_per_s'] / 1e9:,.1f} GB/s")
    cpu = [fp[k] for k in ("cpu_model", "cpu_caches") if fp.get(k)]
    if cpu:
        console.print(f"CPU: {'; '.join(cpu)}", highlight=False)
    isa = fp.get("isa")
    if isa is not None:
        console.print(f"ISA: {' '.join(isa) or 'none of the tracked features'}", highlight=False)
    for dtype, figures in summary["tuning"].items():
        console.print(f"measured constants ({dtype}): "
                      + ", ".join(f"{k} {v:.3g}" for k, v in sorted(figures.items())), highlight=False)
    if summary["pruned"]:
        console.print(f"[yellow]{len(summary['pruned'])} pruned (cannot run on this device):[/]")
        for p in summary["pruned"]:
            config = f" {p['config']}" if p.get("config") else ""
            console.print(f"  {p['primitive']} {p['dtype']}{config}: {p['reason']}", highlight=False, markup=False)
    t = Table("op", "target", "dtype", "M", "best primitive", "config", "median us", "of peak", title="Best per bucket")
    for r in summary["best"]:
        t.add_row(r["op"], r["target"], r["dtype"], str(r["m"]), r["primitive"],
                  json.dumps(r["config"]) if r["config"] else "-", f"{r['median_s'] * 1e6:,.1f}",
                  f"{r['frac_peak']:.0%}")
    console.print(t)
