"""Where a bf16 decode step's time goes, and what whole-model ``torch.compile`` saves (issue 3's 25 ms goal).

Run from the repository root: ``python scripts/decode_floor.py [--compile]``. One process; every
variant is timed in alternating rounds (the VM's speed drifts) and medians are printed. Not part of the
product: a measurement kept so the figures in docs/benchmarks.md can be re-run.

- forward: the engine's model forward for a captured decode step (batch 1 and 32, 64-token prompts);
- gemms: the same step's weight GEMMs alone (4 per layer and the head, same M, pre-packed oneDNN);
- attention: the step's 30 Meta-Attention calls alone;
- compiled (``--compile``): the whole model under ``torch.compile`` (inductor, frozen weights, so
  oneDNN packs them itself), with the cache write and Meta-Attention kept as one opaque custom op per
  layer; everything else (norms, rotary, SwiGLU, residuals) fused by inductor.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from xytune.profiler.devices import get_device
from xytune.runtime.engine.protocol import run_to_completion
from xytune.runtime.engine.sampling import SamplingParams
from xytune.runtime.llm import LLM
from xytune.runtime.model.llama import apply_rotary, rms_norm

warnings.simplefilter("ignore")
llm = LLM("smollm2-135m", dtype="bfloat16", profile="profiles/cpu-smollm2-135m.parquet", allow_mismatch=True,
          enable_prefix_caching=False)
eng, model = llm.engine, llm.model
c = model.config
H, KVH, D = c.num_heads, c.num_kv_heads, c.head_dim


def capture_decode_step(batch: int):
    """The forward arguments of one all-decode step of ``batch`` requests (prompts already prefilled)."""
    g = np.random.default_rng(batch)
    reqs = [eng.add_request(g.integers(100, 49000, size=64).tolist(),
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)) for _ in range(batch)]
    while any(r.num_computed < len(r.prompt_ids) for r in reqs):
        eng.step()
    seen = {}
    forward = model.forward
    model.forward = lambda *a: seen.setdefault("args", a) and forward(*a)
    eng.step()
    model.forward = forward
    run_to_completion(eng, reqs)
    return seen["args"]


def gemms_only(args):
    x = torch.randn(args[0].shape[0], c.hidden_size, dtype=model.dtype)
    mid = torch.randn(args[0].shape[0], c.intermediate_size, dtype=model.dtype)
    for layer in model.layers:
        layer.qkv(x), layer.o(x), layer.gate_up(x), layer.down(mid)
    model.lm_head(x)


def attention_only(args):
    ids, positions, batch, kv, _ = args
    q = torch.randn(ids.shape[0], H, D, dtype=model.dtype)
    for i in range(c.num_layers):
        model.attention(q, kv.k[i], kv.v[i], batch, model.scale)


def compiled_model():
    """The model as one inductor graph; attention stays eager behind a custom op reading the step's batch."""
    import torch._inductor.config as inductor_config
    from torch import nn

    inductor_config.freezing = True
    step = {}

    @torch.library.custom_op("xytune_trial::paged_attention", mutates_args=())
    def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        batch, kv = step["batch"], step["kv"]
        kv.k[layer].index_copy_(1, batch.slot_mapping, k)
        kv.v[layer].index_copy_(1, batch.slot_mapping, v)
        return model.attention(q, kv.k[layer], kv.v[layer], batch, model.scale)

    paged_attention.register_fake(lambda q, k, v, layer: torch.empty_like(q))

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            keep = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
            self.embed, self.norm = keep(model.embed), keep(model.norm)
            self.register_buffer("cos", model.cos)
            self.register_buffer("sin", model.signed_sin)
            self.w = nn.ParameterList(keep(t) for layer in model.layers for t in (
                layer.ln1, layer.qkv.weight, layer.o.weight, layer.ln2, layer.gate_up.weight, layer.down.weight))

        def forward(self, ids, positions, rows):
            T, eps, qs, kvs = ids.shape[0], c.rms_norm_eps, H * D, KVH * D
            cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
            h = self.embed[ids]
            for i in range(c.num_layers):
                ln1, wqkv, wo, ln2, wgu, wd = self.w[6 * i: 6 * i + 6]
                qkv = F.linear(rms_norm(h, ln1, eps), wqkv)
                qk = apply_rotary(qkv[:, : qs + kvs].view(T, H + KVH, D), cos, sin)
                a = torch.ops.xytune_trial.paged_attention(qk[:, :H], qk[:, H:].transpose(0, 1),
                                                           qkv[:, qs + kvs:].view(T, KVH, D).transpose(0, 1), i)
                h = h + F.linear(a.reshape(T, qs), wo)
                gate, up = F.linear(rms_norm(h, ln2, eps), wgu).chunk(2, dim=-1)
                h = h + F.linear(F.silu(gate) * up, wd)
            return F.linear(rms_norm(h[rows], self.norm, eps), self.embed).float()

    whole = torch.compile(Whole().eval(), dynamic=True)

    def forward(ids, positions, batch, kv, rows):
        step["batch"], step["kv"] = batch, kv
        return whole(ids, positions, rows)

    return forward


def median_ms(fn, n: int = 10) -> float:
    return float(np.median(get_device("cpu").time_samples(fn, n))) * 1e3


def main() -> None:
    with torch.inference_mode():
        steps = {b: capture_decode_step(b) for b in (1, 32)}
        variants = {"forward": lambda a: model.forward(*a), "gemms": gemms_only, "attention": attention_only}
        if "--compile" in sys.argv:
            compiled = compiled_model()
            start = time.perf_counter()
            for a in steps.values():
                compiled(*a)
            print(f"compile (both batch sizes): {time.perf_counter() - start:.0f} s")
            variants["compiled"] = lambda a: compiled(*a)
        results = {(b, v): [] for b in steps for v in variants}
        for _ in range(5):
            for b, a in steps.items():
                for v, fn in variants.items():
                    results[b, v].append(median_ms(lambda: fn(a)))
    for b in steps:
        print(f"batch {b}: " + ", ".join(f"{v} {np.median(results[b, v]):.1f} ms" for v in variants))


if __name__ == "__main__":
    main()
