"""How big the KV pool is: a memory budget turned into blocks, never rows x max_len.

GPU: `kv_cache_memory` is the share of the device memory still free once the engine's weights
(and whatever the trainer keeps resident) are in place, measured when the pool is allocated,
i.e. at each wake. CPU: a fixed 256 MiB (vLLM's CPU default), unless `kv_cache_tokens` is given.
`kv_cache_tokens` always wins: an exact pool size, for tests and for the memory plan.
"""

from __future__ import annotations

import torch

from ..model import Qwen2Config
from .blocks import blocks_for

CPU_KV_CACHE_BYTES = 256 << 20


def kv_bytes_per_token(config: Qwen2Config, dtype: torch.dtype) -> int:
    """K and V of one token in every layer (Qwen2-1.5B in bf16: 28,672 B)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation can get: free on the device + cached by torch but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def pool_blocks(config: Qwen2Config, dtype: torch.dtype, device: torch.device, block_size: int,
                kv_cache_tokens: int | None, kv_cache_memory: float) -> int:
    """Number of blocks of the pool, the reserved null block included."""
    if kv_cache_tokens is not None:
        if kv_cache_tokens < block_size:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens} is less than one block ({block_size} tokens)")
        return blocks_for(kv_cache_tokens, block_size) + 1
    if not 0 < kv_cache_memory <= 1:
        raise ValueError(f"kv_cache_memory must be in (0, 1], got {kv_cache_memory}")
    budget = free_device_bytes(device) * kv_cache_memory if device.type == "cuda" else CPU_KV_CACHE_BYTES
    blocks = int(budget // (kv_bytes_per_token(config, dtype) * block_size))
    if blocks < 2:
        raise RuntimeError(f"KV pool: a budget of {budget / 2**20:.0f} MiB holds no block of {block_size} tokens")
    return blocks
