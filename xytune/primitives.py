"""The primitive registry: every timed kernel variant, its config space and its work.

A primitive is something the runtime can call for an op (``gemm`` today;
Meta-Attention tiles and SmoothGEMM segments register here too). The profiler
sweeps ``(shape x primitive x dtype x config)`` and the cost model answers
which primitive and config to use. ``make`` builds a ready-to-time closure with
its inputs already allocated, so only the kernel is timed.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from xytune.devices import Device, llc_bytes

Shape = dict[str, int]
Config = dict[str, Any]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Primitive:
    name: str
    op: str
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    make: Callable[[Shape, Config, str, Device], Callable[[], Any]]
    work: Callable[[Shape, str], tuple[float, float]]  # (flops, bytes moved)
    space: dict[str, tuple] = field(default_factory=dict)
    invalid: Callable[[Shape, Config, str, Device], str | None] = lambda s, c, d, dev: None
    available: Callable[[], bool] = lambda: True
    probe_shape: dict = field(default_factory=lambda: {"m": 3, "n": 32, "k": 64})  # tiny: see probe.probe
    targets: tuple[str, ...] = ()  # attention: the tile classes it is swept on; () = every target of its op

    def space_size(self) -> int:
        return math.prod(len(v) for v in self.space.values()) if self.space else 1

    def grid(self) -> list[Config]:
        """Every config of the space, in a stable order ({} for a primitive with no knobs)."""
        keys = list(self.space)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.space[k] for k in keys))]


REGISTRY: dict[str, Primitive] = {}


def register(primitive: Primitive) -> Primitive:
    if primitive.name in REGISTRY:
        raise ValueError(f"primitive {primitive.name!r} is registered twice")
    REGISTRY[primitive.name] = primitive
    return primitive


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def primitives_for(op: str, backend: str, dtype: str) -> list[Primitive]:
    return [
        p for p in REGISTRY.values()
        if p.op == op and backend in p.backends and dtype in p.dtypes and p.available()
    ]


# ---------------------------------------------------------------- GEMM ----

def gemm_work(shape: Shape, dtype: str) -> tuple[float, float]:
    m, n, k = shape["m"], shape["n"], shape["k"]
    return 2.0 * m * n * k, float(ELEM_BYTES[dtype] * (m * k + n * k + m * n))


@functools.lru_cache(maxsize=6)
def _random_matrix(rows: int, cols: int, dtype: str, device: str, transposed: bool = False) -> torch.Tensor:
    """Seeded operands, cached so a sweep over M does not regenerate a large weight per point."""
    gen = torch.Generator(device="cpu").manual_seed(rows * 7919 + cols)
    t = torch.randn(rows, cols, generator=gen).div_(math.sqrt(cols)).to(device, DTYPES[dtype])
    return t.t().contiguous() if transposed else t


def weight_copies(weight_bytes: int, device: Device) -> int:
    """How many copies of a weight to rotate through so each call finds it out of the CPU's caches.

    In serving, every layer's weights pass once per step, so a GEMM never
    finds its weight cached; rotating through copies that together exceed
    twice the last-level cache reproduces that (timing one weight over and
    over would flatter small GEMMs by 2-5x on a 2-core CPU).
    """
    if device.backend != "cpu":
        return 1  # GPUs/NPUs flush their L2 between samples instead
    return max(1, min(64, math.ceil(2 * llc_bytes() / max(weight_bytes, 1))))


def _gemm_operands(shape: Shape, dtype: str, device: Device, transposed_weight: bool = False):
    """The input and the rotation of weight copies for one GEMM shape."""
    dev = str(device.torch_device)
    x = _random_matrix(shape["m"], shape["k"], dtype, dev)
    w = _random_matrix(shape["n"], shape["k"], dtype, dev, transposed_weight)
    copies = weight_copies(w.numel() * w.element_size(), device)
    return x, [w] + [w.clone() for _ in range(copies - 1)]


def rotating(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs the next of ``calls`` each time."""
    if len(calls) == 1:
        return calls[0]
    nxt = itertools.cycle(calls).__next__
    return lambda: nxt()()


def _make_matmul_out(shape, config, dtype, device):
    x, ws = _gemm_operands(shape, dtype, device)
    out = torch.empty(shape["m"], shape["n"], dtype=x.dtype, device=x.device)
    return rotating([lambda w=w: torch.matmul(x, w.t(), out=out) for w in ws])


def _make_linear_functional(shape, config, dtype, device):
    x, ws = _gemm_operands(shape, dtype, device)
    return rotating([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])


def _make_matmul_pretransposed(shape, config, dtype, device):
    x, wts = _gemm_operands(shape, dtype, device, transposed_weight=True)
    out = torch.empty(shape["m"], shape["n"], dtype=x.dtype, device=x.device)
    return rotating([lambda wt=wt: torch.matmul(x, wt, out=out) for wt in wts])


