"""Paged KV cache: fixed-size blocks in one preallocated pool, handed out per request.

Each layer's K and V live in tensors of ``num_blocks * block_size`` slots; a
request owns a list of blocks (its block table) and token ``i`` of it sits
in slot ``table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class BlockAllocator:
    """Reference-counted block pool with an optional prefix cache (vLLM's automatic prefix caching).

    A full block whose tokens are all computed can be registered under a hash
    of its tokens and of every token before it. When its last owner lets go it
    is not wiped: it waits in an LRU list, still findable by hash, and is only
    reused (evicted) when no never-used block is left. A later request whose
    prompt starts with the same blocks takes them instead of recomputing them.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # never used or unhashed: popped from the end
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash, for registered blocks
        self._block_of: dict[int, int] = {}  # hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; cached blocks stay findable until evicted."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # -- prefix cache ----------------------------------------------------------

    def lookup(self, hashes: list[int]) -> list[int]:
        """Take a reference to the cached blocks of the longest cached run of ``hashes`` from the start."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        for b in found:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        return found

    def register(self, block: int, block_hash: int) -> None:
        """Make a full, computed block findable; a hash already cached keeps its first block."""
        if self.enable_prefix_caching and block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def record_query(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit


def block_hashes(token_ids: list[int], block_size: int, num_blocks: int, start: int = 0,
                 parent: int | None = None) -> list[int]:
    """Chained hashes of full blocks ``start..num_blocks-1``: each covers its tokens and all before them."""
    out = []
    for i in range(start, num_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """K and V pools, ``[num_layers][num_kv_heads, num_blocks * block_size, head_dim]``.

    Head-major, so gathering a batch's keys by slot yields one contiguous
    ``[kv_head, tokens, head_dim]`` block per head: attention's batched GEMMs
    read it with no transposing copy.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise --kv-cache-gb")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of tokens ``start..end-1`` of a request."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
