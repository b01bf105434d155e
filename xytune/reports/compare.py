"""Regression report between two cost tables (the CI job's gate).

Rows are matched on their key. A row regressed when its median grew beyond
the threshold *and* a Mann-Whitney U test on the raw samples says the shift
is real (as asv does), so run-to-run noise neither passes nor fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from xytune.profiler.devices import fingerprint_mismatches
from xytune.profiler.table import KEY_COLUMNS, CostTable


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

    @property
    def regressions(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "regressed"].sort_values("ratio", ascending=False)

    @property
    def improvements(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "improved"].sort_values("ratio")


def _p_value(base: list[float], new: list[float]) -> float:
    if len(base) < 2 or len(new) < 2:
        return 1.0
    if np.ptp(np.concatenate([base, new])) == 0:
        return 1.0
    return float(mannwhitneyu(new, base, alternative="two-sided").pvalue)


def compare_tables(base: CostTable, new: CostTable, threshold: float = 0.10, alpha: float = 0.05,
                   allow_mismatch: bool = False) -> Comparison:
    """Row-by-row regression test of ``new`` against ``base``.

    Tables of different devices (backend, device name, cores, threads, ISA features) measure different
    machines, not a regression: refused unless ``allow_mismatch``, which keeps the differences for the
    report's warning.
    """
    if threshold < 0:
        raise CompareError(f"--threshold must be >= 0, got {threshold}.")
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
    merged = base.rows.merge(new.rows, on=KEY_COLUMNS, suffixes=("_base", "_new"), how="outer", indicator=True)
    only_base = int((merged["_merge"] == "left_only").sum())
    only_new = int((merged["_merge"] == "right_only").sum())
    both = merged[merged["_merge"] == "both"].copy()
    if both.empty:
        raise CompareError("The tables have no (op, shape, primitive, dtype, config) row in common.")
    both["ratio"] = both["median_s_new"] / both["median_s_base"]
    both["p_value"] = [_p_value(b, n) for b, n in zip(both["samples_s_base"], both["samples_s_new"])]
    significant = both["p_value"] < alpha
    both["status"] = np.select(
        [significant & (both["ratio"] > 1 + threshold), significant & (both["ratio"] < 1 - threshold)],
        ["regressed", "improved"], default="unchanged",
    )
    keep = KEY_COLUMNS + ["m_base", "median_s_base", "median_s_new", "ratio", "p_value", "status"]
    out = both[keep].rename(columns={"m_base": "m"}).reset_index(drop=True)
    return Comparison(out, only_base, only_new, threshold, alpha, mismatch)


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
    lines += [
        f"**{verdict}** (threshold {c.threshold:.0%}, Mann-Whitney U alpha {c.alpha})", "",
        f"- base: `{base_name}`", f"- new: `{new_name}`",
        f"- rows compared: {len(c.rows)}; regressed: {len(reg)}; improved: {len(imp)}; "
        f"unchanged: {len(c.rows) - len(reg) - len(imp)}",
        f"- rows only in base: {c.only_base}; only in new: {c.only_new}",
        f"- geometric-mean ratio new/base: {float(np.exp(np.log(c.rows['ratio']).mean())):.3f}", "",
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
