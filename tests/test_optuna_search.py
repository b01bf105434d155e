"""Optuna search over a synthetic config space with a known optimum (no timing noise)."""

import json
from datetime import timedelta

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage

from xytune.profiler import search
from xytune.profiler.primitives import Primitive, gemm_work, register, unregister
from xytune.profiler.search import ConfigFailed, StorageError, open_storage, optuna_search, storage_kind
from xytune.profiler.table import canonical_json

SPACE = {"a": tuple(range(8)), "b": tuple(range(8)), "c": (1, 2, 4, 8)}  # 256 configs


def cost(config):
    """Smooth bowl with its minimum at a=5, b=2, c=4."""
    return 1.0 + (config["a"] - 5) ** 2 + 0.5 * (config["b"] - 2) ** 2 + abs(config["c"] - 4)


def invalid(shape, config, dtype, device):
    return "a+b too large" if config["a"] + config["b"] > 11 else None


@pytest.fixture
def synthetic_primitive():
    p = register(Primitive("test.synthetic", "gemm", ("cpu",), ("float32",), make=lambda *a: (lambda: None),
                           work=gemm_work, space=SPACE, invalid=invalid))
    yield p
    unregister(p.name)


def test_tpe_finds_the_best_config(synthetic_primitive, cpu_device):
    seen = []

    def objective(config):
        assert invalid(None, config, None, None) is None, "an invalid config was timed"
        seen.append(canonical_json(config))
        return cost(config)

    study = optuna_search(synthetic_primitive, {"m": 1, "n": 1, "k": 1}, "float32", cpu_device, objective,
                          trials=60, seed=1)
    assert len(seen) == 60 and len(set(seen)) == 60, "each config timed once"
    best = min(seen, key=lambda k: cost(json.loads(k)))
    assert best == canonical_json({"a": 5, "b": 2, "c": 4})
    assert study.best_value == 1.0


def test_invalid_configs_are_pruned_not_timed(synthetic_primitive, cpu_device):
    timed = []
    study = optuna_search(synthetic_primitive, {"m": 1, "n": 1, "k": 1}, "float32", cpu_device,
                          lambda c: timed.append(c) or cost(c), trials=40, seed=3)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.params["a"] + t.params["b"] > 11 for t in pruned)
    assert all(c["a"] + c["b"] <= 11 for c in timed)


def test_journal_storage_resumes_without_retiming(synthetic_primitive, cpu_device, tmp_path):
    storage = open_storage(str(tmp_path / "journal.log"))
    first, second = [], []
    optuna_search(synthetic_primitive, {"m": 1}, "float32", cpu_device, lambda c: first.append(c) or cost(c),
                  trials=10, storage=storage, study_name="s", seed=0)
    storage2 = open_storage(str(tmp_path / "journal.log"))
    optuna_search(synthetic_primitive, {"m": 1}, "float32", cpu_device, lambda c: second.append(c) or cost(c),
                  trials=25, storage=storage2, study_name="s", seed=0)
    assert len(first) == 10 and len(second) == 15
    assert not {canonical_json(c) for c in first} & {canonical_json(c) for c in second}


SMALL_SPACE = {"a": (0, 1, 2, 3), "b": (0, 1, 2)}  # 12 configs: searched to the end, as a small TPE space is


@pytest.fixture
def small_primitive():
    p = register(Primitive("test.small", "gemm", ("cpu",), ("float32",), make=lambda *a: (lambda: None),
                           work=gemm_work, space=SMALL_SPACE))
    yield p
    unregister(p.name)


def _journal(path):
    return open_storage(str(path))


def _other_worker_claims(path, config) -> tuple:
    """Another worker's study object and its running trial that claims ``config`` (as optuna_search claims)."""
    study = optuna.create_study(study_name="s", storage=_journal(path), load_if_exists=True)
    trial = study.ask()
    trial.set_user_attr("config", canonical_json(config))
    return study, trial


def test_a_config_another_worker_is_timing_is_left_to_it(small_primitive, cpu_device, tmp_path):
    journal, claimed = tmp_path / "journal.log", {"a": 2, "b": 1}
    other, trial = _other_worker_claims(journal, claimed)
    timed = []
    optuna_search(small_primitive, {"m": 1}, "float32", cpu_device, lambda c: timed.append(c) or 1.0,
                  trials=12, storage=_journal(journal), study_name="s")
    assert claimed not in timed and len(timed) == 11 and len({canonical_json(c) for c in timed}) == 11
    other.tell(trial, 0.5)  # the other worker finishes it: a later run times nothing
    again = []
    optuna_search(small_primitive, {"m": 1}, "float32", cpu_device, lambda c: again.append(c) or 1.0,
                  trials=12, storage=_journal(journal), study_name="s")
    assert again == []


def test_a_stale_claim_is_timed_again(small_primitive, cpu_device, tmp_path, monkeypatch):
    """A worker killed hard leaves its trial running forever: after STALE_CLAIM its config is free again."""
    journal, claimed = tmp_path / "journal.log", {"a": 0, "b": 2}
    _other_worker_claims(journal, claimed)
    monkeypatch.setattr(search, "STALE_CLAIM", timedelta(0))
    timed = []
    optuna_search(small_primitive, {"m": 1}, "float32", cpu_device, lambda c: timed.append(c) or 1.0,
                  trials=12, storage=_journal(journal), study_name="s")
    assert claimed in timed and len(timed) == 12


def test_a_config_that_failed_for_one_worker_is_not_tried_by_another(small_primitive, cpu_device, tmp_path):
    journal, broken, first = tmp_path / "journal.log", {"a": 3, "b": 0}, []

    def first_worker(config):
        first.append(config)
        if config == broken:
            raise ConfigFailed("out of resources")
        return 1.0

    optuna_search(small_primitive, {"m": 1}, "float32", cpu_device, first_worker, trials=12,
                  storage=_journal(journal), study_name="s")
    assert broken in first and len(first) == 12
    tried = []  # the failed config is as done as the others: no other worker tries it
    optuna_search(small_primitive, {"m": 1}, "float32", cpu_device, lambda c: tried.append(c) or 1.0,
                  trials=12, storage=_journal(journal), study_name="s")
    assert tried == []


def test_storage_spec_is_a_url_or_a_journal_path(tmp_path):
    assert storage_kind(None) is None and open_storage(None) is None
    assert storage_kind("journal.log") == storage_kind(str(tmp_path / "j")) == "journal"
    assert storage_kind("postgresql+psycopg://u:pw@db:5432/x") == "postgresql+psycopg"
    assert isinstance(open_storage(str(tmp_path / "j.log")), JournalStorage) and (tmp_path / "j.log").exists()
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 's.db'}"), RDBStorage)


@pytest.mark.parametrize("spec, message", [
    ("nosuchdb://host/x", "Cannot open the Optuna storage nosuchdb://host/x: Can't load plugin"),
    ("postgresql://u:secret@127.0.0.1:1/x", "Cannot open the Optuna storage postgresql://u:***@127.0.0.1:1/x"),
    ("{tmp}/file.txt/journal.log", "Cannot use {tmp}/file.txt/journal.log as an Optuna journal file: Not a directory"),
    ("{tmp}/file.txt", "{tmp}/file.txt is not an Optuna journal file"),
])
def test_a_storage_that_cannot_be_opened_says_why_in_one_line(tmp_path, spec, message):
    (tmp_path / "file.txt").write_text("not\na journal\n")
    with pytest.raises(StorageError) as err:
        open_storage(spec.format(tmp=tmp_path))
    text = str(err.value)
    assert text.startswith(message.format(tmp=tmp_path)) and "\n" not in text and "secret" not in text
