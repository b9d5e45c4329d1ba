"""Paged decode attention: one query token per sequence against its K/V in a block pool.

For sequence b with live length n_b (its current token's K/V already written), query head h and
its KV head g = h // (Hq / Hkv), slots t = 0 … n_b − 1 found through the block table
(block = block_table[b, t // block_size], row t % block_size):

    s_t   = scale · q[b, h] · K[block, row, g]            (fp32)
    out[b, h] = Σ_t softmax(s)_t · V[block, row, g]       (0 for a padding row, n_b = 0)

Only live slots are read: the cost of a call follows Σ_b n_b, never the pool's capacity or the
block table's width. Two implementations give the same results:

- Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1 for tests). Stage 1, grid
  (sequence, KV head, split): each program takes 1/num_splits of its sequence's live tiles
  (the split is computed on the device from seq_lens, so every split of a sequence does equal
  work whatever its length), gathers [BLOCK_N, D] tiles of K and V through the block table once
  for all query heads of its GQA group ([group, D] × [D, BLOCK_N] dots, the group padded to the
  16 rows an mma needs), and keeps an online softmax (running max, sum, weighted V) in fp32.
  It writes, per (sequence, query head, split), the normalised partial output and its
  log-sum-exp. Stage 2 merges the splits by their log-sum-exp. With one split, stage 1 writes
  the output directly. No host sync, no data-dependent shape: the call can be captured in a
  CUDA graph and replayed with new seq_lens / block_table contents.
- Torch (CPU, and any device with backend="torch"): gathers the live slots of the batch through
  the first ⌈max n_b / block_size⌉ table columns (reading max n_b on the host), then one masked
  scaled_dot_product_attention over (sequence, KV head) with the group's query heads sharing
  their KV head (enable_gqa: K/V never repeated); fp32 scores and softmax. On the CPU this
  fused kernel beat an explicit matmul / masked softmax / matmul by ~1.2–1.8× at engine sizes.

Numerics: fp32 scores, softmax and accumulation. For bf16/fp16 inputs the Triton path rounds
the probabilities to the input dtype before the P·V tensor-core dot (as FlashAttention and
SGLang's decode kernel do): a relative error ≤ 2⁻⁹ (bf16) per probability; the torch path stays
in fp32 throughout. Results do not depend on num_splits beyond fp32 rounding.

File order (as in Liger's ops): constants → Triton kernels → host functions → torch path →
plain reference for tests → public function. There is no autograd Function: decode attention
runs in inference only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# triton, tl and _jit are None / a no-op decorator where triton is not installed (logprobs.py)
from .logprobs import SUPPORTED_DTYPES, _jit, resolve_backend, tl, triton


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# Splits never go past this: stage 2 loads all of a head's partials as one [MAX_SPLITS, D] tile,
# and beyond ~64 the partials' traffic (B·Hq·splits·D·4 bytes written and read) stops being
# small next to the K/V it summarises.
MAX_SPLITS = 64


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Stage 1's tile and launch options on one GPU generation and input dtype (see
    kernel_config)."""

    block_n: int  # KV slots per tile (gathered through the block table: any block_size works)
    num_warps: int
    num_stages: int


