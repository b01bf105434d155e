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

from xytune.kernels.gemm import (
    COPYING,
    SegmentKernel,
    bind_linear,
    bind_matmul_out,
    bind_matmul_pretransposed,
    bind_npu_matmul,
    bind_onednn_packed,
    bind_triton,
    onednn_packing_available,
)
from xytune.kernels.meta_attention import AttnRequest, plan_meta_attention
from xytune.kernels.meta_attention.backends import RUNS, backend_for, triton_tiles
from xytune.kernels.meta_attention.triton_backend import MIN_BLOCK, plan_triton
from xytune.kernels.quantized import (
    QuantizedWeight,
    bind_int4_weight,
    bind_int8_weight,
    int4_weight_ops_available,
    int8_weight_ops_available,
    npu_weight_quant_available,
)
from xytune.kernels.sdpa_loop import request_masks, run_sdpa_loop
from xytune.kernels.triton_gemm import triton_available
from xytune.profiler.devices import Device, llc_bytes

Shape = dict[str, int]
Config = dict[str, Any]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
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
    bind: Callable | None = None  # gemm: (weight, bias) -> the kernel serving runs (kernels/gemm.py)
    weight_format: str = "float"  # gemm: the weight format bind prepares (kernels/quantized.py WEIGHT_FORMATS)

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


@functools.lru_cache(maxsize=2)
def _weight_rotation(rows: int, cols: int, dtype: str, device: str, transposed: bool, copies: int) -> tuple:
    """A weight and its copies, kept for the next shape group: a sweep times one weight at every M with every
    primitive in a row, and making up to twice the last-level cache of copies each time would cost more than
    the timing (kernels only read their weights)."""
    w = _random_matrix(rows, cols, dtype, device, transposed)
    return (w,) + tuple(w.clone() for _ in range(copies - 1))


def _gemm_operands(shape: Shape, dtype: str, device: Device, transposed_weight: bool = False):
    """The input and the rotation of weight copies for one GEMM shape."""
    dev = str(device.torch_device)
    x = _random_matrix(shape["m"], shape["k"], dtype, dev)
    copies = weight_copies(shape["n"] * shape["k"] * ELEM_BYTES[dtype], device)
    return x, list(_weight_rotation(shape["n"], shape["k"], dtype, dev, transposed_weight, copies))


