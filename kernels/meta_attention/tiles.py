"""What Meta-Attention's plan is made of: the requests of a step and the tile classes cut from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

CAUSAL, NO_MASK, TREE = "causal", "none", "tree"
# Two machine constants steer the plan. Both are measured by the profiler (xytune/profiler/calibrate.py) and reach the
# plan from the cost table; these defaults only serve a table that lacks them.
# - group_cost_scores: the fixed cost of one more long group (its torch calls) in units of padded (row, key)
#   scores; 11,000 on a 2-core AVX-512 VM (~0.09 ms a group, ~8 ns a score with 9 heads of 64 dims).
# - float32_short_tiles: up to this many short tiles run their GEMMs in float32 on CPU when the input is bf16
#   (oneDNN's bf16 batched GEMM has a fixed cost per call that float32 lacks on some CPUs); 0 = never.
DEFAULT_GROUP_COST_SCORES = 11_000
DEFAULT_FLOAT32_SHORT_TILES = 0


@dataclass(frozen=True)
class AttnRequest:
    """One request's share of a step.

    ``context_len`` keys are already cached; ``q_len`` new tokens follow them
    and are both queries and keys. ``key_slots`` lists the cache slots of all
    ``context_len + q_len`` keys. For ``tree`` masks, ``parents[i]`` is the
    index of new token ``i``'s parent among the new tokens (-1: it hangs off
    the cached context); a token sees the context, its ancestors and itself.
    """

    q_len: int
    context_len: int
    key_slots: torch.Tensor
    mask: str = CAUSAL
    parents: tuple[int, ...] | None = None

    @property
    def num_keys(self) -> int:
        return self.context_len + self.q_len

    def allowed(self) -> torch.Tensor:
        """Bool ``[q_len, context_len + q_len]``: may query i read key j."""
        L = self.num_keys
        keys = torch.arange(L)
        if self.mask == NO_MASK:
            return torch.ones(self.q_len, L, dtype=torch.bool)
        if self.mask == CAUSAL:
            return keys[None, :] <= (self.context_len + torch.arange(self.q_len))[:, None]
        if self.mask != TREE or self.parents is None or len(self.parents) != self.q_len:
            raise ValueError("a tree mask needs one parent index per new token")
        anc = torch.eye(self.q_len, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= i:
                raise ValueError("tree parents must come before their children")
            if p >= 0:
                anc[i] |= anc[p]
        out = torch.zeros(self.q_len, L, dtype=torch.bool)
        out[:, : self.context_len] = True
        out[:, self.context_len:] = anc
        return out


@dataclass
class ShortTiles:
    """The short class: ``N`` GQA-packed ``tile_q x tile_kv`` tiles, split-KV, merged by segment."""

    q_index: torch.Tensor  # [N, tile_q] rows of q.view(T*H, d) (0 for padding rows)
    kv_index: torch.Tensor  # [N, tile_kv] rows of cache.view(kvh*S, d) (0 for padding keys)
    bias: torch.Tensor  # [N, 1 or tile_q, tile_kv] 0 / -inf (one row when no mask depends on the row)
    segment: torch.Tensor  # [N] (request, kv head, row tile) each tile belongs to
    num_segments: int
    key_len: torch.Tensor  # [N] real keys per tile, longest first
    out_index: torch.Tensor  # [R] rows of out.view(T*H, d) for every real packed row
    out_from: torch.Tensor  # [R] (segment * tile_q + row) each comes from; (tile * tile_q + row) unless split
    split: bool  # some segment has more than one tile: merge by log-sum-exp
    page: int = 1  # kv_index counts pages of this many slots (rows of cache.view(kvh*S/page, page*d))
    decode: "DecodeTiles | None" = None  # decode-only tiles: what the next decode step needs to advance them
    _bias_cache: dict = field(default_factory=dict)

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias_cache:
            self._bias_cache[dtype] = self.bias.to(dtype)
        return self._bias_cache[dtype]


@dataclass
class DecodeTiles:
    """Where each decode request's newest key sits in a decode-only ``ShortTiles``, so that the next decode
    step (the same requests, one key longer each) updates the tiles instead of planning them again."""

    num_keys: np.ndarray  # [n] keys per request
    last_tile: np.ndarray  # [n, kvh] tile holding each request's last key chunk, per KV head
    last_chunk_start: np.ndarray  # [n] key position where that chunk starts
    pages_per_head: int  # kv_index = head * pages_per_head + page


@dataclass(frozen=True)
class PackedIndex:
    """A long group's gathers in GQA-packed (KV head, tile, row) order, so no permute copies are needed."""

    q: torch.Tensor  # [kvh, B, tq] rows of q.view(T*kvh, g*d)
    kv: torch.Tensor  # [kvh, B, Lg/page] rows of cache.view(kvh*S/page, page*d)
    out_dst: torch.Tensor  # [kvh*R] rows of out.view(T*kvh, g*d) written
    out_src: torch.Tensor  # [kvh*R] rows of the packed output they come from


@dataclass
class LongGroup:
    """Long-class query tiles of similar key length, run as one fused attention call."""

    q_tokens: torch.Tensor  # [B, tq] token rows of q (0 for padding)
    key_slots: torch.Tensor  # [B, Lg] cache slots (0 for padding); Lg is a multiple of page
    mask: torch.Tensor  # [B, 1, tq, Lg] bool: may the row read the key
    out_tokens: torch.Tensor  # [R] token rows written
    out_from: torch.Tensor  # [R] (tile * tq + row) each comes from
    page: int = 1  # key_slots run in aligned pages of this many slots: gathers move whole pages
    _bias_cache: dict = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a 0/-inf bias ``[1, B, tq, 1, Lg]`` that broadcasts over KV heads and packed query heads
        (9x smaller than a bias per packed row, so it stays in cache), made once per plan."""
        if dtype not in self._bias_cache:
            self._bias_cache[dtype] = torch.zeros(self.mask.shape, dtype=dtype).masked_fill_(
                ~self.mask, float("-inf")).permute(1, 0, 2, 3)[:, :, :, None, :]
        return self._bias_cache[dtype]

    def packed_index(self, kvh: int, cache_slots: int) -> PackedIndex:
        key = ("index", kvh, cache_slots)
        if key not in self._bias_cache:
            B, tq = self.q_tokens.shape
            h = torch.arange(kvh)
            pages = self.key_slots[:, :: self.page] // self.page
            self._bias_cache[key] = PackedIndex(
                q=self.q_tokens[None] * kvh + h[:, None, None],
                kv=pages[None] + h[:, None, None] * (cache_slots // self.page),
                out_dst=(self.out_tokens[None] * kvh + h[:, None]).reshape(-1),
                out_src=(self.out_from[None] + h[:, None] * B * tq).reshape(-1))
        return self._bias_cache[key]


@dataclass
class MetaAttentionPlan:
    tile_q: int
    tile_kv: int
    prefill_tile: int
    num_heads: int
    num_kv_heads: int
    short: ShortTiles | None
    long: list[LongGroup]
    counts: dict  # tiles (per KV head) by class: full, masked, skipped
    sdpa_min_keys: int = 512  # long groups with more keys run torch's fused SDPA, shorter ones batched GEMMs
    short_requests: list = field(default_factory=list)  # (first token, AttnRequest) of the short class
    # short multi-token requests (verify trees, tiny chunks) in tiles of their own: sharing the decodes' tiles
    # would pad every decode's g rows up to the longest verify's rows
    short_multi: ShortTiles | None = None
    float32_short_tiles: int = DEFAULT_FLOAT32_SHORT_TILES  # see the module's constants
