"""The checked-in reference tables are valid, complete, usable cost tables, whatever machine reads them.

They are facts about the machines named in their file names; nothing here assumes the machine running the
tests made them (or asserts what that machine measured, such as which dtype won there).
"""

import warnings

import pytest
from conftest import PROFILES, REFERENCE_TABLE, SCHEMA_1_TABLE

from xytune.profiler.calibrate import TUNING_DEFAULTS
from xytune.profiler.cost_model import CostModel
from xytune.profiler.geometry import PRESETS
from xytune.profiler.sweep import m_buckets
from xytune.profiler.table import KEY_COLUMNS, read_table

TABLES = sorted(PROFILES.glob("*.parquet"))


def test_the_reference_tables_are_the_ones_the_tests_name():
    assert REFERENCE_TABLE in TABLES and SCHEMA_1_TABLE in TABLES
    assert set(read_table(REFERENCE_TABLE).meta["sweep"]["buckets"]) == set(m_buckets(4096))  # a default sweep


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_reference_table_is_complete_and_consistent(path):
    table = read_table(path)
    rows, sweep = table.rows, table.meta["sweep"]
    geometry = table.meta["geometry"]
    assert table.complete and geometry == PRESETS[geometry["name"]].to_dict() and geometry["name"] in path.stem
    assert not rows.duplicated(KEY_COLUMNS).any()
    gemm = rows[rows["op"] == "gemm"]
    assert set(gemm["m"]) == set(sweep["buckets"])  # every bucket its sweep planned, and no other
    assert set(gemm.loc[gemm["target"] == "lm_head", "m"]) == {m for m in sweep["buckets"] if m <= sweep["max_seqs"]}
    assert (rows["n_samples"] >= 5).all() and (rows["samples_s"].map(len) == rows["n_samples"]).all()
    assert ((rows["p20_s"] <= rows["median_s"]) & (rows["median_s"] <= rows["p80_s"])).all()
    name = table.meta["fingerprint"]["device_name"].lower()  # the file is named by its machine
    assert any(word in path.stem for word in name.replace("(r)", "").split()), (path.stem, name)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_reference_table_drives_the_cost_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the machine reading it is, in general, not the one that made it
        model = CostModel.load(path, allow_mismatch=True)
    for dtype in model.dtypes:
        small, large = model.predict_step(1, dtype=dtype), model.predict_step(2048, num_logits=64, dtype=dtype)
        assert 0 < small < large
    assert model.fastest_dtype() in model.dtypes


def test_schema_2_tuning_is_read_and_schema_1_falls_back_to_the_defaults():
    model = CostModel.load(REFERENCE_TABLE, allow_mismatch=True)
    assert model.meta["schema_version"] == 2
    for dtype in model.dtypes:
        measured = model.meta["tuning"][dtype]
        assert model.tuning("split_margin", dtype) == measured["split_margin"]
        assert 0 < measured["segment_overhead_s"] < 1e-3 and 0.02 <= measured["split_margin"] <= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = CostModel.load(SCHEMA_1_TABLE, allow_mismatch=True)
    assert old.meta["schema_version"] == 1
    with pytest.warns(UserWarning, match="no measured group_cost_scores"):
        assert old.tuning("group_cost_scores", "bfloat16") == TUNING_DEFAULTS["group_cost_scores"]
