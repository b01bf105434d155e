"""The cost table: a Parquet file, one row per (op, shape, primitive, dtype, config).

Table-level facts (schema version, device fingerprint, model geometry,
measured peaks, sweep settings, whether the sweep completed) live in the
Parquet schema metadata under one key, so the file is self-describing and any
Parquet reader still sees plain columns. Writes are atomic: a temp file in the
same folder, fsynced, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xytune import __version__

SCHEMA_VERSION = 3  # 2 added the metadata keys tuning (measured machine constants) and pruned (probe failures);
# 3 the column process_medians_s
READABLE_VERSIONS = (1, 2, 3)  # a v1 table reads as one without tuning or pruned: the kernels use their defaults;
# a v1 or v2 table reads as if each row was timed in one process
META_KEY = b"xytune.meta"

KEY_COLUMNS = ["op", "target", "shape", "primitive", "dtype", "config"]

ARROW_SCHEMA = pa.schema([
    ("op", pa.string()),
    ("target", pa.string()),
    ("m", pa.int64()),
    ("n", pa.int64()),
    ("k", pa.int64()),
    ("shape", pa.string()),
    ("primitive", pa.string()),
    ("dtype", pa.string()),
    ("config", pa.string()),
    ("samples_s", pa.list_(pa.float64())),
    # the median of each process that timed the row (the profile's, then each `xytune retime` call's): a
    # process can run a kernel slower or faster as a whole (where its memory landed), so a CI verdict needs
    # the spread between processes, which pooled samples hide
    ("process_medians_s", pa.list_(pa.float64())),
    ("n_samples", pa.int64()),
    ("median_s", pa.float64()),
    ("p20_s", pa.float64()),
    ("p80_s", pa.float64()),
    ("mean_s", pa.float64()),
    ("std_s", pa.float64()),
    ("flops", pa.float64()),
    ("bytes", pa.float64()),
    ("achieved_flops", pa.float64()),
    ("achieved_bytes_per_s", pa.float64()),
    ("frac_peak", pa.float64()),
])
COLUMNS = ARROW_SCHEMA.names


class TableError(ValueError):
    """A cost table that cannot be used; the message is one user-facing sentence."""


def canonical_json(value) -> str:
    """Stable JSON for keys: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class CostTable:
    rows: pd.DataFrame
    meta: dict

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def keys(self) -> set[tuple]:
        return set(map(tuple, self.rows[KEY_COLUMNS].itertuples(index=False, name=None)))


def new_meta(fingerprint: dict, geometry: dict, peaks: dict, sweep: dict) -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "schema_version": SCHEMA_VERSION,
        "xytune_version": __version__,
        "created_at": now,
        "updated_at": now,
        "complete": False,
        "fingerprint": fingerprint,
        "geometry": geometry,
        "peaks": peaks,
        "sweep": sweep,
        "tuning": {},
        "pruned": [],
    }


def empty_rows() -> pd.DataFrame:
    return ARROW_SCHEMA.empty_table().to_pandas()


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_table(path: str | os.PathLike, table: CostTable) -> None:
    """Atomically replace ``path`` with ``table`` (a crash leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.meta, schema_version=SCHEMA_VERSION)
    meta["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = with_process_medians(table.rows).reindex(columns=COLUMNS)
    arrow = pa.Table.from_pandas(rows, schema=ARROW_SCHEMA, preserve_index=False)
    arrow = arrow.replace_schema_metadata({META_KEY: canonical_json(meta).encode()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep the mode a plain open() would give
        with os.fdopen(fd, "wb") as f:
            pq.write_table(arrow, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    table.meta = meta


def read_table(path: str | os.PathLike) -> CostTable:
    """Read and validate a cost table; any problem is a ``TableError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"Cost table {path} does not exist.")
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(f"{path} is not a readable Parquet file (corrupt or truncated?): {exc}") from None
    raw = (arrow.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TableError(f"{path} is a Parquet file but not an xytune cost table (no {META_KEY.decode()} metadata).")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise TableError(f"{path} has damaged xytune metadata.") from None
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise TableError(f"{path} has cost-table schema version {version}; this xytune {__version__} reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}.")
    columns = [c for c in COLUMNS if c != "process_medians_s" or version >= 3]
    missing = [c for c in columns if c not in arrow.column_names]
    if missing:
        raise TableError(f"{path} lacks the columns {', '.join(missing)}.")
    rows = with_process_medians(arrow.select(columns).to_pandas())
    rows["samples_s"] = rows["samples_s"].map(list)
    return CostTable(rows, meta)


def with_process_medians(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``process_medians_s`` as lists; a row without them was timed in one process."""
    given = rows["process_medians_s"] if "process_medians_s" in rows else [None] * len(rows)
    medians = [[m] if v is None or isinstance(v, float) else list(v) for v, m in zip(given, rows["median_s"])]
    return rows.assign(process_medians_s=pd.Series(medians, index=rows.index, dtype=object))
