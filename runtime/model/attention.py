"""Attention over the paged KV cache for a flat, mixed batch: the one call the model makes.

``AttentionBatch`` describes the step (built once per step by the engine, used
by every layer); ``reference_attention`` is the simple, correct baseline:
decode rows (one query token) are computed together as one padded batch, and
each prefill chunk with one causal SDPA call. Meta-Attention replaces it
behind the same signature.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xytune.kernels.meta_attention import (
    DEFAULT_FLOAT32_SHORT_TILES,
    DEFAULT_GROUP_COST_SCORES,
    TREE,
    AttnRequest,
    advance_decode_plan,
    plan_meta_attention,
)
from xytune.kernels.meta_attention.backends import RUNS, backend_for, triton_tiles
from xytune.kernels.meta_attention.triton_backend import plan_triton
from xytune.kernels.sdpa_loop import request_masks, run_sdpa_loop

QUERY_TILE = 64  # prefill queries are attended in tiles of this many rows (see PrefillChunk.tiles)


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the flat batch
    num_tokens: int
    context_before: int  # keys already cached before this chunk
    key_slots: torch.Tensor  # [context_before + num_tokens] slots of every key the chunk attends to
    parents: list[int] | None = None  # a verify tree: parent row of each row (-1: none); None: causal

    @functools.cached_property
    def tiles(self) -> list[tuple[int, int, int, torch.Tensor | None]]:
        """(row0, row1, keys, mask) per query tile; a tile only reads the keys up to its last row.

        The causal triangle is then skipped tile by tile instead of being
        computed and masked (about 20% of a 512-token prefill's attention on
        CPU); rows stay independent, so the result is unchanged. Made on first
        use: Meta-Attention, the default, never asks for them.
        """
        device = self.key_slots.device
        if self.parents is not None:
            return [(0, self.num_tokens, self.context_before + self.num_tokens,
                     tree_mask(self.parents, self.context_before).to(device))]
        tiles = []
        for r0 in range(0, self.num_tokens, QUERY_TILE):
            r1 = min(self.num_tokens, r0 + QUERY_TILE)
            keys = self.context_before + r1
            mask = None
            if self.context_before + r0 > 0:
                pos = torch.arange(keys, device=device)
                mask = pos[None, :] <= pos[self.context_before + r0: keys, None]
            tiles.append((r0, r1, keys, mask))
        return tiles


def tree_mask(parents: list[int], context_before: int) -> torch.Tensor:
    """Boolean ``[n, context_before + n]``: every row sees the cached context, its ancestors and itself."""
    n = len(parents)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            seen[i] = seen[p]
        seen[i, i] = True
    return torch.cat([torch.ones(n, context_before, dtype=torch.bool), seen], dim=1)


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode_rows: torch.Tensor  # [Bd] rows of the flat batch that are single-token decodes
    prefills: list[PrefillChunk]
    requests: list = None  # one AttnRequest per request, for Meta-Attention's plan
    block_size: int = 16  # the KV cache's page size: Meta-Attention gathers whole pages
    decode_keys: list = None  # [Bd] key slots of each decode row's request (numpy), for the reference's padding
    device: torch.device | str = "cpu"
    pages_aligned: bool = False  # every request's key i sits at offset i % block_size of its pages (block tables)
    request_ids: tuple | None = None  # who each request is: a decode step of the same ones advances their plan

    @functools.cached_property
    def decode_slots(self) -> torch.Tensor:
        """``[Bd, Lmax]`` key slots per decode row, padded with 0 (made on first use: only the reference
        attention pads decodes; Meta-Attention plans from ``requests``)."""
        lens = np.array([len(k) for k in self.decode_keys], dtype=np.int64)
        slots = np.zeros((len(lens), int(lens.max(initial=0))), dtype=np.int64)
        if len(lens):
            slots[np.arange(slots.shape[1])[None, :] < lens[:, None]] = np.concatenate(self.decode_keys)
        return torch.from_numpy(slots).to(self.device)

    @functools.cached_property
    def decode_bias(self) -> torch.Tensor:
        """``[Bd, 1, Lmax]``: 0 for real keys, -inf for padding (added to the scores)."""
        lens = torch.tensor([len(k) for k in self.decode_keys], dtype=torch.long)
        lmax = self.decode_slots.shape[1]
        pad = (torch.arange(lmax)[None, :] >= lens[:, None])[:, None, :]
        return torch.zeros(len(lens), 1, lmax).masked_fill_(pad, float("-inf")).to(self.device)

    def decode_bias_for(self, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
        """The padding bias repeated per KV head ``[kv_heads*Bd, 1, L]``, made once per step for all layers."""
        key = (kv_heads, dtype)
        if getattr(self, "_bias_key", None) != key:
            self._bias, self._bias_key = self.decode_bias.to(dtype).repeat(kv_heads, 1, 1), key
        return self._bias

    @property
    def all_decode(self) -> bool:
        """Every row is a decode row, in order: the decode result is the whole output."""
        return not self.prefills

    @classmethod
    def build(cls, block_size: int, chunks: list[tuple], device="cpu",
              request_ids: tuple | None = None) -> "AttentionBatch":
        """From ``(block_table, context_before, num_tokens[, parents])`` per request, in flat-batch order.

        ``parents`` marks a speculative verify chunk: its rows form a tree (see ``tree_mask``). Every key
        slot of the step is computed in one numpy pass (per-request torch ops cost ~50 us a request: 13 ms
        a step at 256 requests).
        """
        before = np.array([c[1] for c in chunks], dtype=np.int64)
        num = np.array([c[2] for c in chunks], dtype=np.int64)
        keys = before + num
        table_len = np.array([len(c[0]) for c in chunks], dtype=np.int64)
        tables = np.fromiter(itertools.chain.from_iterable(c[0] for c in chunks), dtype=np.int64,
                             count=int(table_len.sum()))
        req = np.repeat(np.arange(len(chunks)), keys)
        pos = np.arange(int(keys.sum())) - np.repeat(np.cumsum(keys) - keys, keys)
        slots = tables[(np.cumsum(table_len) - table_len)[req] + pos // block_size] * block_size + pos % block_size
        per_request = np.split(slots, np.cumsum(keys)[:-1])
        decode_rows, decode_keys, prefills, requests = [], [], [], []
        row = 0
        for (table, ctx, n, *tree), all_slots in zip(chunks, per_request):
            key_slots = torch.from_numpy(all_slots)
            requests.append(AttnRequest(n, ctx, key_slots, TREE, tuple(tree[0])) if tree
                            else AttnRequest(n, ctx, key_slots))
            if n == 1:
                decode_rows.append(row)
                decode_keys.append(all_slots)
            else:
                prefills.append(PrefillChunk(row, n, ctx, key_slots.to(device), parents=tree[0] if tree else None))
            row += n
        return cls(
            slot_mapping=torch.from_numpy(slots[pos >= before[req]]).to(device),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device), prefills=prefills,
            requests=requests, block_size=block_size, decode_keys=decode_keys, device=device, pages_aligned=True,
            request_ids=request_ids,
        )


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                        scale: float) -> torch.Tensor:
    """``q [T, H, d]`` against the cached keys/values (``[kv_heads, slots, d]``) of each row's request."""
    T, H, d = q.shape
    kvh = k_cache.shape[0]
    group = H // kvh
    out = torch.empty_like(q) if batch.prefills else None
    if len(batch.decode_rows):
        bd, L = batch.decode_slots.shape
        flat = batch.decode_slots.view(-1)
        # Batch order (kv head, request): each GEMM pairs a request's `group` query heads with its keys.
        k = k_cache.index_select(1, flat).view(kvh * bd, L, d)
        v = v_cache.index_select(1, flat).view(kvh * bd, L, d)
        qd = q if batch.all_decode else q[batch.decode_rows]
        qd = qd.view(bd, kvh, group, d).transpose(0, 1).reshape(kvh * bd, group, d)
        bias = batch.decode_bias_for(kvh, q.dtype)
        scores = torch.baddbmm(bias, qd, k.transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        o = torch.bmm(probs, v).view(kvh, bd, group, d).transpose(0, 1).reshape(bd, H, d)
        if batch.all_decode:
            return o
        out[batch.decode_rows] = o
    for p in batch.prefills:
        rows = slice(p.token_start, p.token_start + p.num_tokens)
        k = k_cache.index_select(1, p.key_slots)  # [kvh, L, d]
        v = v_cache.index_select(1, p.key_slots)
        out[rows] = _prefill_sdpa(q[rows], k, v, p, scale)
    return out


def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk,
                  scale: float) -> torch.Tensor:
    """One prefill chunk through torch's fused SDPA (the kernel transformers uses), one query tile at a time."""
    group = q.shape[1] // k.shape[0]
    qp = q.transpose(0, 1)[None]
    k = k[None].repeat_interleave(group, dim=1)
    v = v[None].repeat_interleave(group, dim=1)
    outs = []
    for r0, r1, keys, mask in chunk.tiles:
        outs.append(F.scaled_dot_product_attention(qp[:, :, r0:r1], k[:, :, :keys], v[:, :, :keys],
                                                   attn_mask=mask, is_causal=mask is None, scale=scale))
    return torch.cat(outs, dim=2)[0].transpose(0, 1)


