"""Optuna search over a synthetic config space with a known optimum (no timing noise)."""

import json

import optuna
import pytest

from xytune.profiler.primitives import Primitive, gemm_work, register, unregister
from xytune.profiler.search import optuna_search
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
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    first, second = [], []
    optuna_search(synthetic_primitive, {"m": 1}, "float32", cpu_device, lambda c: first.append(c) or cost(c),
                  trials=10, storage=storage, study_name="s", seed=0)
    storage2 = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    optuna_search(synthetic_primitive, {"m": 1}, "float32", cpu_device, lambda c: second.append(c) or cost(c),
                  trials=25, storage=storage2, study_name="s", seed=0)
    assert len(first) == 10 and len(second) == 15
    assert not {canonical_json(c) for c in first} & {canonical_json(c) for c in second}
