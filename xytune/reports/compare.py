"""Regression report between two cost tables (the CI job's gate).

Rows are matched on their key. A row regressed when its median grew beyond
the threshold *and* a Mann-Whitney U test on the raw samples says the shift
is real (as asv does), so run-to-run noise neither passes nor fails CI. A row
timed in two or more processes on each side (``xytune retime`` calls) must
also be slower in every new process than in every base process: a process can
run one kernel 30% off as a whole, which pooling its samples does not show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from xytune.profiler.devices import fingerprint_mismatches
from xytune.profiler.table import KEY_COLUMNS, CostTable, with_process_medians
from xytune.reports import DEFAULT_ALPHA, DEFAULT_THRESHOLD


class CompareError(ValueError):
    """The two tables cannot be compared (exit code 2)."""


@dataclass
class Comparison:
    rows: pd.DataFrame  # one per common key: ratio, p_value, status
    only_base: int
    only_new: int
    threshold: float
    alpha: float
    mismatch: list[str] = field(default_factory=list)  # device differences the user allowed (--allow-mismatch)
    partial: list[str] = field(default_factory=list)  # "base"/"new": tables an interrupted sweep left (--allow-partial)
    drift: float = 1.0  # median new/base ratio over all rows: how the machine's speed moved between the runs
    held_back: int = 0  # rows slower beyond the threshold by the samples, but not in every process

    @property
    def regressions(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "regressed"].sort_values("ratio", ascending=False)

    @property
    def improvements(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "improved"].sort_values("ratio")

    @property
    def suspects(self) -> pd.DataFrame:
        """Rows slower beyond the threshold, significant or not: what a re-run should time again before a
        verdict (asv's ``continuous`` re-runs the benchmarks that changed, both sides taking turns)."""
        return self.rows[self.rows["ratio"] > 1 + self.threshold]


def _p_value(base: list[float], new: list[float]) -> float:
    if len(base) < 2 or len(new) < 2:
        return 1.0
    if np.ptp(np.concatenate([base, new])) == 0:
        return 1.0
    return float(mannwhitneyu(new, base, alternative="two-sided").pvalue)


def _processes_apart(base: list[float], new: list[float]) -> tuple[bool, bool]:
    """(every new process slower than every base process, every one faster); both true where a side was
    timed in one process only, which leaves the verdict to the samples."""
    if len(base) < 2 or len(new) < 2:
        return True, True
    return min(new) > max(base), max(new) < min(base)


def compare_tables(base: CostTable, new: CostTable, threshold: float = DEFAULT_THRESHOLD,
                   alpha: float = DEFAULT_ALPHA, allow_mismatch: bool = False,
                   allow_partial: bool = False) -> Comparison:
    """Row-by-row regression test of ``new`` against ``base``.

    Two separate runs on one shared runner differ by 10-30% as a whole, and not alike for every row (small
    GEMMs and large ones move differently), so neither a per-row test nor dividing by the median ratio (the
    drift, which the report shows) tells a code change from the machine; timing the suspects again with
    base and head taking turns does (``suspects``, ``xytune retime``; see docs/benchmarks.md).

    Tables of different devices (backend, device name, cores, threads, ISA features) measure different
    machines, not a regression: refused unless ``allow_mismatch``, which keeps the differences for the
    report's warning. A table an interrupted sweep left is missing rows that a complete one has, so its
    counts mislead: refused unless ``allow_partial``, which flags it in the report.
    """
    if threshold < 0:
        raise CompareError(f"--threshold must be >= 0, got {threshold}.")
    if not 0 < alpha < 1:
        raise CompareError(f"--alpha must be in (0, 1), got {alpha}.")
    partial = [name for name, t in (("base", base), ("new", new)) if not t.complete]
    if partial and not allow_partial:
        raise CompareError(f"The {' and '.join(partial)} table is partial (its sweep did not finish); finish it "
                           "with `xytune profile --resume`, or pass --allow-partial to compare the rows it has.")
    mismatch, _ = fingerprint_mismatches(base.meta.get("fingerprint", {}), new.meta.get("fingerprint", {}))
    if mismatch and not allow_mismatch:
        raise CompareError(f"The tables were measured on different devices ({'; '.join(mismatch)}); "
                           "pass --allow-mismatch to compare them anyway.")
    gb, gn = base.meta.get("geometry"), new.meta.get("geometry")
    if gb != gn:
        raise CompareError(f"The tables profile different models ({gb.get('name')} vs {gn.get('name')}); "
                           "compare tables of one geometry.")
    ops_b, ops_n = set(base.rows["op"]), set(new.rows["op"])
    if ops_b != ops_n:
        raise CompareError(f"The tables hold different ops ({sorted(ops_b)} vs {sorted(ops_n)}).")
    merged = with_process_medians(base.rows).merge(with_process_medians(new.rows), on=KEY_COLUMNS, suffixes=("_base", "_new"), how="outer", indicator=True)
    only_base = int((merged["_merge"] == "left_only").sum())
    only_new = int((merged["_merge"] == "right_only").sum())
    both = merged[merged["_merge"] == "both"].copy()
    if both.empty:
        raise CompareError("The tables have no (op, shape, primitive, dtype, config) row in common.")
    both["ratio"] = both["median_s_new"] / both["median_s_base"]
    drift = float(np.exp(np.median(np.log(both["ratio"]))))
    both["p_value"] = [_p_value(b, n) for b, n in zip(both["samples_s_base"], both["samples_s_new"])]
    significant = both["p_value"] < alpha
    both["processes"] = [min(len(b), len(n)) for b, n in zip(both["process_medians_s_base"],
                                                               both["process_medians_s_new"])]
    slower, faster = zip(*(_processes_apart(b, n) for b, n in zip(both["process_medians_s_base"],
                                                                  both["process_medians_s_new"])))
    both["status"] = np.select(
        [significant & (both["ratio"] > 1 + threshold) & np.array(slower),
         significant & (both["ratio"] < 1 - threshold) & np.array(faster)],
        ["regressed", "improved"], default="unchanged",
    )
    held_back = int((significant & (both["ratio"] > 1 + threshold) & ~np.array(slower)).sum())
    keep = KEY_COLUMNS + ["m_base", "median_s_base", "median_s_new", "ratio", "p_value", "processes", "status"]
    out = both[keep].rename(columns={"m_base": "m"}).reset_index(drop=True)
    return Comparison(out, only_base, only_new, threshold, alpha, mismatch, partial, drift, held_back)


def _fmt_us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def markdown_report(c: Comparison, base_name: str, new_name: str, limit: int = 50) -> str:
    """A report fit for a CI job summary: verdict, counts, worst regressions first."""
    reg, imp = c.regressions, c.improvements
    verdict = "FAIL: significant regressions" if len(reg) else "PASS: no significant regression"
    lines = ["# xytune cost-table comparison", ""]
    if c.mismatch:
        lines += [f"> **Warning: the tables come from different devices** ({'; '.join(c.mismatch)}); "
                  "differences below may be the machines', not a regression.", ""]
    if abs(c.drift - 1) > c.threshold:
        lines += [f"> **Warning: the whole new table is x{c.drift:.2f} the base** (median over all rows): the "
                  "machine ran at another speed, or a change moved every row; re-time the suspects with base and "
                  "new taking turns (`xytune retime`) before trusting the verdict.", ""]
    if c.partial:
        lines += [f"> **Warning: the {' and '.join(c.partial)} table is partial** (its sweep did not finish); "
                  "only the rows both tables have are compared.", ""]
    lines += [
        f"**{verdict}** (threshold {c.threshold:.0%}, Mann-Whitney U alpha {c.alpha})", "",
        f"- base: `{base_name}`", f"- new: `{new_name}`",
        f"- rows compared: {len(c.rows)}; regressed: {len(reg)}; improved: {len(imp)}; "
        f"unchanged: {len(c.rows) - len(reg) - len(imp)}",
        f"- rows only in base: {c.only_base}; only in new: {c.only_new}",
        f"- rows timed in two or more processes on each side: {int((c.rows['processes'] >= 2).sum())}; slower "
        f"by their samples but not in every process, so not counted: {c.held_back}",
        f"- geometric-mean ratio new/base: {float(np.exp(np.log(c.rows['ratio']).mean())):.3f}; median: "
        f"{c.drift:.3f}", "",
    ]
    for title, frame in (("Regressions (worst first)", reg), ("Improvements (best first)", imp)):
        if frame.empty:
            continue
        lines += [f"## {title}", "", "| op | target | M | primitive | dtype | config | base us | new us | ratio | p |",
                  "|---|---|---:|---|---|---|---:|---:|---:|---:|"]
        for r in frame.head(limit).itertuples(index=False):
            lines.append(f"| {r.op} | {r.target} | {r.m} | {r.primitive} | {r.dtype} | `{r.config}` | "
                         f"{_fmt_us(r.median_s_base)} | {_fmt_us(r.median_s_new)} | {r.ratio:.3f} | {r.p_value:.3g} |")
        if len(frame) > limit:
            lines.append(f"| ... {len(frame) - limit} more | | | | | | | | | |")
        lines.append("")
    return "\n".join(lines)


def plot_ratios(c: Comparison, out: str | Path) -> Path:
    """new/base median ratio against M, one panel per target, one line per primitive; regressions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = c.rows
    targets = list(dict.fromkeys(rows["target"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.8), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets):
        g = rows[rows["target"] == target]
        for (prim, dtype), line in g.groupby(["primitive", "dtype"]):
            best = line.groupby("m")["ratio"].median()  # configs of one primitive: their median ratio per M
            ax.plot(best.index, best.values, marker=".", linewidth=1, label=f"{prim} {dtype}")
        bad = g[g["status"] == "regressed"]
        ax.scatter(bad["m"], bad["ratio"], s=40, facecolors="none", edgecolors="red", label="regressed")
        for y in (1 - c.threshold, 1, 1 + c.threshold):
            ax.axhline(y, color="grey", linewidth=0.8, linestyle="-" if y == 1 else ":")
        ax.set_xscale("log", base=2)
        ax.set_title(target)
        ax.set_xlabel("M (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("new / base median")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
