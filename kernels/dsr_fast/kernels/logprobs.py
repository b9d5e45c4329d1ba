"""Fused lm_head → per-token log-probability and entropy, with temperature.

For one token with hidden state h (row of ``hidden``), label y and temperature τ:

    x = h·Wᵀ (raw logits, [V]),  z = x / τ,  lse = log Σ_j e^{z_j},  p_j = e^{z_j − lse}
    logp_y = z_y − lse
    H      = −Σ_j p_j log p_j = lse − z̄,   z̄ = Σ_j p_j z_j

Gradients, with upstream g_lp = ∂L/∂logp_y and g_H = ∂L/∂H per token:

    ∂logp_y/∂z_j = 1[j=y] − p_j
    ∂H/∂z_j      = −p_j (z_j − z̄)           (because log p_j + H = z_j − z̄)
    dz_j = g_lp (1[j=y] − p_j) − g_H p_j (z_j − z̄)
    dx   = dz / τ;   dh = dx·W;   dW += dxᵀ·h

The full [T, V] logits are never materialised. Two implementations give the same results:

- Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1 for tests). Forward: one program per
  (token tile × vocab split) runs an online max / Σe^{z−m} / Σe^{z−m}(z−m) over its vocab tiles,
  gathering z_y on the way, and writes 4 fp32 partials per token and split; a combine kernel
  merges the splits in a fixed order. Backward: per vocab slab, a kernel recomputes the logit
  tiles and writes dx for the slab into a bounded workspace [T, slab]; two GEMM kernels then form
  dW[slab] = dxᵀ·h (each program owns a dW tile and loops over all tokens: dW is written once,
  never accumulated) and dh += dx·W[slab] (each program owns a dh tile; slabs are added in
  order). No atomics anywhere, so every result is bitwise reproducible.
- Chunked torch (CPU, and any device with backend="torch"): walks the tokens in chunks whose
  [chunk, V] fp32 logits fit a byte budget; the backward recomputes each chunk's logits.

Both keep only lse and z̄ per token (8 bytes) for the backward. All softmax math is fp32 whatever
the input dtype; outputs are fp32, gradients come back in the input dtypes.

File order (as in Liger's ops): constants → Triton kernels → host functions → torch fallback →
plain reference for tests → autograd Function → public function.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is a Linux-only dependency; the torch path still works without it
    triton = tl = None

    def _jit(fn):
        return fn


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

# Budget for one [chunk, V] fp32 buffer. The backward holds about three of them at once (logits,
# probabilities, a temporary), so the peak is ~3× this: ~0.4 GB. At V = 151,936 that is 220 tokens
# per chunk, about the 256-token chunks Liger's FLCE settles on for the same vocabulary.
CHUNK_BYTES = 128 * 2**20

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")

# Forward partials per (split, token), in this order along the first axis of the partials buffer:
# running max m, Σ e^{z−m}, z_y (0 outside the split holding y), Σ e^{z−m}(z−m).
_NUM_STATS = 4


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile: block_m × block_n outputs, block_k reduction step, launch options."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LogprobsKernelConfig:
    """Everything the Triton path launches with on one GPU generation and input dtype (see
    kernel_config)."""

    forward: TileConfig  # m = tokens, n = vocab, k = hidden
    grad_logits: TileConfig  # m = tokens, n = vocab, k = hidden
    grad_hidden: TileConfig  # m = tokens, n = hidden, k = vocab
    grad_weight: TileConfig  # m = vocab, n = hidden, k = tokens
    split_cols: int = 8192  # vocab columns per forward program; a multiple of forward.block_n
    group: int = 8  # grouped raster: row tiles per group, so concurrent programs share L2 lines
    num_slabs: int = 32  # the backward walks the vocabulary in about this many slabs...
    max_workspace_bytes: int = 512 * 2**20  # ...more if the [T, slab] dx workspace would exceed this
    combine_block: int = 256
    # who runs the backward's two GEMMs per slab (dW[slab] = dxᵀ·h, dh += dx·W[slab]): "triton"
    # (the kernels below) or "cublas" (torch.mm / addmm, fp32 accumulation); see BACKWARD_GEMMS
    backward_gemm: str = "triton"
    # dW programs resident per SM at once (shared memory bound): sizes the slab in whole waves
    grad_weight_programs_per_sm: int = 1


# Which engine runs the backward GEMMs, per GPU generation (compute capability major), for 16-bit
# inputs. Filled from gpu_check's "logprobs backward GEMMs" rows, which time both engines on the
# same inputs and print the winner's line for this table. A generation not measured yet keeps the
# Triton kernels, whose registers, spills and wgmma use the AOT tests check.
BACKWARD_GEMMS = {8: "triton", 9: "triton"}  # measured: none yet (no GPU run so far)


# Hopper (H100/H200, sm_90). wgmma works on 64-row warpgroup tiles: 128-token tiles with 8 warps;
# BLOCK_K = 64 bf16 is one 128-byte swizzled row. The forward and dx kernels hold a 128×128 fp32
# logit tile and its exponentials in registers (~240 of 255 per thread): wider tiles spill. The
# dh kernel also reads and writes an fp32 running-sum tile, so it stays at 128×128 (a 128×256
# tile spills); the dW kernel has no such epilogue and takes 128×256.
_SM90 = LogprobsKernelConfig(
    forward=TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    grad_logits=TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    grad_hidden=TileConfig(128, 128, 64, num_warps=8, num_stages=4),
    grad_weight=TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    backward_gemm=BACKWARD_GEMMS[9],
)
# Ampere (A100, sm_80): mma.sync; BLOCK_K = 32 with 4 stages keeps shared memory at 48 KB (it also
# fits the 100 KB of sm_86/sm_89) while hiding the cp.async latency. 8 warps everywhere: with 4 a
# 128×128 fp32 accumulator is 128 registers per thread and the dh kernel spills.
_SM80 = LogprobsKernelConfig(
    forward=TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    grad_logits=TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    grad_hidden=TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    grad_weight=TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    backward_gemm=BACKWARD_GEMMS[8],
)
# fp32 inputs with TF32 allowed (torch.backends.cuda.matmul.allow_tf32): the same tensor-core
# tiles with BLOCK_K = 32 fp32, so a stage holds as many bytes as the sm_90 bf16 one. The 16-bit
# BLOCK_K = 64 would need 256 KB (dh) and 288 KB (dW) of shared memory on sm_90, over its 227 KB:
# the launch fails. On sm_80 BLOCK_K = 16 leaves the dW kernel spilling; 32 with 3 stages uses
# 64 KB.
_SM90_TF32 = LogprobsKernelConfig(
    forward=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_logits=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_hidden=TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    grad_weight=TileConfig(128, 256, 32, num_warps=8, num_stages=3),
)
_SM80_TF32 = LogprobsKernelConfig(
    forward=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_logits=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_hidden=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_weight=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
)
# fp32 inputs without TF32 (torch's default): no tensor-core instruction takes fp32 operands, so
# tl.dot becomes FMAs whose operand fragments sit in registers next to the accumulator. With the
# tensor-core tiles the forward and dx kernels spill on both generations (up to 6.5 KB of stack
# on sm_90); 64-token tiles with BLOCK_K = 16 do not. The same tiles serve sm_80 and sm_90.
_FP32_FMA = LogprobsKernelConfig(
    forward=TileConfig(64, 128, 16, num_warps=8, num_stages=3),
    grad_logits=TileConfig(64, 128, 16, num_warps=8, num_stages=3),
    grad_hidden=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    grad_weight=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
)
# The interpreter (CPU tensors): each interpreted op costs ~0.1 ms whatever its size, so tiles
# are as large as test-sized inputs (T ≈ 40, V ≈ 1,000) allow while still spanning several token
# tiles, vocab tiles per split, forward splits and backward slabs.
_INTERPRETER = LogprobsKernelConfig(
    forward=TileConfig(32, 128, 64, num_warps=4, num_stages=1),
    split_cols=256,
    grad_logits=TileConfig(32, 128, 64, num_warps=4, num_stages=1),
    grad_hidden=TileConfig(32, 64, 128, num_warps=4, num_stages=1),
    grad_weight=TileConfig(128, 64, 32, num_warps=4, num_stages=1),
    group=2,
    num_slabs=4,
    max_workspace_bytes=2**20,
    combine_block=64,
)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@_jit
def _grouped_tile(pid, num_m, num_n, GROUP: tl.constexpr):
    """Map a 1-D program id to (tile_m, tile_n), GROUP row tiles at a time.

    Programs launch in id order, so the ~#SM programs resident at once cover GROUP row tiles ×
    a few column tiles: their operand tiles are shared through L2 instead of re-read from HBM.
    """
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


@_jit
def _scaled_logit_tile(
    hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
    stride_ht, stride_hk, stride_wv, stride_wk,
    hidden_size, inv_temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """z[rows, cols] = (hidden[rows] · weight[cols]ᵀ) / τ as an fp32 [BLOCK_T, BLOCK_V] tile.

    Masked rows/columns read zeros (their z is 0 and must be masked by the caller). Row offsets
    are int64, so T·H or V·H past 2³¹ elements cannot overflow.
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_ht + offs_k[None, :] * stride_hk
    # W is read as a [BLOCK_K, BLOCK_V] tile of Wᵀ: tl.dot takes it as the B operand directly.
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wk
    if ALIGNED:
        h_ptrs = tl.multiple_of(h_ptrs, [16, 16])
        w_ptrs = tl.multiple_of(w_ptrs, [16, 16])
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < hidden_size
            h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc * inv_temperature


