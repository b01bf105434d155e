"""``xytune check``: what to run first on a new machine, before trusting a profile or a server on it.

Each check runs the project's real code for the device (the probe, every kernel backend the device has,
a short profile, the engine) and compares against a float64 reference or the reference path, so a
backend that is broken on this machine shows as one failed line, not as wrong tokens later. A check whose
backend the device does not have is "skip" (a CPU has no Triton GEMM), not a failure.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from xytune.kernels.meta_attention import CAUSAL, NO_MASK, TREE, AttnRequest, plan_meta_attention
from xytune.kernels.meta_attention.npu_backend import run_meta_attention_npu
from xytune.kernels.meta_attention.torch_backend import run_meta_attention_torch
from xytune.kernels.meta_attention.triton_backend import plan_triton, run_meta_attention_triton
from xytune.kernels.smooth_gemm import SmoothGEMMPlanner, run_smooth_gemm
from xytune.kernels.triton_gemm import triton_available, triton_gemm
from xytune.profiler.cost_model import CostModel
from xytune.profiler.devices import Device, failure_reason
from xytune.profiler.geometry import resolve_geometry
from xytune.profiler.primitives import DTYPES, gemm_kernels
from xytune.profiler.probe import usable_primitives
from xytune.profiler.sweep import Sweep, SweepSettings, default_dtypes
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM

PASS, FAIL, SKIP = "pass", "fail", "skip"

# Largest error against float64, relative to the reference's largest magnitude, that a kernel in each dtype
# may show: a few units in the last place of the dtype after a K-long reduction.
TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 6e-3}

# One mixed step: prefill, a later chunk over a cached prefix, decodes, a tree verify and a chain verify.
MIXED_STEP = [(CAUSAL, 37, 0), (CAUSAL, 20, 45), (CAUSAL, 1, 130), (CAUSAL, 1, 7), (TREE, 5, 60), (CAUSAL, 4, 33),
              (NO_MASK, 6, 10)]
RAGGED_M = (1, 3, 17, 100, 257)  # token counts no bucket is likely to hold exactly
PROMPT = "The capital of France is"


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0


def run_checks(device: Device, model: str = "smollm2-135m", profile_max_tokens: int = 256, tokens: int = 8,
               table_path: Path | None = None, on_result: Callable[[CheckResult], None] = lambda r: None
               ) -> list[CheckResult]:
    """Every check for ``device``, in order; ``on_result`` sees each as it finishes (a live table)."""
    results: list[CheckResult] = []
    dtypes = _gemm_dtypes(device)
    with tempfile.TemporaryDirectory() as tmp:
        table = table_path or Path(tmp) / "check.parquet"
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = [
            ("probe", lambda: _probe(device)),
            *[(f"meta-attention {backend} {dtype}", lambda b=backend, d=dtype: _meta_attention(device, b, d))
              for backend in _attention_backends(device) for dtype in default_dtypes(device.backend)],
            ("triton gemm", lambda: _triton_gemm(device)),
            ("profile", lambda: _profile(device, model, dtypes, profile_max_tokens, table)),
            *[(f"smooth-gemm {dtype}", lambda d=dtype: _smooth_gemm(device, model, d, table)) for dtype in dtypes],
            ("generate", lambda: _generate(device, model, table, tokens)),
        ]
        for name, step in steps:
            start = time.perf_counter()
            try:
                status, detail = step()
            except Exception as exc:  # a check that raises failed: say why in one line, go on with the rest
                status, detail = FAIL, failure_reason(exc)
            results.append(CheckResult(name, status, detail, round(time.perf_counter() - start, 2)))
            on_result(results[-1])
    return results


def as_dicts(results: list[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]


def _probe(device: Device) -> tuple[str, str]:
    """Every registered primitive run once on a tiny input; at least one GEMM must run in some dtype."""
    parts, any_gemm = [], False
    for dtype in default_dtypes(device.backend):
        for op in ("gemm", "attention"):
            usable, pruned = usable_primitives(op, device, dtype)
            any_gemm |= op == "gemm" and bool(usable)
            text = f"{op} {dtype}: {len(usable)} run"
            if pruned:
                text += f", {len(pruned)} pruned ({'; '.join(f'{p.primitive}: {p.reason}' for p in pruned)})"
            parts.append(text)
    return (PASS if any_gemm else FAIL), "; ".join(parts)


def _gemm_dtypes(device: Device) -> list[str]:
    """The dtypes of a profile on this device in which some GEMM runs (the probe's verdict)."""
    return [d for d in default_dtypes(device.backend) if usable_primitives("gemm", device, d)[0]]


def _attention_backends(device: Device) -> list[str]:
    """Meta-Attention's backends this device runs: torch everywhere, Triton on CUDA, torch_npu on Ascend."""
    return ["torch"] + {"cuda": ["triton"], "npu": ["npu"]}.get(device.backend, [])


def mixed_step(num_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0, slots: int = 2048):
    """Requests of ``MIXED_STEP`` with scattered cache slots, and random q and head-major K/V caches."""
    gen = torch.Generator().manual_seed(seed)
    perm, used, requests = torch.randperm(slots, generator=gen), 0, []
    for kind, q_len, ctx in MIXED_STEP:
        key_slots, used = perm[used: used + ctx + q_len], used + ctx + q_len
        parents = tuple(i - 1 if i % 2 else (i // 2) - 1 for i in range(q_len)) if kind == TREE else None
        requests.append(AttnRequest(q_len, ctx, key_slots, kind, parents))
    q = torch.randn(sum(r.q_len for r in requests), num_heads, head_dim, generator=gen)
    k = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    v = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    return requests, q, k, v


def attention_float64(requests: list[AttnRequest], q, k_cache, v_cache, scale: float) -> torch.Tensor:
    """Per request and head, dense, in float64 on the CPU: the answer every backend is held to."""
    group = q.shape[1] // k_cache.shape[0]
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    out, row = torch.empty_like(q), 0
    for r in requests:
        rows = slice(row, row + r.q_len)
        k = k_cache[:, r.key_slots].repeat_interleave(group, 0)  # [H, L, d]
        v = v_cache[:, r.key_slots].repeat_interleave(group, 0)
        scores = torch.einsum("thd,hld->htl", q[rows], k) * scale
        probs = scores.masked_fill(~r.allowed()[None], float("-inf")).softmax(-1)
        out[rows] = torch.einsum("htl,hld->thd", probs, v)
        row += r.q_len
    return out


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double().cpu() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _meta_attention(device: Device, backend: str, dtype: str) -> tuple[str, str]:
    """A mixed prefill/decode/verify step with GQA (9 query heads on 3 KV heads) and a tree mask."""
    heads, kv_heads, head_dim = 9, 3, 64
    requests, q, k, v = mixed_step(heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    dt, dev = DTYPES[dtype], device.torch_device
    qd, kd, vd = q.to(dev, dt), k.to(dev, dt), v.to(dev, dt)
    if backend == "triton":
        out = run_meta_attention_triton(plan_triton(requests, heads, kv_heads, device=dev), qd, kd, vd, scale)
    else:
        plan = plan_meta_attention(requests, heads, kv_heads, k.shape[1], tile_q=8, tile_kv=64, prefill_tile=16)
        if backend == "npu":
            out = run_meta_attention_npu(plan, qd, kd, vd, scale)
        else:
            out = run_meta_attention_torch(plan, qd, kd, vd, scale)
    error = relative_error(out, attention_float64(requests, qd, kd, vd, scale))
    status = PASS if error <= TOLERANCE[dtype] else FAIL
    return status, f"{len(requests)} requests, {q.shape[0]} tokens: max error {error:.1e} of the largest output " \
                   f"(allowed {TOLERANCE[dtype]:.0e})"


def _triton_gemm(device: Device) -> tuple[str, str]:
    """The tiled Triton GEMM over ragged M, masked tails included (CUDA only)."""
    if device.backend != "cuda":
        return SKIP, f"the Triton GEMM runs on CUDA; this device is {device.name}"
    if not triton_available():
        return FAIL, "triton is not importable in this environment (pip install triton)"
    worst, gen = 0.0, torch.Generator().manual_seed(0)
    for dtype in ("float32", "bfloat16", "float16"):
        w = torch.randn(576, 1536, generator=gen)
        for m in RAGGED_M:
            x = torch.randn(m, 1536, generator=gen)
            out = triton_gemm(x.to(device.torch_device, DTYPES[dtype]), w.to(device.torch_device, DTYPES[dtype]))
            err = relative_error(out, x.double() @ w.double().T)
            worst = max(worst, err / TOLERANCE[dtype])
    return (PASS if worst <= 1 else FAIL), f"M {', '.join(map(str, RAGGED_M))} x 3 dtypes: worst error " \
                                           f"{worst:.2f} of its dtype's allowance"


def _profile(device: Device, model: str, dtypes: list[str], max_tokens: int, table: Path) -> tuple[str, str]:
    """A short profile of the model's GEMM shapes (quick timing, M up to ``max_tokens``)."""
    if not dtypes:
        return FAIL, "no GEMM runs in any dtype on this device (see the probe)"
    settings = SweepSettings.quick(dtypes, max_tokens)
    sweep = Sweep(device, resolve_geometry(model), settings, table, overwrite=True)
    result = sweep.run(progress=False)
    rows = result.rows
    gemm = rows[rows["op"] == "gemm"]
    best = gemm["achieved_flops"].max() / 1e9 if len(gemm) else 0.0
    return PASS, f"{len(rows)} rows of {model}, M up to {max_tokens}, {','.join(dtypes)}; best GEMM {best:,.0f} GFLOP/s"


def _smooth_gemm(device: Device, model: str, dtype: str, table: Path) -> tuple[str, str]:
    """SmoothGEMM planned from the profile just made, over ragged M, on the model's gate_up weight."""
    cost_model = CostModel.load(table, device)
    g = resolve_geometry(model).gemm("gate_up")
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(g.n, g.k, generator=gen), torch.randn(g.n, generator=gen)
    dt, dev = DTYPES[dtype], device.torch_device
    kernels = gemm_kernels(w.to(dev, dt), b.to(dev, dt))
    planner = SmoothGEMMPlanner(cost_model, g.n, g.k, dtype, primitives=set(kernels))
    worst, used, ms = 0.0, set(), [m for m in RAGGED_M if m <= max(planner.buckets)]
    for m in ms:
        x = torch.randn(m, g.k, generator=gen).to(dt)
        plan = planner.plan(m)
        used |= {s.primitive for s in plan.segments}
        out = run_smooth_gemm(plan, x.to(dev), kernels, n=g.n)
        reference = torch.nn.functional.linear(x.double(), w.to(dt).double(), b.to(dt).double())
        worst = max(worst, relative_error(out, reference))
    status = PASS if worst <= TOLERANCE[dtype] else FAIL
    return status, f"gate_up {g.n}x{g.k}, M {', '.join(map(str, ms))}: max error {worst:.1e} (allowed {TOLERANCE[dtype]:.0e}); " \
                   f"primitives {', '.join(sorted(used))}"


def _generate(device: Device, model: str, table: Path, tokens: int) -> tuple[str, str]:
    """Greedy tokens with the table's dtype and kernels (SmoothGEMM, Meta-Attention) against the float32
    reference path: equal in float32; in a half-precision dtype rounding may fork the text later, so the first
    token must agree and the agreeing prefix is reported."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    tuned = LLM(model, device=str(device.torch_device), profile=str(table), attention="meta", gemm="smooth")
    dtype = str(tuned.dtype).replace("torch.", "")
    start = time.perf_counter()
    got = tuned.generate(PROMPT, params)[0].outputs[0]
    seconds = time.perf_counter() - start
    del tuned
    reference = LLM(model, device=str(device.torch_device), dtype="float32", attention="reference", gemm="plain")
    want = list(reference.generate(PROMPT, params)[0].outputs[0].token_ids)
    agree = next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b), min(len(want), len(got.token_ids)))
    ok = agree == len(want) == len(got.token_ids) if dtype == "float32" else agree >= 1
    detail = (f"{len(got.token_ids)} tokens in {dtype} in {seconds:.2f} s, {agree} of {len(want)} as the float32 "
              f"reference: {got.text!r}")
    return (PASS if ok else FAIL), detail