META_DEFAULTS = {"tile_q": 8, "tile_kv": 256, "prefill_tile": 128, "sdpa_min_keys": 1024,
                 "group_cost_scores": DEFAULT_GROUP_COST_SCORES, "float32_short_tiles": DEFAULT_FLOAT32_SHORT_TILES}
META_PRIMITIVES = {"attention.decode": "meta.attention_short", "attention.prefill": "meta.attention_long"}


def meta_tile_sizes(cost_model, dtype: str) -> dict:
    """Meta-Attention's tile sizes the table measured best, defaults where it has none."""
    tiles = dict(META_DEFAULTS)
    if cost_model is not None:
        for target, primitive in META_PRIMITIVES.items():
            tiles.update(cost_model.best_config("attention", target, dtype, primitive) or {})
    return tiles


def meta_tiles_from_table(cost_model, dtype: str) -> dict:
    """Meta-Attention's tile sizes and machine constants from the table, defaults where it has none."""
    tiles = meta_tile_sizes(cost_model, dtype)
    if cost_model is not None and cost_model.meta.get("fingerprint", {}).get("backend", "cpu") == "cpu":
        tiles["group_cost_scores"] = cost_model.tuning("group_cost_scores", dtype)  # constants of the torch backend
        tiles["float32_short_tiles"] = int(cost_model.tuning("float32_short_tiles", dtype))
    return tiles


