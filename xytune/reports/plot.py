"""``xytune plot``: latency and fraction of peak against M, one line per primitive."""

from __future__ import annotations

from pathlib import Path

from xytune.profiler.table import CostTable
from xytune.reports.summary import best_per_bucket


def plot_table(table: CostTable, out: str | Path, dtype: str | None = None) -> Path:
    """One column of panels per GEMM target: latency (top) and fraction of peak (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.rows
    dtype = dtype or rows["dtype"].iloc[0]
    rows = rows[rows["dtype"] == dtype]
    if rows.empty:
        raise ValueError(f"the table has no rows in {dtype}.")
    best_cfg = rows.loc[rows.groupby(["target", "primitive", "m"])["median_s"].idxmin()]
    winners = best_per_bucket(rows)
    targets = list(dict.fromkeys(rows["target"]))
    fig, axes = plt.subplots(2, len(targets), figsize=(4.2 * len(targets), 7), squeeze=False, sharex="col")
    for col, target in enumerate(targets):
        lat_ax, frac_ax = axes[0][col], axes[1][col]
        for prim, g in best_cfg[best_cfg["target"] == target].groupby("primitive"):
            g = g.sort_values("m")
            lat_ax.plot(g["m"], g["median_s"] * 1e6, marker=".", label=prim, linewidth=1)
            frac_ax.plot(g["m"], g["frac_peak"], marker=".", linewidth=1)
        w = winners[winners["target"] == target]
        lat_ax.scatter(w["m"], w["median_s"] * 1e6, s=40, facecolors="none", edgecolors="black", label="best")
        frac_ax.scatter(w["m"], w["frac_peak"], s=40, facecolors="none", edgecolors="black")
        n, k = int(w["n"].iloc[0]), int(w["k"].iloc[0])
        lat_ax.set_title(f"{target} (N={n}, K={k}) {dtype}")
        for ax in (lat_ax, frac_ax):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        lat_ax.set_yscale("log")
        lat_ax.set_ylabel("latency (us)")
        frac_ax.set_ylabel("fraction of roofline")
        frac_ax.set_xlabel("M (tokens)")
        lat_ax.legend(fontsize=7)
    fp = table.meta["fingerprint"]
    fig.suptitle(f"{table.meta['geometry']['name']} on {fp.get('device_name')} ({fp.get('backend')})")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
