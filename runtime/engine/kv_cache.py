"""Paged KV cache: the K/V tensors of fixed-size blocks in one preallocated pool.

Each layer's K and V live in tensors of ``num_blocks * block_size`` slots; a
request owns a list of blocks (its block table, see ``block_manager``) and
token ``i`` of it sits in slot ``table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

import torch

from .block_manager import BlockAllocator


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
        """Slot indices of tokens ``start..end-1`` of a request, on the pools' device (they index the pools)."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.k[0].device)
