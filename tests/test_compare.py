import numpy as np
import pytest
from conftest import resampled

from xytune.profiler.table import KEY_COLUMNS, CostTable
from xytune.reports.compare import CompareError, compare_tables, markdown_report


def test_injected_20_percent_regression_is_found(synthetic_table):
    base = resampled(synthetic_table, noise=0.02, seed=1)
    slowed = [3, 17, 40]
    new = resampled(synthetic_table, scale_rows=slowed, factor=1.2, noise=0.02, seed=2)
    c = compare_tables(base, new, threshold=0.10)
    key = ["target", "m", "primitive"]
    expected = set(map(tuple, new.rows.loc[slowed, key].itertuples(index=False)))
    assert set(map(tuple, c.regressions[key].itertuples(index=False))) == expected
    assert c.regressions["ratio"].between(1.1, 1.35).all()
    report = markdown_report(c, "base.parquet", "new.parquet")
    assert "FAIL" in report and "Regressions (worst first)" in report
    assert report.count("| gemm |") == len(slowed)


def test_noise_within_threshold_is_ignored(synthetic_table):
    base = resampled(synthetic_table, noise=0.03, seed=1)
    new = resampled(synthetic_table, scale_rows=list(range(0, 90, 7)), factor=1.05, noise=0.03, seed=2)
    c = compare_tables(base, new, threshold=0.10)
    assert c.regressions.empty
    assert "PASS" in markdown_report(c, "a", "b")


def test_significance_gate_ignores_one_noisy_outlier(synthetic_table):
    base = resampled(synthetic_table, noise=0.02, seed=1)
    new = resampled(synthetic_table, noise=0.02, seed=2)
    # One huge sample on a row moves its mean, not its median or its rank test.
    new.rows.at[5, "samples_s"] = new.rows.at[5, "samples_s"][:-1] + [10.0]
    assert compare_tables(base, new).regressions.empty


def test_different_geometry_or_ops_cannot_be_compared(synthetic_table):
    other = CostTable(synthetic_table.rows.copy(), {**synthetic_table.meta,
                                                    "geometry": {**synthetic_table.meta["geometry"], "tp": 2}})
    with pytest.raises(CompareError, match="different models"):
        compare_tables(synthetic_table, other)
    ops = CostTable(synthetic_table.rows.assign(op="attention"), dict(synthetic_table.meta))
    with pytest.raises(CompareError, match="different ops"):
        compare_tables(synthetic_table, ops)


def test_tables_of_different_devices_are_refused_unless_allowed(synthetic_table):
    """A Zen 3 table against an AVX-512 one measures two machines, not a regression."""
    fp = synthetic_table.meta["fingerprint"]
    other = CostTable(synthetic_table.rows.copy(), {**synthetic_table.meta,
                                                    "fingerprint": {**fp, "isa": ["avx2", "fma"]}})
    base = CostTable(synthetic_table.rows.copy(), {**synthetic_table.meta,
                                                   "fingerprint": {**fp, "isa": ["avx2", "avx512f", "fma"]}})
    with pytest.raises(CompareError, match="different devices.*isa"):
        compare_tables(base, other)
    c = compare_tables(base, other, allow_mismatch=True)
    report = markdown_report(c, "a", "b")
    assert report.splitlines()[2].startswith("> **Warning: the tables come from different devices**")
    assert "isa" in report.splitlines()[2]
    # software versions alone do not make another device
    newer = CostTable(synthetic_table.rows.copy(), {**synthetic_table.meta, "fingerprint": {**fp, "torch": "9.9"}})
    assert not compare_tables(synthetic_table, newer).mismatch


def test_partial_tables_are_refused_unless_allowed_and_then_flagged(synthetic_table):
    partial = CostTable(synthetic_table.rows.iloc[:40].copy(), {**synthetic_table.meta, "complete": False})
    with pytest.raises(CompareError, match="new table is partial"):
        compare_tables(synthetic_table, partial)
    c = compare_tables(synthetic_table, partial, allow_partial=True)
    assert c.partial == ["new"] and len(c.rows) == 40 and c.only_base == len(synthetic_table.rows) - 40
    assert "Warning: the new table is partial" in markdown_report(c, "a", "b")