# Decode attention reads each K/V byte once and does ~2·group FLOPs per byte: it is bound by
# memory, and the tile is chosen for bytes in flight, not FLOPs. A [64, 128] bf16 tile of K and
# one of V are 16 KB each; 4 warps own the [16, 128] fp32 accumulator in 16 registers per thread.
# The gathered rows are 16-byte aligned (ALIGNED), so the loads become cp.async copies that the
# software pipeline overlaps with the dots: ~39 KB of shared memory and ~120 registers per
# program (AOT-checked), so 3–4 programs per SM on either generation. Ampere (sm_80, 164 KB of
# shared memory per SM): 3 stages. Hopper (sm_90, 228 KB, more bandwidth to cover): 4 stages
# requested. The group's dots are too short (M = 16) for wgmma's 64-row tiles; Triton uses
# mma.sync (HMMA) on both generations.
_SM90 = PagedAttentionConfig(block_n=64, num_warps=4, num_stages=4)
_SM80 = PagedAttentionConfig(block_n=64, num_warps=4, num_stages=3)
# fp32 inputs: no tensor-core instruction takes fp32 operands with IEEE precision, so the dots
# are FMAs with their operands in registers. 32-slot tiles over 8 warps: with 4 warps the split
# kernel needs 255 registers and spills on sm_90.
_FP32 = PagedAttentionConfig(block_n=32, num_warps=8, num_stages=3)
# The interpreter (CPU tensors): 16-slot tiles, so test-sized sequences span several tiles and
# several splits.
_INTERPRETER = PagedAttentionConfig(block_n=16, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@_jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb, stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    max_blocks_per_seq, qk_scale_log2,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Online softmax of one (sequence, KV head, split) over its share of the live slots.

    Works in log2 units (scores pre-multiplied by scale·log2 e, exp2): one multiply per score.
        m' = max(m, max_t s_t),  l' = l·2^{m−m'} + Σ_t 2^{s_t−m'},  acc' = acc·2^{m−m'} + Σ_t 2^{s_t−m'} v_t
    m starts at −∞; every tile holds a live slot, so m' is finite and 2^{m−m'} = 0 on the first.
    SINGLE_SPLIT: write acc / l to out (0 for a padding row); else write acc / l and
    lse = m + log2 l (−∞ for an empty split) to the partials for stage 2.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # A length past the table's capacity would read past its row: clamp (the host cannot check
    # without a sync; the torch path raises).
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_blocks_per_seq * BLOCK_SIZE)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    rows = tl.arange(0, BLOCK_G)  # query heads of the group, padded to an mma's 16 rows
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_tb
    for tile_start in range(start, end, BLOCK_N):
        slots = tile_start + tl.arange(0, BLOCK_N)
        live = slots < end
        blocks = tl.load(table_row + slots // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        rows_in_block = slots % BLOCK_SIZE
        kv_mask = live[:, None] & dim_mask[None, :]
        k_rows = blocks * stride_kb + rows_in_block * stride_kt + kv_head * stride_kh
        v_rows = blocks * stride_vb + rows_in_block * stride_vt + kv_head * stride_vh
        k_ptrs = k_ptr + k_rows[:, None] + dims[None, :]
        v_ptrs = v_ptr + v_rows[:, None] + dims[None, :]
        if ALIGNED:
            # Each slot's head row starts 16-byte aligned: one 16-byte load per 8 bf16 elements
            # instead of one per element (and 8× fewer 64-bit addresses held in registers).
            k_ptrs = tl.multiple_of(k_ptrs, [16, 16])
            v_ptrs = tl.multiple_of(v_ptrs, [16, 16])
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_G, BLOCK_N]
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # Slots past the live length read zeros (a never-written slot may hold NaN: 0·NaN = NaN).
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    nonempty = l > 0
    result = acc / tl.where(nonempty, l, 1.0)[:, None]  # an empty split or padding row: acc = 0
    store_mask = row_mask[:, None] & dim_mask[None, :]
    if SINGLE_SPLIT:
        out = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = part_out_ptr + seq.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(part + dims[None, :], result, mask=store_mask)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + seq.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=row_mask)