register(Primitive(
    name="torch.linear",
    op="gemm",
    backends=("cpu", "cuda", "npu"),
    dtypes=("float32", "bfloat16", "float16"),
    make=_make_linear_functional,
    work=gemm_work,
))
register(Primitive(
    name="torch.matmul_out",
    op="gemm",
    backends=("cpu", "cuda"),
    dtypes=("float32", "bfloat16", "float16"),
    make=_make_matmul_out,
    work=gemm_work,
))
register(Primitive(
    name="torch.matmul_pretransposed",
    op="gemm",
    backends=("cpu", "cuda"),
    dtypes=("float32", "bfloat16", "float16"),
    make=_make_matmul_pretransposed,
    work=gemm_work,
))


# -- CPU: oneDNN linear with the weight pre-packed once (what the engine runs on CPU) --

def _onednn_available() -> bool:
    from xytune.runtime.linear import onednn_packing_available

    return onednn_packing_available()


def _make_onednn_packed(shape, config, dtype, device):
    from xytune.runtime.linear import Linear, packing_failure

    x, ws = _gemm_operands(shape, dtype, device)
    linears = [Linear(w, mode="packed") for w in ws]
    if linears[0].packed is None:  # the probe must see the failure, not a silent fallback to F.linear
        raise RuntimeError(packing_failure(DTYPES[dtype]) or "oneDNN did not pack this weight")
    return rotating([lin._bind(x) for lin in linears])


register(Primitive(
    name="onednn.packed_linear",
    op="gemm",
    backends=("cpu",),
    dtypes=("float32", "bfloat16"),
    make=_make_onednn_packed,
    work=gemm_work,
    available=_onednn_available,
))


# -- Triton tiled GEMM (CUDA) --

def _triton_available() -> bool:
    from xytune.kernels.triton_gemm import triton_available

    return triton_available()


def shared_memory_bytes(device: Device) -> int:
    if device.backend == "cuda":
        props = torch.cuda.get_device_properties(device.index)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return 96 * 1024  # interpreter / other: a conservative figure


def triton_gemm_invalid(shape: Shape, config: Config, dtype: str, device: Device) -> str | None:
    """Why a tile config cannot or should not run for this shape (None when it is fine)."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    smem = (bm * bk + bk * bn) * ELEM_BYTES[dtype] * config["num_stages"]
    if smem > shared_memory_bytes(device):
        return f"needs {smem} B of shared memory"
    if bm > 16 and bm >= 2 * shape["m"]:
        return "BLOCK_M is over twice M: mostly padding"
    if bk > 16 and bk > shape["k"]:
        return "BLOCK_K exceeds K"
    if bm * bn < config["num_warps"] * 32 * 4:
        return "too few tile elements per thread"
    return None


def _make_triton_gemm(shape, config, dtype, device):
    from xytune.kernels.triton_gemm import triton_gemm

    x, ws = _gemm_operands(shape, dtype, device)
    out = torch.empty(shape["m"], shape["n"], dtype=x.dtype, device=x.device)
    return rotating([lambda w=w: triton_gemm(x, w, out, **config) for w in ws])


register(Primitive(
    name="triton.tiled_gemm",
    op="gemm",
    backends=("cuda",),
    dtypes=("float16", "bfloat16", "float32"),
    make=_make_triton_gemm,
    work=gemm_work,
    space={
        "BLOCK_M": (16, 32, 64, 128),
        "BLOCK_N": (32, 64, 128, 256),
        "BLOCK_K": (32, 64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (2, 3, 4, 5),
    },
    invalid=triton_gemm_invalid,
    available=_triton_available,
))


# -- Ascend NPU: torch_npu matmul with the weight in ND or FRACTAL_NZ layout --

NPU_FORMAT_ND, NPU_FORMAT_FRACTAL_NZ = 2, 29


def _make_npu_matmul(shape, config, dtype, device):
    import torch_npu

    x, wts = _gemm_operands(shape, dtype, device, transposed_weight=True)
    if config["weight_format"] == "NZ":
        wts = [torch_npu.npu_format_cast(wt, NPU_FORMAT_FRACTAL_NZ) for wt in wts]
    return rotating([lambda wt=wt: torch.matmul(x, wt) for wt in wts])


register(Primitive(
    name="npu.matmul",
    op="gemm",
    backends=("npu",),
    dtypes=("float16", "bfloat16", "float32"),
    make=_make_npu_matmul,
    work=gemm_work,
    space={"weight_format": ("ND", "NZ")},
))


# -- Meta-Attention tile classes (torch backend; the profiler picks the tile sizes) --

def attention_work(shape: Shape, dtype: str) -> tuple[float, float]:
    """QK^T and PV over every (query, key) pair of the timed batch; K/V read once."""
    rows, keys, d = shape["m"] * shape.get("q", 1), shape["n"], shape["k"]
    flops = 4.0 * rows * keys * d * shape["heads"]
    return flops, float(ELEM_BYTES[dtype] * (2 * shape["m"] * keys * d * shape["kv_heads"] + 2 * rows * d * shape["heads"]))


def attention_batch(shape: Shape, dtype: str, device: Device, decode: bool, verify_every: int = 8):
    """Seeded requests, q and paged K/V caches for one attention shape (what the profiler times)."""
    from xytune.kernels.meta_attention import AttnRequest

    gen = torch.Generator().manual_seed(shape["m"] * 31 + shape["n"])
    if decode:  # m decodes with contexts spread over [n/8, n] (serving batches mix old and new requests),
        # every eighth a 4-token speculative verify (where tile_q decides whether it joins the short class)
        lens = torch.randint(max(1, shape["n"] // 8), shape["n"] + 1, (shape["m"],), generator=gen).tolist()
        specs = [(4 if verify_every and i % verify_every == verify_every - 1 else 1, c) for i, c in enumerate(lens)]
    else:  # m prefill chunks of q tokens after n cached ones
        specs = [(shape["q"], shape["n"])] * shape["m"]
    page = 16  # K/V in whole pages scattered over the cache, as the engine's block tables place them
    pages = torch.randperm(sum(-(-(q + c) // page) for q, c in specs), generator=gen)
    slots = len(pages) * page
    reqs, used = [], 0
    for q_len, ctx in specs:
        n = -(-(q_len + ctx) // page)
        reqs.append(AttnRequest(q_len, ctx, (pages[used: used + n, None] * page + torch.arange(page)).reshape(-1)
                                [: q_len + ctx]))
        used += n
    dev = str(device.torch_device)
    T = sum(q for q, _ in specs)
    t = DTYPES[dtype]
    q = torch.randn(T, shape["heads"], shape["k"], generator=gen).to(dev, t)
    k = torch.randn(shape["kv_heads"], slots, shape["k"], generator=gen).to(dev, t)
    v = torch.randn(shape["kv_heads"], slots, shape["k"], generator=gen).to(dev, t)
    return reqs, q, k, v


def _make_meta_attention(shape, config, dtype, device, decode):
    from xytune.kernels.meta_attention import plan_meta_attention, run_meta_attention_torch

    reqs, q, k, v = attention_batch(shape, dtype, device, decode)
    plan = plan_meta_attention(reqs, shape["heads"], shape["kv_heads"], k.shape[1], **config)
    scale = shape["k"] ** -0.5
    return lambda: run_meta_attention_torch(plan, q, k, v, scale)  # the plan is made once per step, not timed


def _short_invalid(shape, config, dtype, device):
    if config["tile_q"] < shape["heads"] // shape["kv_heads"]:
        return "tile_q is below the GQA group: a decode token's heads would not fit one tile"
    return None


def _make_attention_plan(shape, config, dtype, device):
    """Meta-Attention's host-side plan alone: a step makes it once for all layers (its cost is per step)."""
    from xytune.kernels.meta_attention import plan_meta_attention

    reqs, q, k, v = attention_batch(shape, dtype, device, decode="q" not in shape)
    return lambda: plan_meta_attention(reqs, shape["heads"], shape["kv_heads"], k.shape[1], pages_aligned=True)


