"""KV block bookkeeping: the free pool, the prefix cache and the blocks each request holds.

The tensors the blocks index live in ``kv_cache``; this module decides which
blocks a request gets, which it can take from the prefix cache, and when they
go back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler's request type; only annotations use it here
    from .scheduler import Request


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

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (vLLM's ``reset_prefix_cache``): a benchmark that replays
        the same prompts at several rates starts each replay cold instead of finding them all cached."""
        for b in self._evictable:
            del self._block_of[self._hash_of.pop(b)]
            self._free.append(b)
        self._evictable.clear()

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


class BlockManager:
    """The blocks of requests: grown as they run, taken from the prefix cache at admission, registered in
    it once full and computed, and handed back when a request finishes or is preempted."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator, self.block_size = allocator, block_size

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def free_tokens(self, req: Request) -> int:
        """Tokens ``req`` could still write: room in its own blocks plus every free block."""
        return (len(req.blocks) + self.allocator.num_free) * self.block_size - req.num_computed

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` blocks for ``num_tokens`` tokens; False (and nothing taken) when the pool is short."""
        need = blocks_needed(num_tokens, self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        req.blocks.extend(self.allocator.allocate(need))
        return True

    def release(self, req: Request) -> None:
        """Hand the request's blocks back; with them go its computed tokens and cached-block hashes."""
        self.allocator.free(req.blocks)
        req.blocks, req.num_computed, req.block_hashes = [], 0, []

    def attach_cached_prefix(self, req: Request) -> None:
        """Start a request on the cached blocks of its longest cached prefix (at least one token stays to run)."""
        if not self.allocator.enable_prefix_caching or req.blocks or req.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        hashes = block_hashes(req.all_ids, self.block_size, (req.num_tokens - 1) // self.block_size)
        req.blocks = self.allocator.lookup(hashes)
        req.block_hashes = hashes[: len(req.blocks)]
        req.num_computed = len(req.blocks) * self.block_size

    def record_admission(self, req: Request) -> None:
        """Count a newly admitted prompt's prefix-cache lookup (once per request, not again after preemption)."""
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed
            self.allocator.record_query(len(req.prompt_ids), req.num_computed)

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the request's newly full, computed blocks with the prefix cache."""
        if not self.allocator.enable_prefix_caching:
            return
        full = min(req.num_computed, req.num_tokens) // self.block_size
        done = len(req.block_hashes)
        if full > done:
            parent = req.block_hashes[-1] if done else None
            new = block_hashes(req.all_ids, self.block_size, full, start=done, parent=parent)
            for i, h in enumerate(new, start=done):
                self.allocator.register(req.blocks[i], h)
            req.block_hashes.extend(new)