def rotating(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs the next of ``calls`` each time."""
    if len(calls) == 1:
        return calls[0]
    nxt = itertools.cycle(calls).__next__
    return lambda: nxt()()


def _make_bound_gemm(bind: Callable, name: str) -> Callable:
    """A GEMM primitive's ``make``: its kernel bound to each rotated weight copy, called as serving calls it
    (into a preallocated output unless the kernel copies into one, which a one-segment GEMM does not ask)."""

    def make(shape, config, dtype, device):
        x, ws = _gemm_operands(shape, dtype, device)
        out = None if name in COPYING else torch.empty(shape["m"], shape["n"], dtype=x.dtype, device=x.device)
        kernels = _bound_rotation(bind, ws)
        return rotating([lambda k=k: k(x, out, config) for k in kernels])
    return make


_BOUND: dict = {}  # (bind, id of the rotation's first weight, copies) -> (that weight, kernels): _bound_rotation


def release_operands() -> None:
    """Free the weight copies and prepared layouts kept between shape groups (up to a few GiB on a CPU with a
    large last-level cache): a sweep ends, and the process may go on to serve (``serve``'s quick profile)."""
    _BOUND.clear()
    _weight_rotation.cache_clear()
    _random_matrix.cache_clear()


def _bound_rotation(bind: Callable, weights: list[torch.Tensor]) -> tuple:
    """``bind`` applied to each weight copy (its layout prepared: transposed, packed, quantized), kept while the
    sweep stays on this weight: preparing up to 64 copies again at every M cost more than timing them."""
    key = (bind, id(weights[0]), len(weights))
    if key not in _BOUND:
        if any(k[1] != key[1] for k in _BOUND):  # the sweep moved to another weight: free the old layouts
            _BOUND.clear()
        _BOUND[key] = (weights[0], tuple(bind(w) for w in weights))  # holding the weight keeps its id unique
    return _BOUND[key][1]


def register_gemm(name: str, bind: Callable, backends: tuple[str, ...], dtypes=("float32", "bfloat16", "float16"),
                  profile_bind: Callable | None = None, **fields) -> Primitive:
    """A weight GEMM: ``bind(weight, bias)`` is the kernel serving runs; the profiler times ``profile_bind``
    (default ``bind``: the same kernel, with any lazy layout prepared before timing)."""
    return register(Primitive(name=name, op="gemm", backends=backends, dtypes=dtypes, bind=bind,
                              make=_make_bound_gemm(profile_bind or bind, name), work=gemm_work, **fields))


register_gemm("torch.linear", bind_linear, ("cpu", "cuda", "npu"))
register_gemm("torch.matmul_out", bind_matmul_out, ("cpu", "cuda"))
register_gemm("torch.matmul_pretransposed", bind_matmul_pretransposed, ("cpu", "cuda"),
              profile_bind=functools.partial(bind_matmul_pretransposed, eager=True))
# CPU: oneDNN linear with the weight pre-packed once (what the engine runs on CPU); binding raises where
# this CPU cannot pack the dtype, so the probe prunes it
register_gemm("onednn.packed_linear", bind_onednn_packed, ("cpu",), ("float32", "bfloat16"),
              available=onednn_packing_available)
# CPU weight-only quantized GEMMs (kernels/quantized.py): the weight quantized once at bind, activations in the
# sweep's dtype; an op this torch lacks or a dtype it refuses is pruned by the probe
register_gemm("torch.int8pack_mm", bind_int8_weight, ("cpu",), weight_format="int8",
              available=int8_weight_ops_available)
register_gemm("torch.int4pack_mm", bind_int4_weight, ("cpu",), weight_format="int4",
              available=int4_weight_ops_available)
# Ascend: torch_npu's weight-only quantized matmul on the same formats (half-precision activations only)
register_gemm("npu.weight_quant_int8", bind_int8_weight, ("npu",), ("bfloat16", "float16"), weight_format="int8",
              available=npu_weight_quant_available)
register_gemm("npu.weight_quant_int4", bind_int4_weight, ("npu",), ("bfloat16", "float16"), weight_format="int4",
              available=npu_weight_quant_available)


def weight_format_of(primitive: str) -> str:
    """The weight format a GEMM primitive runs on (float for names not registered, as synthetic tables use)."""
    p = REGISTRY.get(primitive)
    return p.weight_format if p is not None else "float"


# -- Triton tiled GEMM (CUDA) --

def shared_memory_bytes(device: Device) -> int:
    if device.backend == "cuda":
        props = torch.cuda.get_device_properties(device.index)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return 96 * 1024  # interpreter / other: a conservative figure


# Accumulator registers a thread may hold: BLOCK_M * BLOCK_N / (32 * num_warps) float32 values. A thread has at
# most 255 registers on NVIDIA GPUs (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"); half of them for the accumulator leaves the rest for the operand fragments, addresses and the
# pipeline. 128 is also where Triton's own matmul tutorial stops (python/tutorials/03-matrix-multiplication.py:
# 128x256 and 256x128 tiles take 8 warps, 256x64 and 64x256 take 4); 128x256 on 2 warps would hold 512 and spill.
ACC_REGISTERS_PER_THREAD = 128


def triton_gemm_invalid(shape: Shape, config: Config, dtype: str, device: Device) -> str | None:
    """Why a tile config cannot or should not run for this shape (None when it is fine).

    Shared memory holds the pipeline's ``num_stages`` copies of the A and B tiles during the K loop, then the
    epilogue's scratch: the float32 accumulator tile passes through shared memory when its layout is converted
    for a coalesced store (at most BLOCK_M x BLOCK_N x 4 bytes). Triton gives both the same bytes, one after
    the other (triton lib/Analysis/Allocation.cpp: a scratch buffer lives only during its op and buffers are
    placed by liveness), so the need is the larger of the two.
    """
    bm, bn, bk, warps = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_warps"]
    pipeline = (bm * bk + bk * bn) * ELEM_BYTES[dtype] * config["num_stages"]
    epilogue = bm * bn * 4
    acc_registers = bm * bn // (32 * warps)
    if acc_registers > ACC_REGISTERS_PER_THREAD:
        return (f"holds {acc_registers} accumulator values per thread (over {ACC_REGISTERS_PER_THREAD}): "
                "registers would spill")
    if max(pipeline, epilogue) > shared_memory_bytes(device):
        part = "its K-loop pipeline" if pipeline >= epilogue else "its epilogue (the float32 tile)"
        return f"needs {max(pipeline, epilogue)} B of shared memory for {part}"
    if bm > 16 and bm >= 2 * shape["m"]:
        return "BLOCK_M is over twice M: mostly padding"
    if bk > 16 and bk > shape["k"]:
        return "BLOCK_K exceeds K"
    if bm * bn < warps * 32 * 4:
        return "too few tile elements per thread"
    return None


register_gemm("triton.tiled_gemm", bind_triton, ("cuda",), ("float16", "bfloat16", "float32"),
              space={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
                     "num_warps": (2, 4, 8), "num_stages": (2, 3, 4, 5)},
              invalid=triton_gemm_invalid, available=triton_available)
# CUDA weight-only quantized GEMMs: the same formats dequantized tile by tile in Triton (kernels/triton_gemm.py);
# decode's small M is what they are for, so the M tiles stay small
WEIGHT_QUANT_TILES = {"BLOCK_M": (16, 32, 64), "BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64, 128),
                      "num_warps": (2, 4, 8), "num_stages": (2, 3, 4)}
register_gemm("triton.weight_quant_int8", bind_int8_weight, ("cuda",), ("float16", "bfloat16"), weight_format="int8",
              space=WEIGHT_QUANT_TILES, invalid=triton_gemm_invalid, available=triton_available)
register_gemm("triton.weight_quant_int4", bind_int4_weight, ("cuda",), ("float16", "bfloat16"), weight_format="int4",
              space=WEIGHT_QUANT_TILES, invalid=triton_gemm_invalid, available=triton_available)
# Ascend NPU: torch_npu matmul with the weight in ND or FRACTAL_NZ layout
register_gemm("npu.matmul", bind_npu_matmul, ("npu",), space={"weight_format": ("ND", "NZ")})


def gemm_kernels(weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None,
                 quantized: dict[str, QuantizedWeight] | None = None) -> dict[str, SegmentKernel]:
    """Every registered GEMM primitive that runs this weight here, bound to it (SmoothGEMM's choices).

    ``packed``: the weight's oneDNN layout when the caller made one; without it oneDNN is left out, as it
    is where packing fails. ``quantized``: the weight's quantized formats loaded (their primitives join);
    ``weight`` None: the float weight is not loaded, so only those run."""
    quantized = quantized or {}
    if weight is None and not quantized:
        raise ValueError("gemm_kernels needs the float weight or at least one quantized format of it")
    like = weight if weight is not None else next(iter(quantized.values())).scales
    backend, dtype = like.device.type, _DTYPE_NAMES.get(like.dtype)
    kernels = {}
    for p in primitives_for("gemm", backend, dtype):
        if p.weight_format != "float":
            if p.weight_format in quantized:
                kernels[p.name] = p.bind(weight, bias, quantized=quantized[p.weight_format])
        elif weight is None:
            continue
        elif p.name == "onednn.packed_linear":
            if packed is not None:
                kernels[p.name] = bind_onednn_packed(weight, bias, packed)
        else:
            kernels[p.name] = p.bind(weight, bias)
    return kernels


# -- Meta-Attention tile classes (each device's own backend; the profiler picks the tile sizes) --

def attention_work(shape: Shape, dtype: str) -> tuple[float, float]:
    """QK^T and PV over every (query, key) pair of the timed batch; K/V read once."""
    rows, keys, d = shape["m"] * shape.get("q", 1), shape["n"], shape["k"]
    flops = 4.0 * rows * keys * d * shape["heads"]
    kv_bytes = 2 * shape["m"] * keys * d * shape["kv_heads"]
    return flops, float(ELEM_BYTES[dtype] * (kv_bytes + 2 * rows * d * shape["heads"]))


def attention_batch(shape: Shape, dtype: str, device: Device, decode: bool):
    """Seeded requests, q and paged K/V caches for one attention shape (what the profiler times)."""
    gen = torch.Generator().manual_seed(shape["m"] * 31 + shape["n"])
    verify_every = shape.get("verify_every", 8)
    if decode:  # m decodes with contexts spread over [n/8, n] (serving batches mix old and new requests),
        # every eighth a 4-token speculative verify (where tile_q decides whether it joins the short class;
        # shapes with verify_every 0 have none)
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


def _attention_plan(backend: str, reqs, shape: Shape, slots: int, config: Config, device, **torch_options):
    """The plan the engine makes on this backend (once per step: timed apart from the run)."""
    if backend == "triton":
        tiles = triton_tiles(config["tile_q"], config["tile_kv"]) if "tile_q" in config else {}
        return plan_triton(reqs, shape["heads"], shape["kv_heads"], device=device, **tiles)
    return plan_meta_attention(reqs, shape["heads"], shape["kv_heads"], slots, **config, **torch_options)


def _make_meta_attention(shape, config, dtype, device, decode):
    reqs, q, k, v = attention_batch(shape, dtype, device, decode)
    backend = backend_for(device.backend, dtype)
    plan = _attention_plan(backend, reqs, shape, k.shape[1], config, q.device)
    run, scale = RUNS[backend], shape["k"] ** -0.5
    return lambda: run(plan, q, k, v, scale)  # the plan is made once per step, not timed


def _short_invalid(shape, config, dtype, device):
    if backend_for(device.backend, dtype) == "triton":
        if config["tile_q"] < MIN_BLOCK:
            return f"the Triton kernel packs rows in blocks of at least {MIN_BLOCK}: tile_q={MIN_BLOCK} runs the same"
        return None
    if config["tile_q"] < shape["heads"] // shape["kv_heads"]:
        return "tile_q is below the GQA group: a decode token's heads would not fit one tile"
    return None


LONG_SPACE = {"prefill_tile": (32, 64, 128), "sdpa_min_keys": (256, 1024, 1 << 20)}


def _long_invalid(shape, config, dtype, device):
    if backend_for(device.backend, dtype) == "triton" and config != {k: v[0] for k, v in LONG_SPACE.items()}:
        return "the Triton kernel has no prefill_tile or sdpa_min_keys: one config stands for all"
    return None


def _make_attention_plan(shape, config, dtype, device):
    """Meta-Attention's host-side plan alone: a step makes it once for all layers (its cost is per step)."""
    reqs, q, k, v = attention_batch(shape, dtype, device, decode="q" not in shape)
    backend = backend_for(device.backend, dtype)
    return lambda: _attention_plan(backend, reqs, shape, k.shape[1], {}, q.device, pages_aligned=True)


def _make_sdpa_loop(shape, config, dtype, device):
    """Meta-Attention's alternative: one fused SDPA call per request (masks made once per step, not timed)."""
    reqs, q, k, v = attention_batch(shape, dtype, device, decode="q" not in shape)
    masks = request_masks(reqs, q.device)
    return lambda: run_sdpa_loop(reqs, masks, q, k, v, shape["k"] ** -0.5)


# attention.decode_plain: decodes without verifies, timed only to choose the path (AttentionPaths), not the tiles
ATTENTION_TARGETS = ("attention.decode", "attention.decode_plain", "attention.prefill")
PROBE_DECODE = {"m": 2, "n": 32, "k": 16, "heads": 4, "kv_heads": 2}
PROBE_PREFILL = {"m": 1, "q": 8, "n": 8, "k": 16, "heads": 4, "kv_heads": 2}


def register_attention(name: str, make: Callable, **fields) -> Primitive:
    """An attention primitive, timed per step class (``targets``) on every device with a Meta-Attention backend
    (torch on CPU, Triton on CUDA, torch_npu on Ascend: ``backend_for``)."""
    return register(Primitive(name=name, op="attention", backends=("cpu", "cuda", "npu"),
                              dtypes=("float32", "bfloat16", "float16"), make=make,
                              **{"work": attention_work, **fields}))


register_attention("meta.attention_short", functools.partial(_make_meta_attention, decode=True),
                   space={"tile_q": (4, 8, 16), "tile_kv": (64, 128, 256, 512)}, invalid=_short_invalid,
                   probe_shape=PROBE_DECODE, targets=("attention.decode", "attention.decode_plain"))
register_attention("meta.attention_long", functools.partial(_make_meta_attention, decode=False),
                   space=LONG_SPACE, invalid=_long_invalid, probe_shape=PROBE_PREFILL, targets=("attention.prefill",))
# What the engine weighs Meta-Attention against for a step (plan cost included): see CostModel.attention_ratios
register_attention("meta.plan", _make_attention_plan, work=lambda shape, dtype: (0.0, 0.0),
                   probe_shape=PROBE_PREFILL, targets=ATTENTION_TARGETS)
register_attention("torch.sdpa_loop", _make_sdpa_loop, probe_shape=PROBE_PREFILL, targets=ATTENTION_TARGETS)