@_jit
def _paged_decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[seq, head] = Σ_k w_k o_k / Σ_k w_k with w_k = 2^{lse_k − max lse} (empty splits: w = 0).

    A padding row has every lse = −∞: its output is 0, not NaN.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    lse = tl.load(part_lse_ptr + seq * stride_lb + head * stride_lh + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # no −∞ − (−∞) for a padding row
    weights = tl.where(lse > float("-inf"), tl.exp2(lse - lse_max), 0.0)
    part = part_out_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :]
    parts = tl.load(part, mask=split_mask[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    result = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    out = out_ptr + seq * stride_ob + head * stride_oh + dims
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------


def check_paged_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None,
) -> None:
    """Raise ValueError naming the offending argument, with its shape or dtype. Reads nothing
    back from the device (the Triton path must stay capturable in a CUDA graph)."""
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [B, Hq, D], got shape {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be 4-D [num_blocks, block_size, Hkv, D], got shape {tuple(cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim} "
                         f"(q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)})")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's heads Hq = {num_q_heads} must be a multiple of k_cache's Hkv = {num_kv_heads}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [B={batch}, max_blocks_per_seq], got shape {tuple(block_table.shape)}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [B={batch}], got shape {tuple(seq_lens.shape)}")
    if seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32, got {seq_lens.dtype}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {tensor.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(
            f"q, k_cache, v_cache, block_table and seq_lens must be on one device, got {sorted(map(str, devices))}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _interpreting() -> bool:
    # @triton.jit reads TRITON_INTERPRET when the kernels are defined (at import): ask the kernel.
    return triton is not None and type(_paged_decode_split_kernel).__name__ == "InterpretedFunction"


def kernel_config(device: torch.device, dtype: torch.dtype) -> PagedAttentionConfig:
    """Stage 1's tile for inputs of `dtype` on `device`."""
    if device.type != "cuda":
        return _INTERPRETER
    major, _ = torch.cuda.get_device_capability(device)
    return gpu_kernel_config(major, dtype)


def gpu_kernel_config(major: int, dtype: torch.dtype) -> PagedAttentionConfig:
    """The one place tiles are chosen (compute capability major → tile), separate from the
    device query so the AOT tests compile what a given GPU launches. Blackwell takes sm_90's."""
    if dtype == torch.float32:
        return _FP32
    return _SM90 if major >= 9 else _SM80


def default_num_splits(
    batch: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int, device: torch.device
) -> int:
    """Splits of the KV length when the caller passes none: from shapes only (never seq_lens),
    so a CUDA graph replays with the same value.

    Aims at ~2 waves of stage-1 programs over the GPU's SMs when batch × Hkv alone would leave
    SMs idle (few long sequences), with at least 4 tiles of the table's capacity per split, so
    that short-context buckets are not cut into slivers. A graph per batch bucket should pass
    num_splits explicitly (e.g. this function's value at the bucket's size).
    """
    if device.type == "cuda":
        target_programs = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target_programs = 8  # the interpreter: few programs, several splits per long sequence
    programs = max(1, batch * num_kv_heads)
    wanted = math.ceil(target_programs / programs)
    capacity_tiles = math.ceil(max_blocks_per_seq * block_size / 64)
    return max(1, min(wanted, MAX_SPLITS, capacity_tiles // 4))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_meta(config: PagedAttentionConfig, group: int, head_dim: int, block_size: int, single_split: bool,
               aligned: bool) -> dict:
    """Constexprs + launch options of _paged_decode_split_kernel (shared with the AOT tests)."""
    return dict(
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=config.block_n,
        SINGLE_SPLIT=single_split, DOT_PRECISION="ieee", ALIGNED=aligned,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def merge_meta(head_dim: int, num_splits: int) -> dict:
    """Constexprs + launch options of _paged_decode_merge_kernel."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4, num_stages=1)


def _aligned(*pools: torch.Tensor) -> bool:
    """Every slot's head row starts at a multiple of 16 elements (so 16-byte aligned for any
    dtype) from a 16-byte aligned base. Triton's launcher derives the same from the arguments;
    as a constexpr hint it is part of the source, and an ahead-of-time compile (no arguments)
    builds the same vectorised loads as production."""
    return all(p.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in p.stride()[:3]) for p in pools)


def _triton_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    config: PagedAttentionConfig,
) -> torch.Tensor:
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    # The kernels index the head dimension with unit stride.
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    single = num_splits == 1
    # Workspace sized from shapes only: allocated inside a graph capture from its private pool.
    # (with one split, stage 1 writes out directly and the partials are never touched)
    fp32 = dict(dtype=torch.float32, device=q.device)
    part_out = out if single else torch.empty(batch, num_q_heads, num_splits, head_dim, **fp32)
    part_lse = out if single else torch.empty(batch, num_q_heads, num_splits, **fp32)
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), 0 if single else part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        block_table.shape[1], scale * _LOG2E,
        **split_meta(config, group, head_dim, block_size, single, _aligned(k_cache, v_cache)),
    )
    if not single:
        _paged_decode_merge_kernel[(batch, num_q_heads)](
            part_out, part_lse, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            num_splits,
            **merge_meta(head_dim, num_splits),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Torch path (CPU; any device with backend="torch")
# ---------------------------------------------------------------------------------------------


def _torch_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max()) if batch else 0  # a host read: this path is for the CPU
    if max_len <= 0:
        return torch.zeros_like(q)
    num_blocks = -(-max_len // block_size)
    if num_blocks > block_table.shape[1]:
        longest = int(seq_lens.argmax())
        raise ValueError(
            f"seq_lens[{longest}] = {max_len} needs {num_blocks} blocks of {block_size}, but block_table "
            f"has {block_table.shape[1]} per sequence"
        )
    # Gather slot by slot from the first ⌈max n / block_size⌉ table columns. A slot past its
    # sequence's length (unused table entries may hold any id; a reused block may hold another
    # sequence's stale values, or NaN) is redirected to the sequence's first slot, which is live:
    # the gathered K/V are finite wherever they are masked, so no masking pass over them is
    # needed (0·NaN would be NaN).
    length = num_blocks * block_size
    live = torch.arange(length, device=q.device) < seq_lens[:, None]  # [B, L]
    offsets = torch.arange(block_size, device=q.device)
    slots = (block_table[:, :num_blocks, None].long() * block_size + offsets).view(batch, length)
    first = torch.where(seq_lens[:, None] > 0, slots[:, :1], 0)  # a padding row's table may be unset
    slots = torch.where(live, slots, first)
    # index_select copies whole [Hkv, D] rows; advanced indexing (pool[slots]) goes element by
    # element and gathered 2.5–4× slower on the CPU.
    num_slots, slots = k_cache.shape[0] * block_size, slots.view(-1)
    keys = k_cache.reshape(num_slots, num_kv_heads, head_dim).index_select(0, slots)
    values = v_cache.reshape(num_slots, num_kv_heads, head_dim).index_select(0, slots)
    keys = keys.view(batch, length, num_kv_heads, head_dim)  # the live blocks only
    values = values.view(batch, length, num_kv_heads, head_dim)
    if q.dtype != torch.float32:  # fp32 scores and softmax whatever the storage dtype
        keys, values = keys.float(), values.float()
    # One fused CPU kernel for scores, masked softmax and P·V, batched over (sequence, KV head)
    # with the group's query heads sharing their KV head (enable_gqa: K/V are not repeated).
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=live[:, None, None, :], scale=scale, enable_gqa=True,
    ).view(batch, num_q_heads, head_dim)
    # Padding rows (n = 0) have no live slot: their softmax is NaN; they return 0.
    return torch.where((seq_lens > 0)[:, None, None], out, 0.0).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Plain reference (tests only): a loop over sequences, float64
# ---------------------------------------------------------------------------------------------


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each sequence over its first seq_lens[b] slots, one sequence at a time, with
    the KV heads repeated per query head; float64 [B, Hq, D] (0 for padding rows)."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        blocks = block_table[b, : -(-n // block_size)].long().cpu()
        keys = k_cache.cpu()[blocks].reshape(-1, num_kv_heads, head_dim)[:n].double()
        values = v_cache.cpu()[blocks].reshape(-1, num_kv_heads, head_dim)[:n].double()
        keys = keys.repeat_interleave(num_q_heads // num_kv_heads, dim=1)  # [n, Hq, D]
        values = values.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].cpu().double(), keys) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)
    return out


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its K/V in a paged pool.

    Args:
        q: [B, Hq, D] the current token's queries (fp32/bf16/fp16), head dim contiguous.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] one layer's K and V pools, q's dtype.
            Hq must be a multiple of Hkv (grouped-query attention: query head h reads KV head
            h // (Hq / Hkv)). Any block_size; any D (the Triton path pads D to a power of 2 ≥ 16).
        block_table: [B, max_blocks_per_seq] int32, the block ids of each sequence in order.
            Entries past a sequence's live blocks are never read (Triton) or masked (torch).
            Two sequences may share blocks (a shared prompt).
        seq_lens: [B] int32 live KV length of each sequence, including the current token (its
            K/V already written into the pool). 0 marks a padding row: its output is 0.
        scale: score scale, default D ** -0.5.
        num_splits: splits of each sequence's live length in the Triton path (stage 1 programs
            per sequence and KV head). None: default_num_splits, from shapes only. Results do not
            depend on it beyond fp32 rounding. The torch path ignores it.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" (CUDA, or CPU tensors
            under TRITON_INTERPRET=1 for tests) or "torch".

    Returns:
        [B, Hq, D] in q's dtype. The Triton path reads seq_lens and block_table on the device
        only (no host sync, no data-dependent shape): it can be captured in a CUDA graph. The
        torch path reads max(seq_lens) on the host and raises if a length exceeds the table's
        capacity (the Triton path clamps it to max_blocks_per_seq × block_size).
    """
    check_paged_attention_inputs(q, k_cache, v_cache, block_table, seq_lens, scale)
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    backend = resolve_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return _torch_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_cache.shape[2], block_table.shape[1], k_cache.shape[1], q.device)
    return _triton_paged_decode_attention(
        q, k_cache, v_cache, block_table, seq_lens, scale, num_splits, kernel_config(q.device, q.dtype)
    )
