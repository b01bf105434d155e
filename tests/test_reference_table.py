"""The checked-in CPU reference table is a valid, complete, usable cost table."""

import warnings
from pathlib import Path

from xytune.cost_model import CostModel
from xytune.geometry import PRESETS
from xytune.sweep import m_buckets
from xytune.table import KEY_COLUMNS, read_table

REFERENCE = Path(__file__).resolve().parent.parent / "profiles" / "cpu-smollm2-135m.parquet"


def test_reference_table_is_complete_and_consistent():
    table = read_table(REFERENCE)
    rows = table.rows
    assert table.complete and table.meta["geometry"] == PRESETS["smollm2-135m"].to_dict()
    assert not rows.duplicated(KEY_COLUMNS).any()
    assert set(rows["m"]) == set(m_buckets(4096))
    assert set(rows.loc[rows["target"] == "lm_head", "m"]) == {m for m in m_buckets(4096) if m <= 256}
    assert (rows["n_samples"] >= 5).all() and (rows["samples_s"].map(len) == rows["n_samples"]).all()
    assert ((rows["p20_s"] <= rows["median_s"]) & (rows["median_s"] <= rows["p80_s"])).all()


def test_reference_table_drives_the_cost_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CI machines may differ from the one that made it
        model = CostModel.load(REFERENCE, allow_mismatch=True)
    small, large = model.predict_step(1, dtype="bfloat16"), model.predict_step(2048, num_logits=64, dtype="bfloat16")
    assert 0 < small < large
    # bf16 GEMMs on an AVX-512 BF16 CPU beat float32 for a large step
    assert model.predict_step(2048, num_logits=64, dtype="bfloat16") < model.predict_step(2048, num_logits=64,
                                                                                         dtype="float32")
