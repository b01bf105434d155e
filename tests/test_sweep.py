import itertools
import json
import threading
import time

import pytest
import torch

from xytune.profiler.devices import Device
from xytune.profiler.geometry import PRESETS
from xytune.profiler.primitives import REGISTRY, Primitive, gemm_work, primitives_for, register, unregister
from xytune.profiler.retime import Turns
from xytune.profiler.sweep import (
    ShapeGroup,
    Sweep,
    SweepError,
    SweepSettings,
    m_buckets,
    plan_groups,
    quick_buckets,
    valid_grid,
)
from xytune.profiler.table import KEY_COLUMNS, canonical_json, read_table, write_table
from xytune.profiler.timing import TimingPolicy

TINY = TimingPolicy(warmup=1, budget_s=0.0, min_samples=3, max_samples=3)
# float weights (a default sweep's): no config knobs on CPU, one row each
PRIMS = len([p for p in primitives_for("gemm", "cpu", "float32") if p.weight_format == "float"])
ROWS = 2 * 3 * PRIMS  # 2 targets x 3 buckets


def tiny_settings(**kw):
    return SweepSettings(dtypes=["float32"], buckets=[1, 3, 8], targets=["qkv", "o"], timing=TINY, **kw)


def test_m_buckets_dense_then_widening():
    b = m_buckets(4096)
    assert b[:16] == list(range(1, 17))
    assert b[-1] == 4096 and b == sorted(set(b))
    assert {20, 24, 28, 32, 40, 3584} <= set(b)
    assert len(b) < 60
    assert m_buckets(10) == list(range(1, 11))
    assert quick_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(SweepError):
        m_buckets(0)


def test_small_sweep_writes_complete_table(tmp_path, cpu_device):
    out = tmp_path / "t.parquet"
    table = Sweep(cpu_device, PRESETS["smollm2-135m"], tiny_settings(), out).run(progress=False)
    back = read_table(out)
    assert back.complete
    assert len(back.rows) == len(table.rows) == ROWS
    assert (back.rows["n_samples"] == 3).all()
    assert back.rows["samples_s"].map(len).eq(3).all()
    assert (back.rows["median_s"] > 0).all()
    assert set(back.meta["peaks"]["gemm_flops"]) == {"float32"}
    assert (back.rows["achieved_flops"] == back.rows["flops"] / back.rows["median_s"]).all()


def test_existing_table_is_not_overwritten_without_a_flag(tmp_path, cpu_device):
    out = tmp_path / "t.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(SweepError, match="--resume"):
        Sweep(cpu_device, PRESETS["smollm2-135m"], tiny_settings(), out)
    assert out.read_bytes() == b"precious"


