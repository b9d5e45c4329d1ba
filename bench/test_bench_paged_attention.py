"""Decode attention over a paged KV pool: dsr_fast.kernels.paged_decode_attention vs naive torch.

One decode step of one layer: B sequences, one query token each, ragged live lengths (uniform in
[cap/2, cap]), their blocks scattered over the pool. Implementations:

    triton   paged_decode_attention, backend "auto": the split-KV Triton kernel (GPU only)
    paged    paged_decode_attention, backend "torch": gathers the live slots, one masked SDPA
    dense    what an engine without a paged kernel writes: gather every block of the table
             (the capacity, not the live length), repeat K/V per query head, fp32
             matmul / masked softmax / matmul

Sizes: on CPU the embedded tiny model's shape (4:2 heads, D = 32; 128 rows of ≤ 96 tokens in a
512-token table; tiny_wide: the same in an 8K-token table, to show the cost follows the live
tokens, not the table) and a mid one (12:2, D = 64; 32 rows of ≤ 1K tokens in a 4K table), fp32; with
--real-sizes on a GPU, Qwen2-1.5B's attention (12:2, D = 128, bf16) at 256 sequences × 8K
context (live ≈ 4–8K).

extra_info: live_tokens, GBps = the K/V bytes that must be read (Σ live × Hkv × D × 2 (K, V) ×
element size) over the median time (on a GPU: compare with the HBM bandwidth), peak_extra_MB.
"""

from __future__ import annotations

import time

import pytest
import torch
from dsr_fast.kernels import paged_decode_attention
from dsr_fast.memory import peak_extra_bytes

# name: (batch, Hq, Hkv, D, block_size, table capacity in tokens, live cap, dtype)
SIZES = {
    "tiny": (128, 4, 2, 32, 16, 512, 96, torch.float32),
    "tiny_wide": (128, 4, 2, 32, 16, 8192, 96, torch.float32),  # same live tokens, 16× the table
    "mid": (32, 12, 2, 64, 16, 4096, 1024, torch.float32),
    "real": (256, 12, 2, 128, 16, 8192, 8192, torch.bfloat16),
}


def make_step(batch, num_q_heads, num_kv_heads, head_dim, block_size, capacity, live_cap, dtype, device):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(live_cap // 2, live_cap + 1, (batch,), generator=gen, dtype=torch.int32)
    width, live_blocks = capacity // block_size, -(-live_cap // block_size)
    num_blocks = batch * live_blocks
    # live blocks: a permutation of the pool; the rest of the table: valid ids the dense baseline
    # reads (a pool for every sequence's full capacity would not fit a CPU at 8K)
    table = torch.randint(0, num_blocks, (batch, width), generator=gen)
    table[:, :live_blocks] = torch.randperm(num_blocks, generator=gen).view(batch, live_blocks)
    table = table.to(torch.int32)
    pool = (num_blocks, block_size, num_kv_heads, head_dim)
    x = dict(
        q=torch.randn(batch, num_q_heads, head_dim, generator=gen),
        k_cache=torch.randn(pool, generator=gen),
        v_cache=torch.randn(pool, generator=gen),
        block_table=table,
        seq_lens=lengths,
    )
    return {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in x.items()}


def dense_attention(q, k_cache, v_cache, block_table, seq_lens):
    """Attention over the whole table (the capacity), K/V repeated per query head."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    length = block_table.shape[1] * block_size
    keys = k_cache[block_table.long()].view(batch, length, num_kv_heads, head_dim).float()
    values = v_cache[block_table.long()].view(batch, length, num_kv_heads, head_dim).float()
    keys = keys.repeat_interleave(num_q_heads // num_kv_heads, dim=2).transpose(1, 2)  # [B, Hq, L, D]
    values = values.repeat_interleave(num_q_heads // num_kv_heads, dim=2).transpose(1, 2)
    scores = (q.float()[:, :, None, :] @ keys.transpose(2, 3)).squeeze(2) * head_dim**-0.5  # [B, Hq, L]
    dead = torch.arange(length, device=q.device) >= seq_lens[:, None]
    probs = scores.masked_fill(dead[:, None, :], float("-inf")).softmax(-1)
    return (probs[:, :, None, :] @ values).squeeze(2).to(q.dtype)


@pytest.mark.parametrize("impl", ["triton", "paged", "dense"])
@pytest.mark.parametrize("size", ["tiny", "tiny_wide", "mid", "real"])
def test_paged_decode_attention(benchmark, size, impl, real_sizes, device):
    if real_sizes != (size == "real"):
        pytest.skip("tiny and mid on CPU; real with --real-sizes (GPU)")
    if impl == "triton" and device.type != "cuda":
        pytest.skip("on CPU the kernel's default path is the torch one")
    if impl == "dense" and size in ("real", "tiny_wide"):
        pytest.skip("the dense baseline reads the whole table: 16× tiny's time at tiny_wide, 12 GB at real")
    batch, num_q_heads, num_kv_heads, head_dim, block_size, capacity, live_cap, dtype = SIZES[size]
    x = make_step(batch, num_q_heads, num_kv_heads, head_dim, block_size, capacity, live_cap, dtype, device)
    cuda = device.type == "cuda"

    def step():
        if impl == "dense":
            return dense_attention(**x)
        return paged_decode_attention(**x, backend="auto" if impl == "triton" else "torch")

    def timed():
        step()
        if cuda:
            torch.cuda.synchronize()

    timed()  # warm-up: Triton compiles, first-touch of the gathered buffers
    peak = peak_extra_bytes(timed)
    benchmark.group = f"paged decode attention {size}: B={batch} {num_q_heads}:{num_kv_heads} D={head_dim} " \
                      f"table {capacity} tokens, live ≤ {live_cap}, {str(dtype)[6:]}"
    start = time.perf_counter()
    timed()
    rounds = 20 if cuda else max(3, min(30, int(5 / max(time.perf_counter() - start, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    live_tokens = int(x["seq_lens"].sum())
    kv_bytes = live_tokens * num_kv_heads * head_dim * 2 * x["k_cache"].element_size()
    benchmark.extra_info.update(live_tokens=live_tokens, peak_extra_MB=peak / 2**20,
                                GBps=kv_bytes / benchmark.stats.stats.median / 1e9)
