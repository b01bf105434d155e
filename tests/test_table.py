import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xytune.profiler.table import META_KEY, SCHEMA_VERSION, TableError, read_table, write_table


def test_round_trip_keeps_rows_and_metadata(tmp_path, synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    back = read_table(path)
    assert back.meta["schema_version"] == SCHEMA_VERSION
    assert back.meta["fingerprint"] == synthetic_table.meta["fingerprint"]
    assert back.meta["geometry"] == synthetic_table.meta["geometry"]
    assert back.meta["peaks"] == synthetic_table.meta["peaks"]
    assert back.complete
    lists = ["samples_s", "process_medians_s"]
    pd.testing.assert_frame_equal(back.rows.drop(columns=lists), synthetic_table.rows[back.rows.columns].drop(columns=lists),
                                  check_dtype=False)
    for column in lists:
        assert back.rows[column].tolist() == synthetic_table.rows[column].tolist()
    # Plain Parquet readers see the same columns and the metadata key.
    raw = pq.read_table(path)
    assert json.loads(raw.schema.metadata[META_KEY])["geometry"]["name"] == "smollm2-135m"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"], "atomic write left a temp file"


def test_rewrite_replaces_atomically(tmp_path, synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    half = type(synthetic_table)(synthetic_table.rows.iloc[:10], dict(synthetic_table.meta))
    write_table(path, half)
    assert len(read_table(path).rows) == 10


def test_truncated_file_is_a_clear_error(tmp_path, synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TableError, match="corrupt or truncated"):
        read_table(path)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(TableError, match="not a readable Parquet"):
        read_table(junk)
    with pytest.raises(TableError, match="does not exist"):
        read_table(tmp_path / "missing.parquet")


def test_foreign_parquet_is_refused(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    with pytest.raises(TableError, match="not an xytune cost table"):
        read_table(path)


def test_future_schema_version_is_refused(tmp_path, synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    arrow = pq.read_table(path)
    meta = json.loads(arrow.schema.metadata[META_KEY])
    pq.write_table(arrow.replace_schema_metadata({META_KEY: json.dumps(dict(meta, schema_version=SCHEMA_VERSION + 1))}),
                   path)
    with pytest.raises(TableError, match="schema version"):
        read_table(path)


def test_a_version_2_table_reads_as_timed_in_one_process_and_is_written_as_the_current_version(tmp_path,
                                                                                            synthetic_table):
    path = tmp_path / "t.parquet"
    write_table(path, synthetic_table)
    arrow = pq.read_table(path)
    meta = json.loads(arrow.schema.metadata[META_KEY])
    old = arrow.drop_columns(["process_medians_s"])
    pq.write_table(old.replace_schema_metadata({META_KEY: json.dumps(dict(meta, schema_version=2))}), path)
    back = read_table(path)
    assert back.rows["process_medians_s"].tolist() == [[m] for m in back.rows["median_s"]]
    write_table(path, back)
    assert read_table(path).meta["schema_version"] == SCHEMA_VERSION == 3