def _make_sdpa_loop(shape, config, dtype, device):
    """Meta-Attention's alternative: one fused SDPA call per request (masks made once per step, not timed)."""
    from xytune.kernels.sdpa_loop import request_masks, run_sdpa_loop

    reqs, q, k, v = attention_batch(shape, dtype, device, decode="q" not in shape)
    masks = request_masks(reqs, q.device)
    return lambda: run_sdpa_loop(reqs, masks, q, k, v, shape["k"] ** -0.5)


ATTENTION_TARGETS = ("attention.decode", "attention.prefill")
PROBE_DECODE = {"m": 2, "n": 32, "k": 16, "heads": 4, "kv_heads": 2}
PROBE_PREFILL = {"m": 1, "q": 8, "n": 8, "k": 16, "heads": 4, "kv_heads": 2}

register(Primitive(
    name="meta.attention_short",
    op="attention",
    backends=("cpu",),
    dtypes=("float32", "bfloat16"),
    make=functools.partial(_make_meta_attention, decode=True),
    work=attention_work,
    space={"tile_q": (4, 8, 16), "tile_kv": (64, 128, 256, 512)},
    invalid=_short_invalid,
    probe_shape=PROBE_DECODE,
    targets=("attention.decode",),
))
register(Primitive(
    name="meta.attention_long",
    op="attention",
    backends=("cpu",),
    dtypes=("float32", "bfloat16"),
    make=functools.partial(_make_meta_attention, decode=False),
    work=attention_work,
    space={"prefill_tile": (32, 64, 128), "sdpa_min_keys": (256, 1024, 1 << 20)},
    probe_shape=PROBE_PREFILL,
    targets=("attention.prefill",),
))
# What the engine weighs Meta-Attention against for a step (plan cost included): see CostModel.attention_choice
register(Primitive(
    name="meta.plan",
    op="attention",
    backends=("cpu",),
    dtypes=("float32", "bfloat16"),
    make=_make_attention_plan,
    work=lambda shape, dtype: (0.0, 0.0),
    probe_shape=PROBE_PREFILL,
    targets=ATTENTION_TARGETS,
))
register(Primitive(
    name="torch.sdpa_loop",
    op="attention",
    backends=("cpu",),
    dtypes=("float32", "bfloat16"),
    make=_make_sdpa_loop,
    work=attention_work,
    probe_shape=PROBE_PREFILL,
    targets=ATTENTION_TARGETS,
))
