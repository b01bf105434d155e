"""``xytune bench kernels``: Meta-Attention and SmoothGEMM against their baselines, side by side.

Attention: seeded mixed batches (decodes over 50-500 cached tokens, prefill
chunks of 16-128 tokens with and without a cached prefix, a verify tree)
through Meta-Attention, a per-request loop of torch's fused SDPA, and one
SDPA call over the batch padded to its longest request with a mask. Index
and mask building of the baselines is left out of their timings; the plan
of Meta-Attention is timed on its own (a step makes it once for all layers).
Each figure is per layer over a whole step's layers, each layer with its own
K/V cache and the layer's weights streamed through the CPU caches between
calls, so every contender finds its data where it would while serving.

GEMM: SmoothGEMM against the exact-shape matmul, against padding M up to the
table's next bucket (what CUDA-graph serving does), and against the oracle
(every primitive timed at the exact M, the fastest taken), over M from 1 to
4096, for the model's GEMMs. Timings alternate between the contenders.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from xytune.kernels.gemm import pack_weight
from xytune.kernels.meta_attention import CAUSAL, TREE, AttnRequest, plan_meta_attention, run_meta_attention_torch
from xytune.kernels.meta_attention.backends import RUNS, backend_for, triton_tiles
from xytune.kernels.meta_attention.triton_backend import plan_triton
from xytune.kernels.sdpa_loop import request_masks, run_sdpa_loop
from xytune.kernels.smooth_gemm import SmoothGEMMPlanner, run_smooth_gemm
from xytune.profiler.devices import llc_bytes
from xytune.profiler.host_memory import keep_freed_memory
from xytune.profiler.primitives import gemm_kernels
from xytune.runtime.model.attention import AttentionPaths


def mixed_batch(n: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                tree: bool = True):
    """3/4 decodes (50-500 cached keys), the rest prefill chunks (16-128 tokens, half after a cached prefix),
    one of them a 5-node verify tree (``tree``); K/V in 16-slot pages scattered over a paged cache (as block
    tables do)."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        if i == n // 2 and tree:
            specs.append((TREE, 5, int(rng.integers(50, 500))))
        elif rng.random() < 0.75:
            specs.append((CAUSAL, 1, int(rng.integers(50, 500))))
        else:
            specs.append((CAUSAL, int(rng.integers(16, 129)), int(rng.integers(0, 257)) if rng.random() < 0.5 else 0))
    page = 16
    pages = torch.from_numpy(rng.permutation(sum(-(-(q + c) // page) for _, q, c in specs) + 4))
    slots = len(pages) * page
    used, requests = 0, []
    for kind, q_len, ctx in specs:
        n = -(-(ctx + q_len) // page)
        key_slots = (pages[used: used + n, None] * page + torch.arange(page)).reshape(-1)[: ctx + q_len]
        used += n
        parents = (-1, 0, 1, 0, 3) if kind == TREE else None
        requests.append(AttnRequest(q_len, ctx, key_slots, kind, parents))
    gen = torch.Generator().manual_seed(seed)
    T = sum(r.q_len for r in requests)
    q = torch.randn(T, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_kv_heads, slots, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_kv_heads, slots, head_dim, generator=gen).to(dtype)
    return requests, q, k, v


def padded_inputs(requests):
    """Indices and mask of the padded-batch baseline: every request padded to the longest query and key range."""
    n, mq, mk = len(requests), max(r.q_len for r in requests), max(r.num_keys for r in requests)
    tok = torch.zeros(n, mq, dtype=torch.long)
    slots = torch.zeros(n, mk, dtype=torch.long)
    mask = torch.zeros(n, 1, mq, mk, dtype=torch.bool)
    mask[..., 0] = True  # padding rows read one key (finite, discarded)
    rows, base = [], 0
    for i, r in enumerate(requests):
        tok[i, : r.q_len] = torch.arange(base, base + r.q_len)
        slots[i, : r.num_keys] = r.key_slots
        mask[i, 0, : r.q_len] = False
        mask[i, 0, : r.q_len, : r.num_keys] = r.allowed()
        rows.append(i * mq + torch.arange(r.q_len))
        base += r.q_len
    return tok, slots, mask, torch.cat(rows)


def sdpa_padded(inputs, q, k_cache, v_cache, scale):
    tok, slots, mask, rows = inputs
    n, mq = tok.shape
    qg = q[tok].transpose(1, 2)
    kg = k_cache[:, slots].transpose(0, 1)
    vg = v_cache[:, slots].transpose(0, 1)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k_cache.shape[0])
    return o.transpose(1, 2).reshape(n * mq, *q.shape[1:])[rows]


def _median_alternating(fns: dict, repeats: int, device=None) -> dict:
    """Median seconds of each contender, taking turns, each call after the caches were flushed.

    In serving, the KV cache and the weights come from memory (30 layers pass between two uses);
    flushing also keeps one contender from warming the caches for the next. On a GPU (``device``, a
    Device) the L2 is flushed and each call is timed synchronised, launches included (a segment more is a
    launch more, and serving pays it).
    """
    gpu = device is not None and device.backend != "cpu"
    flush = (lambda: device.flush_cache()) if gpu else \
        (lambda buf=torch.ones(2 * llc_bytes() // 4, dtype=torch.float32): buf.sum())  # read, not write
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            flush()
            times[name].append(device.time_once(f) if gpu else _seconds(f))
    return {name: float(np.median(t)) for name, t in times.items()}


def _seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def _per_layer_alternating(fns: dict, caches: list, weight_bytes: int, repeats: int) -> dict:
    """Median seconds per layer of each contender over a whole step's layers, contenders taking turns.

    Emulates where a step finds its data: every layer attends over its own K/V cache (cold, 29 other layers
    ran since), and between two layers the layer's weights (``weight_bytes``) stream through the CPU caches,
    read but not timed. What one step shares across layers (Meta-Attention's plan, the baselines' masks and
    indices) stays shared, as in the engine.
    """
    weights = torch.ones(max(weight_bytes, 4) // 4, dtype=torch.float32)
    flush = torch.ones(2 * llc_bytes() // 4, dtype=torch.float32)
    for f in fns.values():
        f(*caches[0])
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            flush.sum()  # no contender warms the caches for the next
            total = 0.0
            for k, v in caches:
                weights.sum()  # read, not write: no dirty lines left to write back during the timed call
                start = time.perf_counter()
                f(k, v)
                total += time.perf_counter() - start
            times[name].append(total / len(caches))
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_attention(sizes=(16, 32, 64), num_heads=9, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16,
                    tiles: dict | None = None, repeats=15, seed=0, layers=30, layer_weight_bytes=7_000_000,
                    engine_paths: AttentionPaths | None = None) -> list[dict]:
    """``layers`` and ``layer_weight_bytes``: the model's, so each call finds its data where a step would.

    ``engine_paths`` is what the table told the engine to run for a step with prefill of that many requests
    ("meta" or "loop", the per-request SDPA loop; default Meta-Attention), and ``engine_vs_loop`` is that
    choice, Meta-Attention's plan spread over the step's layers, against the loop.
    """
    engine_paths = engine_paths or AttentionPaths()
    keep_freed_memory()  # as the engine does: no page faults on every call's fresh tensors
    rows = []
    scale = head_dim ** -0.5
    for n in sizes:
        requests, q, k, v = mixed_batch(n, num_heads, num_kv_heads, head_dim, dtype, seed + n)
        masks = request_masks(requests)
        padded = padded_inputs(requests)

        def make_plan():
            return plan_meta_attention(requests, num_heads, num_kv_heads, k.shape[1], **(tiles or {}))

        plan = make_plan()
        plan_s = _median_alternating({"plan": make_plan}, max(5, repeats))["plan"]
        ref = run_sdpa_loop(requests, masks, q.float(), k.float(), v.float(), scale)
        got = run_meta_attention_torch(plan, q, k, v, scale).float()
        err = float((got - ref).abs().max())
        caches = [(k, v)] + [(k.clone(), v.clone()) for _ in range(layers - 1)]
        t = _per_layer_alternating({
            "meta": lambda kc, vc: run_meta_attention_torch(plan, q, kc, vc, scale),
            "loop": lambda kc, vc: run_sdpa_loop(requests, masks, q, kc, vc, scale),
            "padded": lambda kc, vc: sdpa_padded(padded, q, kc, vc, scale),
        }, caches, layer_weight_bytes, repeats)
        del caches
        meta_step = t["meta"] + plan_s / layers  # per layer, the plan's share included
        engine_path = engine_paths.path(decode_only=False, num_requests=n)  # mixed steps have prompt tokens
        engine = meta_step if engine_path == "meta" else t["loop"]
        rows.append({"requests": n, "tokens": int(q.shape[0]), "meta_ms": t["meta"] * 1e3, "loop_ms": t["loop"] * 1e3,
                     "padded_ms": t["padded"] * 1e3, "plan_ms": plan_s * 1e3,
                     "vs_loop": t["loop"] / t["meta"], "vs_loop_with_plan": t["loop"] / meta_step,
                     "vs_padded": t["padded"] / t["meta"], "engine_path": engine_path,
                     "engine_vs_loop": t["loop"] / engine, "max_abs_err": err, "counts": plan.counts})
    return rows


def varlen_flash(requests, q, k_cache, v_cache, scale):
    """torch's varlen FlashAttention over the batch (CUDA), K/V packed per request once, outside the timing: the
    layout its own cache would keep. Causal with the bottom-right alignment FlashAttention uses, so a chunk after
    a cached prefix and a decode see their whole context; it has no tree mask (the batch must have no tree)."""
    from torch.nn.attention.varlen import varlen_attn  # CUDA only; torch >= 2.9

    dev = q.device
    slots = torch.cat([r.key_slots for r in requests]).to(dev)
    k = k_cache[:, slots].transpose(0, 1).contiguous()  # [keys, kv_heads, d]
    v = v_cache[:, slots].transpose(0, 1).contiguous()
    cu_q = torch.tensor([0] + list(np.cumsum([r.q_len for r in requests])), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + list(np.cumsum([r.num_keys for r in requests])), dtype=torch.int32, device=dev)
    max_q, max_k = max(r.q_len for r in requests), max(r.num_keys for r in requests)
    gqa = q.shape[1] != k_cache.shape[0]
    return lambda: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0),
                               enable_gqa=gqa)


def bench_attention_on_device(device, tiles: dict, sizes=(16, 32, 64), num_heads=9, num_kv_heads=3, head_dim=64,
                              dtype=torch.bfloat16, repeats=15, seed=0) -> list[dict]:
    """Meta-Attention on the device's own backend (Triton on CUDA, torch_npu on Ascend, torch on CPU) against the
    per-request SDPA loop and, on CUDA, torch's varlen FlashAttention, each call synchronised and the L2
    flushed between calls (``_median_alternating``). The batches have no verify tree, which varlen cannot mask.
    ``tiles``: Meta-Attention's (``meta_tiles_from_table``)."""
    backend = backend_for(device.backend, str(dtype).removeprefix("torch."))
    dev, scale, rows = device.torch_device, head_dim ** -0.5, []
    for n in sizes:
        requests, q, k, v = mixed_batch(n, num_heads, num_kv_heads, head_dim, dtype, seed + n, tree=False)
        q, k, v = q.to(dev), k.to(dev), v.to(dev)
        if backend == "triton":
            plan = plan_triton(requests, num_heads, num_kv_heads, device=dev,
                               **triton_tiles(tiles["tile_q"], tiles["tile_kv"]))
        else:
            plan = plan_meta_attention(requests, num_heads, num_kv_heads, k.shape[1], **tiles)
        masks = request_masks(requests, dev)
        fns = {"meta": lambda: RUNS[backend](plan, q, k, v, scale),
               "loop": lambda: run_sdpa_loop(requests, masks, q, k, v, scale)}
        if device.backend == "cuda":
            fns["varlen"] = varlen_flash(requests, q, k, v, scale)
        reference = run_sdpa_loop(requests, masks, q.float(), k.float(), v.float(), scale)
        errors = {name: float((f().float() - reference).abs().max()) for name, f in fns.items()}
        t = _median_alternating(fns, repeats, device)
        row = {"requests": n, "tokens": int(q.shape[0]), "backend": backend,
               **{f"{name}_ms": sec * 1e3 for name, sec in t.items()},
               **{f"vs_{name}": sec / t["meta"] for name, sec in t.items() if name != "meta"},
               "max_abs_err": max(errors.values())}
        rows.append(row)
    return rows


def bench_gemm(cost_model, dtype: str, gemms=("qkv", "o", "gate_up", "down"), ms=None, repeats=7,
               seed=0, device=None) -> list[dict]:
    """SmoothGEMM vs exact shape vs pad-to-bucket vs oracle, per (GEMM, M), on ``device`` (a Device; CPU
    when None): the table's own primitives, Triton's tiles on CUDA among them."""
    keep_freed_memory()
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(seed)
    if ms is None:
        ms = sorted({int(x) for x in np.unique(np.round(np.exp(rng.uniform(0, np.log(4096), 24))))} | {1, 4096})
    rows = []
    for name in gemms:
        g = cost_model.geometry.gemm(name)
        gen = torch.Generator().manual_seed(seed)
        dev = device.torch_device if device is not None else torch.device("cpu")
        w = (torch.randn(g.n, g.k, generator=gen) / g.k ** 0.5).to(dev, tdtype)
        kernels = gemm_kernels(w, None, pack_weight(w))  # oneDNN's only where it packs this dtype (probed)
        planner = SmoothGEMMPlanner(cost_model, g.n, g.k, dtype, primitives=set(kernels))
        for m in ms:
            x = torch.randn(m, g.k, generator=gen).to(dev, tdtype)
            plan = planner.plan(m)
            bucket, prim, cfg, _ = planner.pad_to_bucket(min(m, max(planner.buckets)))
            bucket = max(bucket, m)
            xp = torch.zeros(bucket, g.k, dtype=tdtype, device=dev)
            outp = torch.empty(bucket, g.n, dtype=tdtype, device=dev)

            def padded():  # copy into the bucket-sized buffer, run the bucket's primitive, slice
                xp[:m].copy_(x)
                kernels[prim](xp, outp, dict(cfg))
                return outp[:m]

            fns = {"smooth": lambda: run_smooth_gemm(plan, x, kernels, n=g.n),
                   "exact": lambda: torch.nn.functional.linear(x, w), "padded": padded}
            for kname in kernels:  # every primitive at the exact M, at the config the table found best there
                cfg = dict(cost_model.best_config_at("gemm", g.n, g.k, dtype, kname, m) or {})
                fns[f"oracle:{kname}"] = lambda kname=kname, cfg=cfg: kernels[kname](x, None, cfg)
            t = _median_alternating(fns, repeats, device)
            oracle = min(v for k, v in t.items() if k.startswith("oracle:"))
            rows.append({"gemm": name, "m": m, "segments": len(plan.segments), "bucket": bucket,
                         "smooth_us": t["smooth"] * 1e6, "exact_us": t["exact"] * 1e6, "padded_us": t["padded"] * 1e6,
                         "oracle_us": oracle * 1e6, "vs_exact": t["exact"] / t["smooth"],
                         "vs_padded": t["padded"] / t["smooth"], "vs_oracle": oracle / t["smooth"]})
    return rows


def render(attention: list[dict], gemm: list[dict], console, meta: dict) -> None:

    if attention and "padded_ms" in attention[0]:
        t = Table("requests", "tokens", "meta ms", "SDPA loop ms", "padded SDPA ms",
                  "plan ms (once/step)", "vs loop", "vs loop +plan", "vs padded", "engine runs", "engine vs loop",
                  "max |err|", title=f"Meta-Attention ({meta['attention']}), per layer")
        for r in attention:
            t.add_row(str(r["requests"]), str(r["tokens"]), f"{r['meta_ms']:.2f}", f"{r['loop_ms']:.2f}",
                      f"{r['padded_ms']:.2f}", f"{r['plan_ms']:.2f}",
                      f"{r['vs_loop']:.2f}x", f"{r['vs_loop_with_plan']:.2f}x", f"{r['vs_padded']:.2f}x",
                      r["engine_path"], f"{r['engine_vs_loop']:.2f}x", f"{r['max_abs_err']:.1e}")
        console.print(t)
    if attention and "loop_ms" in attention[0] and "padded_ms" not in attention[0]:  # on a GPU/NPU
        t = Table("requests", "tokens", "backend", "meta ms", "SDPA loop ms", "varlen FA ms", "vs loop", "vs varlen",
                  "max |err|", title=f"Meta-Attention ({meta['attention']}), synchronised calls")
        for r in attention:
            t.add_row(str(r["requests"]), str(r["tokens"]), r["backend"], f"{r['meta_ms']:.3f}", f"{r['loop_ms']:.3f}",
                      f"{r['varlen_ms']:.3f}" if "varlen_ms" in r else "-", f"{r['vs_loop']:.2f}x",
                      f"{r['vs_varlen']:.2f}x" if "vs_varlen" in r else "-", f"{r['max_abs_err']:.1e}")
        console.print(t)
    if gemm:
        t = Table("gemm", "M", "segments", "pad to", "smooth us", "exact us", "padded us", "oracle us",
                  "vs exact", "vs padded", "vs oracle", title=f"SmoothGEMM ({meta['gemm']})")
        for r in gemm:
            t.add_row(r["gemm"], str(r["m"]), str(r["segments"]), str(r["bucket"]), f"{r['smooth_us']:.0f}",
                      f"{r['exact_us']:.0f}", f"{r['padded_us']:.0f}", f"{r['oracle_us']:.0f}", f"{r['vs_exact']:.2f}x",
                      f"{r['vs_padded']:.2f}x", f"{r['vs_oracle']:.2f}x")
        console.print(t)
        for key, label in (("vs_exact", "exact-shape matmul"), ("vs_padded", "pad-to-bucket"),
                           ("vs_oracle", "oracle")):
            console.print(f"SmoothGEMM mean speed-up over {label}: {np.mean([r[key] for r in gemm]):.3f}x "
                          f"(geometric {np.exp(np.mean(np.log([r[key] for r in gemm]))):.3f}x)")