def test_interrupted_sweep_resumes_without_duplicates(tmp_path, cpu_device, monkeypatch):
    out = tmp_path / "t.parquet"
    geometry = PRESETS["smollm2-135m"]
    sweep = Sweep(cpu_device, geometry, tiny_settings(checkpoint_every_s=0.0), out)
    real_record, calls = Sweep._record, {"n": 0}

    def flaky(self, group, config, samples):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_record(self, group, config, samples)

    monkeypatch.setattr(Sweep, "_record", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(progress=False)
    partial = read_table(out)
    assert not partial.complete and len(partial.rows) == 7
    monkeypatch.setattr(Sweep, "_record", real_record)

    resumed = Sweep(cpu_device, geometry, tiny_settings(), out, resume=True)
    timed = []
    monkeypatch.setattr(Sweep, "_record", lambda self, g, c, s: timed.append(1) or real_record(self, g, c, s))
    resumed.run(progress=False)
    final = read_table(out)
    assert final.complete and len(final.rows) == ROWS and len(timed) == ROWS - 7
    assert not final.rows.duplicated(KEY_COLUMNS).any()
    # The rows measured before the interruption are kept as they were.
    before = partial.rows.set_index(KEY_COLUMNS)["median_s"]
    after = final.rows.set_index(KEY_COLUMNS)["median_s"]
    assert (after.loc[before.index] == before).all()


def test_resume_refuses_another_model(tmp_path, cpu_device):
    out = tmp_path / "t.parquet"
    Sweep(cpu_device, PRESETS["smollm2-135m"], tiny_settings(), out).run(progress=False)
    with pytest.raises(SweepError, match="profiles smollm2-135m"):
        Sweep(cpu_device, PRESETS["llama-3.1-8b"], tiny_settings(), out, resume=True)


def test_bad_settings_are_refused(tmp_path, cpu_device):
    g = PRESETS["smollm2-135m"]
    with pytest.raises(SweepError, match="Unknown target"):
        Sweep(cpu_device, g, SweepSettings(dtypes=["float32"], buckets=[1], targets=["nope"]), tmp_path / "a")
    with pytest.raises(SweepError, match="--trials"):
        Sweep(cpu_device, g, SweepSettings(dtypes=["float32"], buckets=[1], trials=0), tmp_path / "a")


def test_off_bucket_ms_avoid_buckets_and_repeat():
    from xytune.bench.profile import off_bucket_ms

    buckets = m_buckets(4096)
    ms = off_bucket_ms(buckets, 4096, 24, seed=0)
    assert len(set(ms)) == 24 and not set(ms) & set(buckets) and all(1 <= m <= 4096 for m in ms)
    assert ms == off_bucket_ms(buckets, 4096, 24, seed=0)


def test_attention_tiles_are_swept_and_chosen_from_the_table(tmp_path, cpu_device):
    """`--targets attention` times Meta-Attention's tile classes; the runtime takes the best config."""
    from xytune.profiler.cost_model import CostModel
    from xytune.profiler.primitives import REGISTRY
    from xytune.runtime.model.attention import META_DEFAULTS, meta_tiles_from_table

    out = tmp_path / "attn.parquet"
    settings = SweepSettings(dtypes=["float32"], buckets=[1], targets=["attention"], timing=TINY,
                             quick_attention=True)
    Sweep(cpu_device, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    rows = read_table(out).rows
    assert set(rows["target"]) == {"attention.decode", "attention.decode_plain", "attention.prefill"}
    assert (rows["op"] == "attention").all()
    short = REGISTRY["meta.attention_short"]
    decode = rows[(rows["target"] == "attention.decode") & (rows["primitive"] == short.name)]
    assert len(decode) == short.space_size()  # GQA group 3: every tile_q fits
    # what the engine weighs Meta-Attention against: the SDPA path and the plan's cost, on both classes
    for target in ("attention.decode", "attention.decode_plain", "attention.prefill"):
        assert {"torch.sdpa_loop", "meta.plan"} <= set(rows[rows["target"] == target]["primitive"])
    plain = rows[rows["target"] == "attention.decode_plain"]  # decodes alone from one request up, for the path
    assert sorted({json.loads(s)["m"] for s in plain["shape"]}) == [1, 4, 16]
    assert {json.loads(s)["verify_every"] for s in plain["shape"]} == {0}
    assert "GQA group" in short.invalid({"heads": 28, "kv_heads": 4}, {"tile_q": 4, "tile_kv": 64}, "float32",
                                        cpu_device)  # a 7-head group does not fit 4 rows
    model = CostModel.load(out)
    tiles = meta_tiles_from_table(model, "float32")
    best = decode.loc[decode["median_s"].idxmin(), "config"]
    assert {k: tiles[k] for k in ("tile_q", "tile_kv")} == json.loads(best)
    assert tiles["group_cost_scores"] == model.meta["tuning"]["float32"]["group_cost_scores"]  # measured, not assumed
    assert meta_tiles_from_table(None, "float32") == META_DEFAULTS


def test_grid_configs_are_timed_in_turns(cpu_device):
    from xytune.profiler.timing import TimingPolicy, measure_interleaved

    order = []
    fns = [lambda name=name: order.append(name) for name in "abc"]
    samples = measure_interleaved(fns, cpu_device, TimingPolicy(warmup=1, budget_s=0.0, min_samples=4))
    assert [len(s) for s in samples] == [4, 4, 4] and all(t >= 0 for s in samples for t in s)
    timed = order[3:]  # after one warm-up call each
    assert timed == list("abc") * 4


def test_two_retimes_taking_turns_alternate_row_by_row_and_a_lone_one_gives_up(tmp_path):
    order = []

    def worker(first: bool):
        turns = Turns(tmp_path / "turns", first, timeout_s=30)
        for i in range(5):
            turns.take()
            order.append(("first" if first else "second", i))
            time.sleep(0.002 if first else 0.0)  # the first is slower: order must still alternate
            turns.hand_over()
        turns.close()

    workers = [threading.Thread(target=worker, args=(first,)) for first in (False, True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert order == [(name, i) for i in range(5) for name in ("first", "second")]
    lone = Turns(tmp_path / "alone", first=False, timeout_s=0.2)
    with pytest.raises(SweepError, match="did not hand over its turn"):
        lone.take()
    lone.close()


def _failing_tile(shape, config, dtype, device):
    """A tile space where some configs fail as a Triton kernel can: out of shared memory, or a launch error."""
    from triton.runtime.errors import OutOfResources

    if config["tile"] % 3 == 0:
        raise OutOfResources(262144, 232448, "shared memory")
    if config["warps"] >= 32:
        raise RuntimeError("CUDA error: too many resources requested for launch")
    x = torch.randn(shape["m"], shape["k"])
    return lambda: x.sum()


def test_configs_that_fail_are_pruned_and_the_optuna_sweep_goes_on(tmp_path, cpu_device):
    """Over 64 configs: TPE searches them; a config whose kernel raises is recorded as pruned, never timed."""
    pytest.importorskip("triton")
    prim = Primitive("test.failing_tiles", "gemm", ("cpu",), ("float32",), _failing_tile, gemm_work,
                     space={"tile": tuple(range(1, 11)), "warps": (1, 2, 4, 8, 16, 32, 64)})
    assert prim.space_size() > 64
    register(prim)
    try:
        out = tmp_path / "t.parquet"
        settings = tiny_settings(search="auto", trials=8, attention=False)
        table = Sweep(cpu_device, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    finally:
        unregister(prim.name)
    back = read_table(out)
    assert back.complete and len(back.rows) == len(table.rows)
    failing = {canonical_json(c) for c in prim.grid() if c["tile"] % 3 == 0 or c["warps"] >= 32}
    pruned = [p for p in back.meta["pruned"] if p["primitive"] == prim.name]
    assert pruned and {p["config"] for p in pruned} <= failing
    assert all(p["reason"].startswith(("OutOfResources: out of resource", "RuntimeError: CUDA error")) for p in pruned)
    rows = back.rows[back.rows["primitive"] == prim.name]
    assert not set(rows["config"]) & failing
    # each (target, M) group tried `trials` distinct configs: the failures count as tried
    assert len(rows) + len(pruned) == 8 * 2 * 3
    assert set(back.rows["primitive"]) > {prim.name}  # the registry's own primitives were timed too


ATTENTION_PRIMITIVES = {"meta.attention_short", "meta.attention_long", "meta.plan", "torch.sdpa_loop"}


@pytest.mark.parametrize("backend", ["cuda", "npu"])
def test_gpu_and_npu_sweeps_plan_attention_rows(backend):
    """The attention primitives are registered where a Meta-Attention backend exists, over the CPU's shapes."""
    geometry = PRESETS["llama-3.1-8b"]
    settings = SweepSettings(dtypes=["bfloat16", "float16"], buckets=[1], targets=["attention"])
    for dtype in settings.dtypes:
        assert ATTENTION_PRIMITIVES <= {p.name for p in primitives_for("attention", backend, dtype)}
    groups = plan_groups(geometry, settings, backend)
    assert {g.primitive.name for g in groups} == ATTENTION_PRIMITIVES and {g.op for g in groups} == {"attention"}
    assert {(g.target, g.shape, g.dtype) for g in groups} == \
        {(g.target, g.shape, g.dtype) for g in plan_groups(geometry, settings, "cpu")}


def test_triton_attention_space_times_each_distinct_kernel_once():
    """On CUDA the Triton kernel runs: tile_q below 16 and the long class's knobs would time copies."""
    pytest.importorskip("triton")
    shape = tuple(sorted({"m": 8, "n": 256, "heads": 28, "kv_heads": 4, "k": 128}.items()))
    short, long = REGISTRY["meta.attention_short"], REGISTRY["meta.attention_long"]
    cuda, npu = Device("cuda"), Device("npu")
    assert valid_grid(ShapeGroup("attention", "attention.decode", shape, short, "bfloat16"), cuda) == \
        [{"tile_q": 16, "tile_kv": kv} for kv in (64, 128, 256, 512)]
    assert valid_grid(ShapeGroup("attention", "attention.prefill", shape, long, "bfloat16"), cuda) == \
        [{"prefill_tile": 32, "sdpa_min_keys": 256}]
    # torch_npu runs the plan's own tiles: every long config, and tile_q from the GQA group (7) up
    assert len(valid_grid(ShapeGroup("attention", "attention.prefill", shape, long, "float16"), npu)) == 9
    assert {c["tile_q"] for c in valid_grid(ShapeGroup("attention", "attention.decode", shape, short, "float16"),
                                            npu)} == {8, 16}


def _fails_on_its_third_call(shape, config, dtype, device):
    """A kernel that passes the untimed first call, then fails while timed (tile 2 only)."""
    calls = itertools.count()
    x = torch.randn(shape["m"], shape["k"])

    def run():
        if config["tile"] == 2 and next(calls) >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return x.sum()
    return run


@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_a_config_that_fails_while_timed_is_pruned_and_the_sweep_goes_on(tmp_path, cpu_device, search):
    prim = Primitive("test.fails_late", "gemm", ("cpu",), ("float32",), _fails_on_its_third_call, gemm_work,
                     space={"tile": (1, 2, 3)})
    register(prim)
    try:
        out = tmp_path / "t.parquet"
        settings = tiny_settings(search=search, trials=3, attention=False)
        Sweep(cpu_device, PRESETS["smollm2-135m"], settings, out).run(progress=False)
    finally:
        unregister(prim.name)
    back = read_table(out)
    assert back.complete
    rows = back.rows[back.rows["primitive"] == prim.name]
    assert set(rows["config"]) == {'{"tile":1}', '{"tile":3}'} and len(rows) == 2 * 2 * 3  # 2 targets x 3 M
    pruned = [p for p in back.meta["pruned"] if p["primitive"] == prim.name]
    assert {p["config"] for p in pruned} == {'{"tile":2}'} and len(pruned) == 2 * 3
    assert all(p["reason"] == "RuntimeError: CUDA error: an illegal memory access was encountered" for p in pruned)


def test_a_weight_is_copied_and_its_layout_prepared_once_for_every_m(cpu_device):
    """The rotation of weight copies (up to twice the last-level cache) and each primitive's prepared layout
    are made once per weight, not again at every M; a new weight frees the old layouts."""
    from xytune.profiler.primitives import _random_matrix, register_gemm, release_operands, weight_copies

    bound = []

    def bind_counting(weight, bias=None):
        bound.append(weight)
        return lambda x, out, config: torch.nn.functional.linear(x, weight)

    prim = register_gemm("test.counting_bind", bind_counting, ("cpu",))
    try:
        copies = weight_copies(96 * 64 * 4, cpu_device)
        fns = {m: prim.make({"m": m, "n": 96, "k": 64}, {}, "float32", cpu_device) for m in (1, 8, 33)}
        assert len(bound) == copies and len({id(w) for w in bound}) == copies
        weight = _random_matrix(96, 64, "float32", "cpu")
        for m, fn in fns.items():  # each M still multiplies its own input by the same (copied) weight
            torch.testing.assert_close(fn(), torch.nn.functional.linear(_random_matrix(m, 64, "float32", "cpu"), weight))
        prim.make({"m": 1, "n": 32, "k": 64}, {}, "float32", cpu_device)
        assert len(bound) == copies + weight_copies(32 * 64 * 4, cpu_device)
        release_operands()  # what a finished sweep does: nothing of the weights is kept
        prim.make({"m": 1, "n": 32, "k": 64}, {}, "float32", cpu_device)
        assert len(bound) == copies + 2 * weight_copies(32 * 64 * 4, cpu_device)
    finally:
        unregister(prim.name)


def test_a_resumed_table_times_only_the_shape_groups_it_lacks(tmp_path, cpu_device):
    """A table from before a shape group was added (serve's cached quick profile after an upgrade): resuming it
    plans the new group alone and leaves the rows it had as they were."""
    out = tmp_path / "attn.parquet"

    def settings():
        return SweepSettings(dtypes=["float32"], buckets=[1], targets=["attention"], timing=TINY,
                             quick_attention=True)

    Sweep(cpu_device, PRESETS["smollm2-135m"], settings(), out).run(progress=False)
    table = read_table(out)
    older = table.rows[table.rows["target"] != "attention.decode_plain"].reset_index(drop=True)
    table.rows = older
    write_table(out, table)
    sweep = Sweep(cpu_device, PRESETS["smollm2-135m"], settings(), out, resume=True)
    assert {g.target for g in sweep.unmeasured()} == {"attention.decode_plain"}
    sweep.run(progress=False)
    after = read_table(out)
    plain = after.rows["target"] == "attention.decode_plain"
    assert after.complete and set(after.rows[plain]["primitive"]) == {"meta.attention_short", "meta.plan",
                                                                       "torch.sdpa_loop"}
    assert after.rows[~plain].reset_index(drop=True)[older.columns].equals(older)
    assert Sweep(cpu_device, PRESETS["smollm2-135m"], settings(), out, resume=True).unmeasured() == []