def test_suspects_are_the_rows_beyond_the_threshold_significant_or_not(synthetic_table):
    """Five samples a side cannot reach alpha 0.002 (the smallest two-sided p is 0.008): such a row is a
    suspect for re-timing, not a regression."""
    base, new = resampled(synthetic_table, noise=0.02, seed=1), resampled(synthetic_table, scale_rows=[2, 30],
                                                                       factor=1.3, noise=0.02, seed=2)
    for t in (base, new):
        t.rows["samples_s"] = t.rows["samples_s"].map(lambda s: s[:5])
    c = compare_tables(base, new)
    key = ["target", "m", "primitive"]
    slowed = set(map(tuple, new.rows.loc[[2, 30], key].itertuples(index=False)))
    assert c.regressions.empty and set(map(tuple, c.suspects[key].itertuples(index=False))) == slowed
    assert not compare_tables(base, new, alpha=0.05).regressions.empty


def test_a_whole_run_drift_is_reported_and_its_rows_are_suspects(synthetic_table):
    """Two runs on a shared runner differ as a whole: every row is significantly slower, and the report says
    the whole table moved, so the suspects get timed again (base and head in turns) before a verdict."""
    base = resampled(synthetic_table, noise=0.02, seed=1)
    n = len(base.rows)
    new = resampled(synthetic_table, scale_rows=list(range(n)), factor=1.2, noise=0.02, seed=2)
    c = compare_tables(base, new)
    assert c.drift == pytest.approx(1.2, rel=0.03)
    assert len(c.suspects) == n and len(c.regressions) > 0.9 * n
    assert "Warning: the whole new table is x1.20 the base" in markdown_report(c, "a", "b")
    assert "Warning: the whole" not in markdown_report(compare_tables(base, base), "a", "b")


def _timed_in_processes(table: CostTable, row: int, medians: list[float]) -> CostTable:
    """``table`` with ``row`` re-timed in one process per median: samples pooled around each median."""
    rows = table.rows.copy()
    samples = [m * (1 + d) for m in medians for d in np.linspace(-0.01, 0.01, 15)]
    rows.at[row, "samples_s"] = samples
    rows.at[row, "median_s"] = float(np.median(samples))
    rows.at[row, "process_medians_s"] = medians
    return CostTable(rows, dict(table.meta))


def test_a_row_slower_only_in_some_processes_is_held_back_and_one_slower_in_every_process_regresses(
        synthetic_table):
    """One process can run a kernel 30% off as a whole: pooled samples then say 'significant', the processes
    say it is the process, not the code."""
    base = _timed_in_processes(synthetic_table, 4, [1.00e-4, 1.01e-4, 0.99e-4])
    mixed = _timed_in_processes(synthetic_table, 4, [1.35e-4, 1.30e-4, 1.32e-4, 0.98e-4])
    key = tuple(synthetic_table.rows.loc[4, KEY_COLUMNS])
    c = compare_tables(base, mixed)
    row = c.rows[c.rows[KEY_COLUMNS].apply(tuple, axis=1) == key].iloc[0]
    assert row["ratio"] > 1.1 and row["p_value"] < c.alpha and row["processes"] == 3
    assert c.regressions.empty and c.held_back == 1
    assert "not in every process, so not counted: 1" in markdown_report(c, "a", "b")
    slower = _timed_in_processes(synthetic_table, 4, [1.35e-4, 1.30e-4, 1.12e-4])
    c = compare_tables(base, slower)
    assert [tuple(r) for r in c.regressions[KEY_COLUMNS].values] == [key] and c.held_back == 0
    # and alike for improvements
    assert [tuple(r) for r in compare_tables(slower, base).improvements[KEY_COLUMNS].values] == [key]
    assert compare_tables(mixed, base).improvements.empty
