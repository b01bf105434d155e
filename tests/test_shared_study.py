"""Many workers, one study: `xytune profile` processes that share their Optuna studies through a journal file or a
PostgreSQL database time every config once between them, and one worker's resumed table holds the rows of all.

The Triton GEMM tiles these storages are for need a GPU; on a CPU the attention tile spaces (12 and 9 configs)
are what ``--search optuna`` searches. ``--trials`` covers them whole, so every sweep times the same keys.
"""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from xytune.profiler.search import open_storage
from xytune.profiler.table import KEY_COLUMNS, read_table

PROFILE = ["profile", "--device", "cpu", "--threads", "1", "--quick", "--targets", "attention", "--dtypes", "float32",
           "--search", "optuna", "--trials", "24", "--budget-ms", "2", "--no-progress"]
SEARCHED = ["meta.attention_short", "meta.attention_long"]  # the attention primitives with a tile space


def xytune(*args) -> list[str]:
    return [sys.executable, "-m", "xytune.cli", *map(str, args)]


def keys(rows) -> set[tuple]:
    return set(map(tuple, rows[KEY_COLUMNS].to_numpy().tolist()))


def timed_configs(storage: str) -> Counter:
    """How many workers timed each (study, config): the trials that carry a row."""
    import optuna

    opened = open_storage(storage)
    return Counter((s.study_name, t.user_attrs["config"]) for s in optuna.get_all_study_summaries(opened)
                   for t in optuna.load_study(study_name=s.study_name, storage=opened).trials
                   if "row" in t.user_attrs)


@pytest.fixture(scope="module")
def single_process_keys(tmp_path_factory) -> set[tuple]:
    out = tmp_path_factory.mktemp("single") / "one.parquet"
    subprocess.run(xytune(*PROFILE, "-o", out), check=True, capture_output=True, timeout=300)
    rows = read_table(out).rows
    assert set(SEARCHED) <= set(rows["primitive"])
    return keys(rows)


def check_two_workers_share(storage: str, kind: str, tmp_path: Path, single_process_keys: set[tuple]) -> None:
    tables = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    workers = [subprocess.Popen(xytune(*PROFILE, "--storage", storage, "-o", t), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for t in tables]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    timed = timed_configs(storage)
    searched_keys = {k for k in single_process_keys if k[KEY_COLUMNS.index("primitive")] in SEARCHED}
    assert len(timed) == len(searched_keys) and set(timed.values()) == {1}, "a config timed twice, or never"
    a, b = (read_table(t) for t in tables)
    for table in (a, b):
        assert table.meta["sweep"]["storage"] == kind
        assert storage not in json.dumps(table.meta) and "secret" not in json.dumps(table.meta)
    both = a.rows.merge(b.rows, on=KEY_COLUMNS, suffixes=("_a", "_b"))
    searched = both[both["primitive"].isin(SEARCHED)]
    assert (searched["samples_s_a"].map(list) == searched["samples_s_b"].map(list)).all(), "adopted rows differ"

    # one worker resumed with the storage collects what the other timed after it left, timing nothing itself
    subprocess.run(xytune(*PROFILE, "--storage", storage, "-o", tables[0], "--resume"), check=True,
                   capture_output=True, timeout=300)
    assert timed_configs(storage) == timed
    merged = read_table(tables[0]).rows
    assert keys(merged) == single_process_keys and not merged.duplicated(KEY_COLUMNS).any()


def test_two_processes_share_a_journal_file(tmp_path, single_process_keys):
    check_two_workers_share(str(tmp_path / "studies.journal"), "journal", tmp_path, single_process_keys)


def _postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a free local port (as the ``postgres`` user when the tests run as root:
    the server refuses root), or a skip that says what is missing."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl; Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="no psycopg, SQLAlchemy's postgresql:// driver (pip install psycopg[binary])")
    run_as = {}
    data = Path(tempfile.mkdtemp(prefix="xytune-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the PostgreSQL server as")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data / "db"
    subprocess.run([bindir / "initdb", "-D", db, "-U", "xytune", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, timeout=120, **run_as)
    pg_ctl = [bindir / "pg_ctl", "-D", db, "-w", "-t", "60"]
    subprocess.run([*pg_ctl, "-l", data / "log", "-o", f"-h 127.0.0.1 -p {port} -k {data}", "start"], check=True,
                   capture_output=True, timeout=120, **run_as)
    try:
        yield f"postgresql://xytune:secret@127.0.0.1:{port}/postgres"  # trust: the password is only carried
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=120, **run_as)
        shutil.rmtree(data, ignore_errors=True)


def test_two_processes_share_a_postgresql_database(tmp_path, single_process_keys, postgres_url):
    check_two_workers_share(postgres_url, "postgresql", tmp_path, single_process_keys)