@_jit
def _logprobs_forward_kernel(
    hidden_ptr, weight_ptr, labels_ptr, partials_ptr,
    stride_ht, stride_hk, stride_wv, stride_wk, stride_pstat, stride_psplit,
    num_tokens, vocab_size, hidden_size, split_cols,
    inv_temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax statistics of one token tile over one vocab split [c0, c1).

    For every vocab tile of the split (z = logits / τ, masked columns z = −∞):
        m' = max(m, max_j z_j)                          m starts at −∞ (verl #2656 used 0)
        s' = s·e^{m−m'} + Σ_j e^{z_j−m'}
        u' = e^{m−m'}·(u + (m−m')·s) + Σ_j e^{z_j−m'}(z_j − m')     (only if COMPUTE_ENTROPY)
        z_y += z_j for j = y, if y is in the tile
    u is kept relative to the running max, so the entropy log s − u/s never cancels two
    large logits. Writes (m, s, z_y, u) to partials[stat, split, token].
    """
    num_t = tl.cdiv(num_tokens, BLOCK_T)
    num_splits = tl.cdiv(vocab_size, split_cols)
    tile_t, split = _grouped_tile(tl.program_id(0), num_t, num_splits, GROUP)
    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < num_tokens
    # int32: labels < V (checked on the host); an int64 label tile costs registers in every tile.
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)

    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    u = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    split_start = split * split_cols
    split_end = tl.minimum(split_start + split_cols, vocab_size)
    for v0 in range(split_start, split_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < split_end
        z = _scaled_logit_tile(
            hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
            stride_ht, stride_hk, stride_wv, stride_wk, hidden_size, inv_temperature,
            BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, ALIGNED, DOT_PRECISION,
        )
        # Only ~BLOCK_T·BLOCK_V/V of the tiles hold a label of their rows: test the BLOCK_T labels
        # instead of comparing the whole tile (which also keeps z live longer: registers).
        in_tile = (labels >= v0) & (labels < v0 + BLOCK_V)
        if tl.max(in_tile.to(tl.int32), axis=0) > 0:
            z_target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # Every tile has a real column, so m_new is finite: no −∞ − (−∞) below.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = −∞)
        z_rel = z - m_new[:, None]  # −∞ in masked columns
        p = tl.exp(z_rel)
        if COMPUTE_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0)  # (m − m')·s with m = −∞, s = 0 is 0, not NaN
            # masked columns: p = 0 times 0, not times −∞
            u = alpha * (u + shift * s) + tl.sum(p * tl.where(col_mask[None, :], z_rel, 0.0), axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new

    out = partials_ptr + split * stride_psplit + rows
    tl.store(out + 0 * stride_pstat, m, mask=row_mask)
    tl.store(out + 1 * stride_pstat, s, mask=row_mask)
    tl.store(out + 2 * stride_pstat, z_target, mask=row_mask)
    if COMPUTE_ENTROPY:
        tl.store(out + 3 * stride_pstat, u, mask=row_mask)


@_jit
def _logprobs_combine_kernel(
    partials_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr, mean_logit_ptr,
    stride_pstat, stride_psplit,
    num_tokens, num_splits, vocab_size,
    ignore_index,
    BLOCK: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
):
    """Merge the per-split partials of BLOCK tokens, splits in index order (deterministic):

        m = max_k m_k,  s = Σ_k s_k e^{m_k−m},  u = Σ_k e^{m_k−m}(u_k + (m_k − m) s_k),  z_y = Σ_k z_y,k
        lse = m + log s,  logp = (z_y − m) − log s,  z̄ = m + u/s,  H = log s − u/s

    Ignored tokens get logp = H = 0; lse and z̄ are written for every token (the backward zeroes
    the upstream gradient of ignored tokens instead). A label outside [0, V) that is not
    ignore_index matches no column: its logp is NaN, so the bad label shows in the loss without
    a host sync to look for it.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < num_tokens
    base = partials_ptr + rows
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for k in range(0, num_splits):
        m = tl.maximum(m, tl.load(base + k * stride_psplit, mask=row_mask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, num_splits):
        split = base + k * stride_psplit
        m_k = tl.load(split + 0 * stride_pstat, mask=row_mask, other=0.0)
        s_k = tl.load(split + 1 * stride_pstat, mask=row_mask, other=1.0)  # no log(0) past T
        scale = tl.exp(m_k - m)
        s += s_k * scale
        z_target += tl.load(split + 2 * stride_pstat, mask=row_mask, other=0.0)
        if COMPUTE_ENTROPY:
            u_k = tl.load(split + 3 * stride_pstat, mask=row_mask, other=0.0)
            u += scale * (u_k + (m_k - m) * s_k)
    log_s = tl.log(s)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = labels != ignore_index
    logp = tl.where(valid & ((labels < 0) | (labels >= vocab_size)), float("nan"), (z_target - m) - log_s)
    tl.store(logprobs_ptr + rows, tl.where(valid, logp, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, m + log_s, mask=row_mask)
    if COMPUTE_ENTROPY:
        mean_rel = u / s
        tl.store(entropy_ptr + rows, tl.where(valid, log_s - mean_rel, 0.0), mask=row_mask)
        tl.store(mean_logit_ptr + rows, m + mean_rel, mask=row_mask)


@_jit
def _logprobs_backward_dx_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, mean_logit_ptr, grad_logprobs_ptr, grad_entropy_ptr, dx_ptr,
    stride_ht, stride_hk, stride_wv, stride_wk, stride_xt,
    num_tokens, hidden_size, slab_start, slab_cols, slab_width,
    inv_temperature, ignore_index,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx = dz/τ for one [BLOCK_T, BLOCK_V] tile of the slab [slab_start, slab_start + slab_cols):

        p_j  = e^{z_j − lse}
        dz_j = g_lp (1[j=y] − p_j) − g_H p_j (z_j − z̄) = p_j (−g_lp − g_H (z_j − z̄)) + g_lp 1[j=y]

    with g_lp = g_H = 0 for ignored tokens (selected, not multiplied: NaN upstream stays out).
    Stored in dx's dtype (the GEMM operand dtype) at dx[token, j − slab_start], for all
    slab_width columns: columns past the vocabulary get exact zeros, so the GEMM kernels read
    whole tiles without masks along dx's contiguous dimension (masks there stop Triton from
    vectorising and pipelining the loads).
    """
    num_t = tl.cdiv(num_tokens, BLOCK_T)
    num_v = tl.cdiv(slab_width, BLOCK_V)
    tile_t, tile_v = _grouped_tile(tl.program_id(0), num_t, num_v, GROUP)
    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    local_cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = slab_start + local_cols
    row_mask = rows < num_tokens
    col_mask = local_cols < slab_cols
    z = _scaled_logit_tile(
        hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
        stride_ht, stride_hk, stride_wv, stride_wk, hidden_size, inv_temperature,
        BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, ALIGNED, DOT_PRECISION,
    )
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (labels != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # Masked columns read z = 0, and e^{0 − lse} overflows when every logit is very negative.
    p = tl.exp(tl.where(col_mask[None, :], z - lse[:, None], float("-inf")))
    coeff = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0), 0.0)
        mean_logit = tl.load(mean_logit_ptr + rows, mask=row_mask, other=0.0)
        coeff = -g_h[:, None] * (z - mean_logit[:, None])
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.where(valid, tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0), 0.0)
        coeff -= g_lp[:, None]
    dz = p * coeff
    if HAS_GRAD_LOGPROBS:
        dz += tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0)
    dx = dz * inv_temperature
    out = dx_ptr + rows.to(tl.int64)[:, None] * stride_xt + local_cols[None, :]
    if ALIGNED:
        out = tl.multiple_of(out, [16, 16])
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None])


@_jit
def _logprobs_backward_dh_kernel(
    dx_ptr, weight_ptr, acc_ptr, grad_hidden_ptr,
    stride_xt, stride_wv, stride_wk, stride_at, stride_gt,
    num_tokens, hidden_size, slab_start, slab_cols, slab_width,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
    ACCUMULATE: tl.constexpr, FINAL: tl.constexpr, EVEN_H: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dh[tile] (+)= dx[tile rows, slab] · W[slab, tile cols], fp32 accumulation.

    One program owns one [BLOCK_T, BLOCK_H] tile of dh and reduces over the slab's columns in
    order; slabs are launched in order, so the sum over the vocabulary has a fixed order.
    ACCUMULATE: add the fp32 running sum in acc (after the loop: fewer live registers in it).
    FINAL: write grad_hidden in its dtype, else write the running sum back to acc.
    """
    num_t = tl.cdiv(num_tokens, BLOCK_T)
    num_h = tl.cdiv(hidden_size, BLOCK_H)
    tile_t, tile_h = _grouped_tile(tl.program_id(0), num_t, num_h, GROUP)
    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    hcols = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v = tl.arange(0, BLOCK_V)
    row_mask = rows < num_tokens
    h_mask = (hcols < hidden_size) | EVEN_H
    rows64 = rows.to(tl.int64)
    x_ptrs = dx_ptr + rows64[:, None] * stride_xt + offs_v[None, :]
    w_ptrs = weight_ptr + (slab_start + offs_v).to(tl.int64)[:, None] * stride_wv + hcols[None, :] * stride_wk
    if ALIGNED:
        x_ptrs = tl.multiple_of(x_ptrs, [16, 16])
        w_ptrs = tl.multiple_of(w_ptrs, [16, 16])
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for v0 in range(0, slab_width, BLOCK_V):
        x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=((v0 + offs_v) < slab_cols)[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_V
        w_ptrs += BLOCK_V * stride_wv
    mask = row_mask[:, None] & h_mask[None, :]
    acc_ptrs = acc_ptr + rows64[:, None] * stride_at + hcols[None, :]
    if ALIGNED:
        acc_ptrs = tl.multiple_of(acc_ptrs, [16, 16])
    if ACCUMULATE:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    if FINAL:
        out = grad_hidden_ptr + rows64[:, None] * stride_gt + hcols[None, :]
        if ALIGNED:
            out = tl.multiple_of(out, [16, 16])
        tl.store(out, acc.to(grad_hidden_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)


@_jit
def _logprobs_backward_dw_kernel(
    dx_ptr, hidden_ptr, grad_weight_ptr,
    stride_xt, stride_ht, stride_hk, stride_gv,
    num_tokens, hidden_size, slab_start, slab_cols, slab_width,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
    EVEN_H: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[slab_start + tile rows, tile cols] = Σ_t dx[t, tile rows]ᵀ · h[t, tile cols].

    One program owns one [BLOCK_V, BLOCK_H] tile of dW and loops over every token in order, so
    dW is written exactly once (in weight's dtype, from an fp32 sum) with no cross-program
    reduction: deterministic without atomics, and no fp32 [V, H] accumulator.
    """
    num_v = tl.cdiv(slab_width, BLOCK_V)
    num_h = tl.cdiv(hidden_size, BLOCK_H)
    tile_v, tile_h = _grouped_tile(tl.program_id(0), num_v, num_h, GROUP)
    local_rows = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    hcols = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_t = tl.arange(0, BLOCK_T)
    h_mask = (hcols < hidden_size) | EVEN_H
    # dx is read as [BLOCK_V, BLOCK_T] tiles of dxᵀ (the A operand): no transpose instruction.
    x_ptrs = dx_ptr + offs_t.to(tl.int64)[None, :] * stride_xt + local_rows[:, None]
    h_ptrs = hidden_ptr + offs_t.to(tl.int64)[:, None] * stride_ht + hcols[None, :] * stride_hk
    if ALIGNED:
        x_ptrs = tl.multiple_of(x_ptrs, [16, 16])
        h_ptrs = tl.multiple_of(h_ptrs, [16, 16])
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t_mask = (t0 + offs_t) < num_tokens
        x = tl.load(x_ptrs, mask=t_mask[None, :], other=0.0)
        h = tl.load(h_ptrs, mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, h, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_T * stride_xt
        h_ptrs += BLOCK_T * stride_ht
    out = grad_weight_ptr + (slab_start + local_rows).to(tl.int64)[:, None] * stride_gv + hcols[None, :]
    if ALIGNED:
        out = tl.multiple_of(out, [16, 16])
    tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=(local_rows < slab_cols)[:, None] & h_mask[None, :])

# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------


def check_logprobs_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    check_label_range: bool = True,
) -> None:
    """Raise ValueError naming the offending argument, with shapes/dtypes, for bad inputs.

    check_label_range: also find labels outside [0, V). That reads a boolean back from the
    labels' device, a host sync on a GPU, so fused_logprobs asks for it only on CPU tensors or
    when told to (check_labels=True / DSR_FAST_CHECK_LABELS=1). Unchecked, a bad label gives a
    NaN logprob on both paths, never an out-of-bounds read.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [T], got shape {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden and weight disagree on H: hidden {tuple(hidden.shape)} vs weight "
            f"{tuple(weight.shape)} (expected hidden [T, H], weight [V, H])"
        )
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but hidden has T = {hidden.shape[0]} rows "
            f"(labels {tuple(labels.shape)}, hidden {tuple(hidden.shape)})"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {tensor.dtype}"
            )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, "
            f"{weight.device}, {labels.device}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not check_label_range:
        return
    vocab_size = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if labels.numel() > 0 and bool(bad.any()):  # host sync on a GPU, see docstring
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must lie in [0, V={vocab_size}) or equal ignore_index={ignore_index}; "
            f"labels[{position}] = {int(labels[position])}"
        )


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one [chunk, V] fp32 buffer fits CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))


def _interpreting() -> bool:
    # @triton.jit reads TRITON_INTERPRET when the kernels are defined (at import), so ask the
    # kernel object, not the environment.
    return triton is not None and type(_logprobs_forward_kernel).__name__ == "InterpretedFunction"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" → "triton" for CUDA tensors (when triton is installed), "torch" otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not _interpreting():
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing dsr_fast.kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA (or CPU under the interpreter), got {device}")
    return backend


def kernel_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LogprobsKernelConfig:
    """The Triton tile configuration for inputs of `dtype` on `device`."""
    if device.type != "cuda":
        return _INTERPRETER
    major, _ = torch.cuda.get_device_capability(device)
    return gpu_kernel_config(major, dtype, _dot_precision(dtype))


def gpu_kernel_config(major: int, dtype: torch.dtype, precision: str) -> LogprobsKernelConfig:
    """The one place tiles are chosen: per GPU generation (compute capability major), and for
    fp32 inputs per dot precision. Separate from the device query so the AOT tests compile
    exactly what a given GPU would launch."""
    # sm_90 tiles need wgmma and 228 KB of shared memory; Blackwell takes the same tiles.
    hopper = major >= 9
    if dtype != torch.float32:
        return _SM90 if hopper else _SM80
    if precision == "tf32":
        return _SM90_TF32 if hopper else _SM80_TF32
    return _FP32_FMA


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's TF32 switch, as the torch path's matmuls do; 16-bit inputs
    # ignore the setting.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _aligned(*matrices: torch.Tensor) -> bool:
    """Each matrix starts 16-byte aligned with unit column stride and a row stride that is a
    multiple of 16 bytes, so every row a kernel tile reads or writes starts 16-byte aligned.

    Triton's launcher derives the same facts from the arguments; passing them as ALIGNED hints
    makes them part of the kernel source, so an ahead-of-time compile (no GPU, no arguments)
    builds the same vectorised, pipelined code as production.
    """
    return all(
        m.data_ptr() % 16 == 0 and m.stride(1) == 1 and (m.stride(0) * m.element_size()) % 16 == 0
        for m in matrices
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _slab_align(config: LogprobsKernelConfig) -> int:
    return math.lcm(config.grad_logits.block_n, config.grad_hidden.block_k, config.grad_weight.block_m)


def backward_slab_cols(
    num_tokens: int,
    vocab_size: int,
    element_size: int,
    config: LogprobsKernelConfig,
    hidden_size: int | None = None,
    num_sms: int | None = None,
) -> int:
    """Vocab columns per backward slab (= the dx workspace's width): about V / num_slabs, fewer
    if [T, slab] would exceed max_workspace_bytes, and a multiple of every kernel's vocab tile.

    With hidden_size and num_sms (a GPU), the slab is also a whole number of dW waves: the dW
    kernel launches (slab / block_m) × ⌈H / block_n⌉ programs per slab, and a slab of V/32 on
    an H100 (38 × 6 = 228 programs on 132 SMs) runs 1.73 waves, the last one 73% idle. Rounding
    the slab to the nearest whole number of waves (here 2 waves = 44 × 6 programs, 27 slabs)
    keeps every SM busy until the slab's last wave; only the vocabulary's last slab is ragged.
    """
    align = _slab_align(config)
    per_slab = _ceil_div(_ceil_div(vocab_size, config.num_slabs), align) * align
    budget = config.max_workspace_bytes // max(1, num_tokens * element_size) // align * align
    cols = max(align, min(per_slab, budget))
    if hidden_size and num_sms:
        tile = config.grad_weight
        h_tiles = _ceil_div(hidden_size, tile.block_n)
        wave = num_sms * config.grad_weight_programs_per_sm  # programs per wave
        # the smallest slab that holds a whole number of waves in whole aligned columns
        step = math.lcm(align, wave // math.gcd(wave, h_tiles) * tile.block_m)
        waves_cols = round(per_slab / step) * step
        if step <= min(budget, _ceil_div(vocab_size, align) * align):
            cols = max(step, min(waves_cols, budget // step * step))
    return cols


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    chunk_size: int,
    backend: str = "torch",
    config: LogprobsKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Returns (logprobs [T] fp32, entropy [T] fp32 or None, lse [T] fp32, z̄ [T] fp32 or None).

    lse and z̄ (on the temperature-scaled logits) are all the backward needs besides the inputs.
    chunk_size is the torch path's; config the Triton path's (default: kernel_config(device, dtype)).
    """
    if backend == "triton":
        return _triton_logprobs_forward(
            hidden, weight, labels, temperature, ignore_index, compute_entropy,
            config or kernel_config(hidden.device, hidden.dtype),
        )
    return _torch_logprobs_forward(
        hidden, weight, labels, temperature, ignore_index, compute_entropy, chunk_size
    )


def logprobs_backward(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
    backend: str = "torch",
    config: LogprobsKernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_hidden [T, H] in hidden.dtype or None, grad_weight [V, H] in weight.dtype or None)."""
    if backend == "triton":
        return _triton_logprobs_backward(
            grad_logprobs, grad_entropy, hidden, weight, labels, lse, mean_logit, temperature,
            ignore_index, needs_grad_hidden, needs_grad_weight,
            config or kernel_config(hidden.device, hidden.dtype),
        )
    return _torch_logprobs_backward(
        grad_logprobs, grad_entropy, hidden, weight, labels, lse, mean_logit,
        temperature, ignore_index, chunk_size, needs_grad_hidden, needs_grad_weight,
    )


def _launch_options(tile: TileConfig, **constexprs) -> dict:
    return dict(constexprs, num_warps=tile.num_warps, num_stages=tile.num_stages)


def forward_meta(config: LogprobsKernelConfig, hidden_size: int, compute_entropy: bool, aligned: bool, precision: str) -> dict:
    """Constexprs + launch options of _logprobs_forward_kernel (shared with the AOT tests)."""
    tile = config.forward
    return _launch_options(
        tile, BLOCK_T=tile.block_m, BLOCK_V=tile.block_n, BLOCK_K=tile.block_k, GROUP=config.group,
        COMPUTE_ENTROPY=compute_entropy, EVEN_K=hidden_size % tile.block_k == 0, ALIGNED=aligned,
        DOT_PRECISION=precision,
    )


def combine_meta(config: LogprobsKernelConfig, compute_entropy: bool) -> dict:
    return dict(BLOCK=config.combine_block, COMPUTE_ENTROPY=compute_entropy, num_warps=4, num_stages=1)


def grad_logits_meta(
    config: LogprobsKernelConfig, hidden_size: int, has_grad_logprobs: bool, has_grad_entropy: bool,
    aligned: bool, precision: str,
) -> dict:
    tile = config.grad_logits
    return _launch_options(
        tile, BLOCK_T=tile.block_m, BLOCK_V=tile.block_n, BLOCK_K=tile.block_k, GROUP=config.group,
        HAS_GRAD_LOGPROBS=has_grad_logprobs, HAS_GRAD_ENTROPY=has_grad_entropy,
        EVEN_K=hidden_size % tile.block_k == 0, ALIGNED=aligned, DOT_PRECISION=precision,
    )


def grad_hidden_meta(
    config: LogprobsKernelConfig, hidden_size: int, accumulate: bool, final: bool, aligned: bool, precision: str
) -> dict:
    tile = config.grad_hidden
    return _launch_options(
        tile, BLOCK_T=tile.block_m, BLOCK_H=tile.block_n, BLOCK_V=tile.block_k, GROUP=config.group,
        ACCUMULATE=accumulate, FINAL=final, EVEN_H=hidden_size % tile.block_n == 0, ALIGNED=aligned,
        DOT_PRECISION=precision,
    )


def grad_weight_meta(config: LogprobsKernelConfig, hidden_size: int, aligned: bool, precision: str) -> dict:
    tile = config.grad_weight
    return _launch_options(
        tile, BLOCK_V=tile.block_m, BLOCK_H=tile.block_n, BLOCK_T=tile.block_k, GROUP=config.group,
        EVEN_H=hidden_size % tile.block_n == 0, ALIGNED=aligned, DOT_PRECISION=precision,
    )


def _triton_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    config: LogprobsKernelConfig,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    logprobs = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    lse = torch.zeros_like(logprobs)
    entropy = torch.zeros_like(logprobs) if compute_entropy else None
    mean_logit = torch.zeros_like(logprobs) if compute_entropy else None
    if num_tokens == 0:
        return logprobs, entropy, lse, mean_logit
    labels = labels.contiguous()
    num_splits = triton.cdiv(vocab_size, config.split_cols)
    # [stat, split, token]: tokens contiguous, so both kernels store and load coalesced rows.
    partials = torch.empty((_NUM_STATS, num_splits, num_tokens), dtype=torch.float32, device=device)
    grid = (triton.cdiv(num_tokens, config.forward.block_m) * num_splits,)
    _logprobs_forward_kernel[grid](
        hidden, weight, labels, partials,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        partials.stride(0), partials.stride(1),
        num_tokens, vocab_size, hidden_size, config.split_cols,
        1.0 / temperature,
        **forward_meta(config, hidden_size, compute_entropy, _aligned(hidden, weight), _dot_precision(hidden.dtype)),
    )
    # The COMPUTE_ENTROPY=False variant never touches its entropy/z̄ pointers: any fp32 tensor.
    _logprobs_combine_kernel[(triton.cdiv(num_tokens, config.combine_block),)](
        partials, labels, logprobs, entropy if compute_entropy else lse, lse,
        mean_logit if compute_entropy else lse,
        partials.stride(0), partials.stride(1),
        num_tokens, num_splits, vocab_size,
        ignore_index,
        **combine_meta(config, compute_entropy),
    )
    return logprobs, entropy, lse, mean_logit


def _triton_logprobs_backward(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
    config: LogprobsKernelConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per vocab slab: dx kernel, then the two GEMMs on its dx workspace: dW[slab] = dxᵀ·h (written
    once) and dh += dx·W[slab] (fp32 running sum), by the Triton kernels or by cuBLAS
    (config.backward_gemm)."""
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    cublas = config.backward_gemm == "cublas"
    if config.backward_gemm not in ("triton", "cublas"):
        raise ValueError(f"backward_gemm must be 'triton' or 'cublas', got {config.backward_gemm!r}")
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if needs_grad_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_grad_weight else None
    if num_tokens == 0:
        return tuple(None if g is None else g.zero_() for g in (grad_hidden, grad_weight))
    # Stride-0 upstream grads (from .sum()) and strided labels become plain vectors: O(T) copies.
    g_lp = None if grad_logprobs is None else grad_logprobs.float().contiguous()
    g_h = None if grad_entropy is None else grad_entropy.float().contiguous()
    labels = labels.contiguous()
    align = _slab_align(config)
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    slab_cols = backward_slab_cols(num_tokens, vocab_size, hidden.element_size(), config, hidden_size, num_sms)
    num_slabs = triton.cdiv(vocab_size, slab_cols)
    # dx is rounded once to the input dtype, so the GEMMs run on bf16/fp16 tensor cores.
    workspace = torch.empty((num_tokens, slab_cols), dtype=hidden.dtype, device=device)
    # dh's running sum over slabs is fp32: grad_hidden itself for fp32 inputs, else a buffer
    # (needed only with more than one slab).
    accumulator = grad_hidden
    if needs_grad_hidden and hidden.dtype != torch.float32 and (num_slabs > 1 or cublas):
        accumulator = torch.empty((num_tokens, hidden_size), dtype=torch.float32, device=device)
    precision = _dot_precision(hidden.dtype)
    dx_meta = grad_logits_meta(
        config, hidden_size, g_lp is not None, g_h is not None, _aligned(hidden, weight, workspace), precision
    )
    unused = lse  # any fp32 tensor, for pointers a kernel variant never reads
    for slab in range(num_slabs):
        slab_start = slab * slab_cols
        cols = min(slab_cols, vocab_size - slab_start)
        width = _ceil_div(cols, align) * align  # columns past V are written as zeros by the dx kernel
        grid = (triton.cdiv(num_tokens, config.grad_logits.block_m) * (width // config.grad_logits.block_n),)
        _logprobs_backward_dx_kernel[grid](
            hidden, weight, labels, lse,
            unused if g_h is None else mean_logit, unused if g_lp is None else g_lp,
            unused if g_h is None else g_h, workspace,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), workspace.stride(0),
            num_tokens, hidden_size, slab_start, cols, width,
            1.0 / temperature, ignore_index,
            **dx_meta,
        )
        if cublas:
            accumulator = _cublas_slab_gemms(
                workspace[:, :cols], hidden, weight[slab_start:slab_start + cols],
                grad_weight[slab_start:slab_start + cols] if needs_grad_weight else None,
                accumulator if needs_grad_hidden else None, first=slab == 0,
            )
            continue
        if needs_grad_weight:
            grid = ((width // config.grad_weight.block_m) * triton.cdiv(hidden_size, config.grad_weight.block_n),)
            _logprobs_backward_dw_kernel[grid](
                workspace, hidden, grad_weight,
                workspace.stride(0), hidden.stride(0), hidden.stride(1), grad_weight.stride(0),
                num_tokens, hidden_size, slab_start, cols, width,
                **grad_weight_meta(config, hidden_size, _aligned(workspace, hidden, grad_weight), precision),
            )
        if needs_grad_hidden:
            tile = config.grad_hidden
            grid = (triton.cdiv(num_tokens, tile.block_m) * triton.cdiv(hidden_size, tile.block_n),)
            _logprobs_backward_dh_kernel[grid](
                workspace, weight, accumulator, grad_hidden,
                workspace.stride(0), weight.stride(0), weight.stride(1), accumulator.stride(0), grad_hidden.stride(0),
                num_tokens, hidden_size, slab_start, cols, width,
                **grad_hidden_meta(
                    config, hidden_size, slab > 0, slab == num_slabs - 1,
                    _aligned(workspace, weight, accumulator, grad_hidden), precision,
                ),
            )
    if cublas and needs_grad_hidden and accumulator is not grad_hidden:
        grad_hidden.copy_(accumulator)
    return grad_hidden, grad_weight


def _cublas_slab_gemms(
    dx: torch.Tensor,
    hidden: torch.Tensor,
    weight_slab: torch.Tensor,
    grad_weight_slab: torch.Tensor | None,
    accumulator: torch.Tensor | None,
    first: bool,
) -> torch.Tensor | None:
    """One slab's backward GEMMs through cuBLAS, fp32 accumulation:

        grad_weight_slab = dxᵀ·h        (fp32 result, rounded once to weight's dtype)
        accumulator     (+)= dx·W[slab] (fp32 running sum over slabs, in slab order)

    cuBLAS gives the same bits for the same shapes on the same GPU, and the slab order is fixed,
    so this path is as deterministic as the Triton one. Under the interpreter (CPU tensors) the
    16-bit operands are upcast, which is exact. Returns the accumulator (a new tensor when
    16-bit addmm cannot write in place).
    """
    if not dx.is_cuda:
        dx, hidden, weight_slab = dx.float(), hidden.float(), weight_slab.float()
    if grad_weight_slab is not None:
        grad_weight_slab.copy_(_mm_fp32(dx.T, hidden))
    if accumulator is None:
        return None
    if first:
        return accumulator.copy_(_mm_fp32(dx, weight_slab))
    if dx.dtype == torch.float32:
        return accumulator.addmm_(dx, weight_slab)
    # cuBLAS adds the fp32 running sum in its epilogue: no separate read-add-write pass
    return torch.addmm(accumulator, dx, weight_slab, out_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Memory-lean torch fallback (chunked over tokens; any device)
# ---------------------------------------------------------------------------------------------


def _gemm_operand(x: torch.Tensor) -> torch.Tensor:
    # CPU has no bf16 x bf16 -> fp32 GEMM, and a bf16 output would round the logits; upcasting is
    # exact (every bf16/fp16 value is an fp32 value). CUDA keeps the narrow operands and asks
    # cuBLAS for an fp32 output instead (see _mm_fp32).
    return x if x.is_cuda else x.float()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        # On CUDA this follows torch.backends.cuda.matmul.allow_tf32 (the caller's precision choice).
        return a @ b
    # fp16/bf16 operands on CUDA: cuBLAS accumulates in fp32; out_dtype keeps the result in fp32.
    return torch.mm(a, b, out_dtype=torch.float32)


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """z = (h·Wᵀ) / τ for one chunk, fp32 [chunk, V]."""
    return _mm_fp32(h, w.T).mul_(inv_temperature)


def _labels_or_zero(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    # Ignored positions gather column 0 (any valid column); their outputs are zeroed afterwards.
    # So do labels outside [0, V), whose logprobs become NaN: gather never reads out of bounds.
    return torch.where((labels == ignore_index) | (labels < 0) | (labels >= vocab_size), 0, labels).long()


def _torch_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    num_tokens = hidden.shape[0]
    device = hidden.device
    inv_temperature = 1.0 / temperature
    weight_op = _gemm_operand(weight)  # upcast once per call on CPU, not once per chunk
    safe_labels = _labels_or_zero(labels, ignore_index, weight.shape[0])

    logprobs = torch.empty(num_tokens, dtype=torch.float32, device=device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logprobs) if compute_entropy else None
    mean_logit = torch.empty_like(logprobs) if compute_entropy else None

    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        z = _scaled_logits(_gemm_operand(hidden[rows]), weight_op, inv_temperature)
        # Real row max (identity −inf, as amax has): the verl #2656 bug came from a 0 identity,
        # which breaks rows whose logits are all very negative.
        z_max = z.amax(dim=1, keepdim=True)
        shifted = z.sub_(z_max)  # z − m ≤ 0, in place: the chunk's only [chunk, V] logits buffer
        exp_shifted = shifted.exp()
        sum_exp = exp_shifted.sum(dim=1)
        log_sum_exp = sum_exp.log()
        target_shifted = shifted.gather(1, safe_labels[rows, None]).squeeze(1)
        logprobs[rows] = target_shifted - log_sum_exp
        lse[rows] = z_max.squeeze(1) + log_sum_exp
        if compute_entropy:
            # Work relative to m so that H = log s − u/s never subtracts two large numbers.
            mean_shifted = (exp_shifted * shifted).sum(dim=1) / sum_exp  # z̄ − m
            entropy[rows] = log_sum_exp - mean_shifted
            mean_logit[rows] = z_max.squeeze(1) + mean_shifted
        del z, shifted, exp_shifted

    ignored = labels == ignore_index
    # out-of-range labels → NaN, as the Triton combine kernel does (no host sync to find them)
    logprobs.masked_fill_(~ignored & ((labels < 0) | (labels >= weight.shape[0])), float("nan"))
    logprobs.masked_fill_(ignored, 0.0)
    if compute_entropy:
        entropy.masked_fill_(ignored, 0.0)
    return logprobs, entropy, lse, mean_logit


def _torch_logprobs_backward(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    num_tokens = hidden.shape[0]
    inv_temperature = 1.0 / temperature
    ignored = labels == ignore_index
    # where(), not multiply: an upstream NaN/inf at an ignored position must not leak in.
    g_lp = None if grad_logprobs is None else torch.where(ignored, 0.0, grad_logprobs.float())
    g_h = None if grad_entropy is None else torch.where(ignored, 0.0, grad_entropy.float())
    safe_labels = _labels_or_zero(labels, ignore_index, weight.shape[0])
    weight_op = _gemm_operand(weight)

    grad_hidden = torch.empty_like(hidden) if needs_grad_hidden else None
    grad_weight_acc = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if needs_grad_weight else None
    )
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        hidden_op = _gemm_operand(hidden[rows])
        dz = _chunk_grad_logits(
            _scaled_logits(hidden_op, weight_op, inv_temperature),
            lse[rows],
            None if mean_logit is None else mean_logit[rows],
            None if g_lp is None else g_lp[rows],
            None if g_h is None else g_h[rows],
            safe_labels[rows],
        ).mul_(inv_temperature)  # dx = dz / τ
        # On CUDA the GEMMs take narrow operands (dx rounded once, as verl's and Liger's fused
        # backwards do) with fp32 accumulation; on CPU everything is fp32.
        dx = dz.to(weight_op.dtype)
        if needs_grad_hidden:
            grad_hidden[rows] = _mm_fp32(dx, weight_op).to(hidden.dtype)
        if needs_grad_weight:
            grad_weight_acc += _mm_fp32(dx.T, hidden_op)
        del dz, dx
    grad_weight = None if grad_weight_acc is None else grad_weight_acc.to(weight.dtype)
    return grad_hidden, grad_weight


def _chunk_grad_logits(
    z: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    g_lp: torch.Tensor | None,
    g_h: torch.Tensor | None,
    labels: torch.Tensor,
) -> torch.Tensor:
    """dz = g_lp (onehot − p) − g_H p (z − z̄) for one chunk, overwriting z; fp32 [chunk, V]."""
    probs = (z - lse[:, None]).exp_()
    if g_h is not None:
        # coefficient of p: −g_lp − g_H (z − z̄)
        coeff = z.sub_(mean_logit[:, None]).mul_(-g_h[:, None])
        if g_lp is not None:
            coeff.sub_(g_lp[:, None])
        dz = probs.mul_(coeff)
    else:
        dz = probs.mul_(-g_lp[:, None])
    if g_lp is not None:
        dz.scatter_add_(1, labels[:, None], g_lp[:, None])
    return dz


# ---------------------------------------------------------------------------------------------
# Plain reference (tests only): materialised float64 logits
# ---------------------------------------------------------------------------------------------


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [T], entropy [T]) in float64 from the full [T, V] logits; differentiable by autograd.

    O(T·V) memory: for tests on small shapes only.
    """
    logits = (hidden.double() @ weight.double().T) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    logprobs = log_probs.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)


# ---------------------------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------------------------


class FusedLogprobsFunction(torch.autograd.Function):
    """Differentiable w.r.t. hidden and weight through both logprobs and entropy."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        ignore_index: int,
        compute_entropy: bool,
        chunk_size: int,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs, entropy, lse, mean_logit = logprobs_forward(
            hidden, weight, labels, temperature, ignore_index, compute_entropy, chunk_size, backend
        )
        # Per token only lse and z̄ (8 bytes) are kept; the backward recomputes the logits.
        ctx.save_for_backward(hidden, weight, labels, lse, mean_logit)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.backend = backend
        # An unused output then arrives as None and its term is skipped, not multiplied by zeros.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        hidden, weight, labels, lse, mean_logit = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        grad_hidden, grad_weight = logprobs_backward(
            grad_logprobs, grad_entropy, hidden, weight, labels, lse, mean_logit,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, needs_hidden, needs_weight, ctx.backend,
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (turns a sum over ranks into a mean)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _unshard_weight(weight: torch.Tensor) -> torch.Tensor:
    """A DTensor weight (FSDP2's sharded lm_head, used outside its module's forward) → the full
    local tensor, differentiably.

    Inside the owning module's forward FSDP2 has already all-gathered the weight and it is a plain
    tensor; nothing happens then. Otherwise each rank all-gathers it here, and in the backward its
    local gradient is reduce-scattered back to the shards as a mean over the mesh, which is what
    FSDP2's own reduce-scatter produces for every other parameter. (Sum + scale rather than a
    Partial("avg") placement: gloo has no AVG reduction.)
    """
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch built without distributed
        return weight
    if not isinstance(weight, DTensor):
        return weight
    mesh = weight.device_mesh
    full = weight.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGrad.apply(full, 1.0 / mesh.size()) if weight.requires_grad else full


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(labels[t]) and entropy under softmax(hidden[t]·weightᵀ / temperature).

    Args:
        hidden: [T, H] fp32/bf16/fp16 final hidden states (rows already aligned with labels).
        weight: [V, H] lm_head weight, same dtype as hidden. May be an FSDP2 (DTensor) parameter.
        labels: [T] integer token ids in [0, V), or ignore_index.
        temperature: τ > 0; logits are divided by it in fp32 (use the sampling temperature).
        return_entropy: also return the entropy, differentiable like the logprobs. Without it
            the kernels skip the entropy accumulator.
        ignore_index: label marking positions that give 0 and receive no gradient.
        chunk_size: tokens per chunk of the torch path; default from CHUNK_BYTES. Results do not
            depend on it beyond fp32 rounding. The Triton path ignores it.
        backend: "auto" (Triton for CUDA tensors, chunked torch otherwise), "triton" (CUDA, or CPU
            tensors under TRITON_INTERPRET=1 for tests) or "torch".
        check_labels: raise ValueError for a label outside [0, V). None (default): only where it
            costs no device sync, i.e. CPU tensors, or everywhere with DSR_FAST_CHECK_LABELS=1.
            Unchecked, such a label's logprob is NaN. The call never syncs with the GPU otherwise,
            so it can be captured in a CUDA graph and overlaps with the host.

    Returns:
        (logprobs [T] fp32, entropy [T] fp32 or None). Gradients flow to hidden and weight
        (returned in their dtypes). With grad disabled, or when neither input requires grad,
        nothing is saved for backward. Deterministic: the same inputs give the same bits.
    """
    if _is_dtensor(hidden) or _is_dtensor(labels):
        raise ValueError("hidden and labels must be plain tensors (only weight may be a DTensor)")
    weight = _unshard_weight(weight)
    if check_labels is None:
        check_labels = labels.device.type == "cpu" or os.environ.get("DSR_FAST_CHECK_LABELS", "0") == "1"
    check_logprobs_inputs(hidden, weight, labels, temperature, ignore_index, check_label_range=check_labels)
    backend = resolve_backend(backend, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    temperature = float(temperature)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        logprobs, entropy, _, _ = logprobs_forward(
            hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size, backend
        )
        return logprobs, entropy
    return FusedLogprobsFunction.apply(
        hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size, backend
    )


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"