@dataclass(frozen=True)
class AttentionPaths:
    """Which attention runs a step: Meta-Attention ("meta") or one fused SDPA call per request ("loop"), per
    step class (decode-only, or with prompt tokens) and number of requests.

    The loop pays a call per request and layer, Meta-Attention a plan per step and its tiles' padding, so the
    faster one changes with the step's request count: on a 2-core Xeon (family 6 model 167) in bf16 a lone
    request's decode ran its 30 layers' attention in 1.2 ms on the loop against 3.1 ms on Meta-Attention,
    while 8 or more requests ran faster on Meta-Attention. The table times both at a few request counts per
    class (``CostModel.attention_ratios``; decode steps from its plain decodes, ``attention.decode_plain``,
    where it has them: the decode class's own shapes mix in speculative verifies, which favour the loop);
    between the counts the log of the loop's time over Meta-Attention's is interpolated in the log of the
    count (held beyond the ends), and a step loops where it is below 0. Without a table: Meta-Attention for
    every step.
    """

    decode: tuple[tuple[int, float], ...] = ()  # (requests measured, loop time / Meta-Attention time) ascending
    prefill: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_table(cls, cost_model, dtype: str, num_layers: int) -> "AttentionPaths":
        if cost_model is None:
            return cls()

        def ratios(target: str) -> tuple[tuple[int, float], ...]:
            return tuple(cost_model.attention_ratios(target, dtype, num_layers).items())

        return cls(decode=ratios("attention.decode_plain") or ratios("attention.decode"),
                   prefill=ratios("attention.prefill"))

    @classmethod
    def everywhere(cls, path: str) -> "AttentionPaths":
        ratio = ((1, 0.5 if path == "loop" else 2.0),)  # a ratio that always picks ``path``
        return cls(decode=ratio, prefill=ratio)

    def path(self, decode_only: bool, num_requests: int) -> str:
        return _interpolated_path(self.decode if decode_only else self.prefill, max(num_requests, 1))

    @property
    def only(self) -> str | None:
        """The one path every step takes, or None when it depends on the step."""
        signs = {r < 1.0 for _, r in self.decode + self.prefill}
        return "meta" if not signs or signs == {False} else "loop" if signs == {True} else None

    def describe(self, up_to: int = 256) -> str:
        """``decode: loop for 1-18 requests, meta for 19-256; ...``: the path each request count takes."""

        def runs(decode_only: bool) -> str:
            parts, start = [], 1
            for n in range(2, up_to + 2):
                if n > up_to or self.path(decode_only, n) != self.path(decode_only, start):
                    span = f"{start}" if n - 1 == start else f"{start}-{n - 1}"
                    parts.append(f"{self.path(decode_only, start)} for {span}")
                    start = n
            return ", ".join(parts)
        return f"decode: {runs(True)} requests; with prompt tokens: {runs(False)} requests"


