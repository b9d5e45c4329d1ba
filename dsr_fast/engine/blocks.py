"""The KV pool's bookkeeping: fixed-size blocks, a free list and reference counts (host side).

A block holds `block_size` consecutive tokens' K and V in every layer. A sequence owns a list of
block ids (its block table); the samples of one prompt reference the prompt's full blocks
together, so a block returns to the free list only when its last reference is released.

Block 0 is never handed out: padding rows of a decode batch (and of a CUDA graph's bucket) point
at it and write their garbage K/V there.
"""

from __future__ import annotations

NULL_BLOCK = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"KV pool: need at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self.peak_used = 0

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        assert count <= len(self._free), f"allocate({count}) with {len(self._free)} free blocks"
        ids = [self._free.pop() for _ in range(count)]
        for b in ids:
            self.refs[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

    def share(self, ids: list[int]) -> None:
        for b in ids:
            assert self.refs[b] > 0, f"share of free block {b}"
            self.refs[b] += 1

    def release(self, ids: list[int]) -> None:
        for b in ids:
            assert self.refs[b] > 0, f"release of free block {b}"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free.append(b)

    def reset_peak(self) -> None:
        self.peak_used = self.num_used