@functools.lru_cache(maxsize=4096)
def _interpolated_path(measured: tuple[tuple[int, float], ...], num_requests: int) -> str:
    """Kept per (ratios, count): every layer of a step asks, and ``np.interp`` costs microseconds."""
    if not measured:
        return "meta"
    counts, ratios = zip(*measured)
    log_ratio = np.interp(math.log(num_requests), np.log(counts), np.log(ratios))
    return "loop" if log_ratio < 0 else "meta"


def sdpa_loop_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                        scale: float) -> torch.Tensor:
    """One fused SDPA call per request (kernels/sdpa_loop.py); the masks are made once per step."""
    masks = getattr(batch, "_sdpa_masks", None)
    if masks is None:
        masks = batch._sdpa_masks = request_masks(batch.requests, q.device)
    return run_sdpa_loop(batch.requests, masks, q, k_cache, v_cache, scale)


def make_attention(paths: AttentionPaths, **tiles):
    """The engine's attention: per step, Meta-Attention or the per-request SDPA loop, as ``paths`` says for the
    step's class and request count."""
    meta = make_meta_attention(**tiles)
    if paths.only == "meta":
        return meta

    def attention(q, k_cache, v_cache, batch: AttentionBatch, scale: float) -> torch.Tensor:
        use = paths.path(batch.all_decode, len(batch.requests))
        return (meta if use == "meta" else sdpa_loop_attention)(q, k_cache, v_cache, batch, scale)

    return attention


def make_meta_attention(tile_q: int = 8, tile_kv: int = 256, prefill_tile: int = 128, sdpa_min_keys: int = 1024,
                        group_cost_scores: float = DEFAULT_GROUP_COST_SCORES,
                        float32_short_tiles: int = DEFAULT_FLOAT32_SHORT_TILES):
    """Meta-Attention behind the same call as ``reference_attention``; the plan is made once per step, and a
    decode step of the same requests as the step before advances that step's plan instead (torch backend)."""
    previous = {"ids": None, "plan": None}  # the last decode-only step's requests and plan

    def meta_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                       scale: float) -> torch.Tensor:
        plan = getattr(batch, "_meta_plan", None)
        backend = backend_for(q.device.type, str(q.dtype).removeprefix("torch."))
        if plan is None:
            if backend == "triton":
                plan = plan_triton(batch.requests, q.shape[1], k_cache.shape[0], device=q.device,
                                   **triton_tiles(tile_q, tile_kv))
            else:
                plan = _advanced_plan(previous, batch) or plan_meta_attention(
                    batch.requests, q.shape[1], k_cache.shape[0], k_cache.shape[1], tile_q, tile_kv, prefill_tile,
                    sdpa_min_keys, batch.block_size, pages_aligned=batch.pages_aligned or None,
                    group_cost_scores=group_cost_scores, float32_short_tiles=float32_short_tiles)
                decode_only = batch.all_decode and batch.request_ids is not None
                previous.update(ids=batch.request_ids if decode_only else None, plan=plan if decode_only else None)
            batch._meta_plan = plan
        return RUNS[backend](plan, q, k_cache, v_cache, scale)

    return meta_attention


def _advanced_plan(previous: dict, batch: AttentionBatch):
    """The previous decode step's plan advanced by one key per request, if this step decodes the same requests."""
    if previous["plan"] is None or batch.request_ids is None or batch.request_ids != previous["ids"]:
        return None
    num_keys = np.fromiter((r.num_keys for r in batch.requests), dtype=np.int64, count=len(batch.requests))
    new_slots = batch.slot_mapping.cpu().numpy()
    return previous["plan"] if advance_decode_plan(previous["plan"], num_keys, new_slots) else None
