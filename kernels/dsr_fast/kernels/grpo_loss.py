"""GRPO / PPO-clip policy loss over a packed batch, with KL and entropy terms.

Tensors are per token over B packed sequences (``cu_seqlens`` = [0, e_1, ..., e_B = T]); the
mask m_t marks the response tokens that count; advantages A_t are already broadcast to tokens.

Per token (ε_l = clip_low, ε_h = clip_high, c = dual_clip, β = kl_coef, c_H = entropy_coef):

    ρ_t   = exp(logp_t − old_t)                                   ratio_level="token"
    ρ_t   = exp(r_i),  r_i = Σ_{t∈i} m_t (logp_t − old_t) / n_i     ratio_level="sequence" (GSPO)
    pg_t  = max(−A ρ, −A clip(ρ, 1−ε_l, 1+ε_h));   if c and A < 0: pg_t = min(pg_t, −A c)
    kl_t  = k1: logp − ref | k2: ½(logp − ref)² |
            k3: e^d − d − 1 with d = clamp(ref − logp, ±20), result clamped to [−10, 10]
    ℓ_t   = pg_t + β kl_t − c_H H_t

and the loss is L = Σ_t w_t ℓ_t with the aggregation weights (n_i = valid tokens of sequence i):

    token-mean                  w_t = m_t / N          N = num_global_tokens or Σ m
    seq-mean-token-mean         w_t = m_t / (S n_i)    S = num_global_seqs or #{i: n_i ≥ 1}
    seq-mean-token-sum          w_t = m_t / S
    seq-mean-token-sum-norm     w_t = m_t / (S L)      L = norm_len or max_i n_i   (Dr. GRPO)

Gradients reach logprobs and entropy only:

    ∂L/∂logp_t = w_t [−A_t ρ_t 1{unclipped} + β ∂kl_t/∂logp_t],   ∂L/∂H_t = −c_H w_t
    unclipped: not (A > 0 and ρ > 1+ε_h), not (A < 0 and ρ < 1−ε_l), not dual-clipped (A < 0, ρ > c)
    ∂kl/∂logp: k1: 1 | k2: logp − ref | k3: (1 − e^d) inside both clamps, else 0

GSPO (ratio_level="sequence") uses the GSPO-token form s_t = sg(s_i) · exp(logp_t − sg(logp_t)):
the value of every token's ratio is the sequence ratio s_i = exp(r_i), and the gradient of token
t's term flows through its own logp only, ∂s_t/∂logp_t = s_i. With seq-mean-token-mean and a
per-sequence advantage this is exactly GSPO's sequence-level gradient. Unlike verl, the sequence
log-ratio is not clamped (DeepScaleR-era verl clamps no log-ratio either).

The forward computes the per-token derivatives above (elementwise, O(T)); the backward scales them
by the upstream gradient. Nothing syncs with the host and no length is a compile-time constant, so
T can be 10M tokens and the loss can be captured in a CUDA graph.

Two backends compute the same thing: Triton (default on CUDA) and vectorised torch (elsewhere);
``backend="triton"`` also runs the kernels on CPU tensors under TRITON_INTERPRET=1 (tests). The
Triton path, per call:

    1. _segment_stats_kernel   grid (B,)          n_i (and r_i for GSPO), only when a mode needs them
    2. _grpo_loss_fwd_kernel   grid (⌈T/BLOCK⌉,)  per token: ℓ_t and ∂/∂logp_t, ∂/∂H_t of Σ_t v_t ℓ_t
       or _gspo_loss_fwd_kernel                   (v_t = m_t, or m_t / n_i for seq-mean-token-mean);
                                                  per block: sums of v ℓ, m and the metric terms
    3. _grpo_loss_finalize_kernel  grid (1,)      fixed-order sum of the block partials; the scalar
                                                  normaliser s (1/N, 1/S, 1/(S L)); loss = s Σ v ℓ
    4. _grpo_loss_bwd_kernel   grid (⌈T/BLOCK⌉,)  ∂L/∂logp_t = s · upstream · (stored derivative)

So w_t = s · v_t: the per-token part of the weight is applied in the forward, the global scalar s in
the backward, which has to read every derivative once anyway to multiply by the upstream
gradient. That way no pass over the mask is needed before the loss pass to find the local N.

Determinism: no float atomics anywhere. Each block writes its own partial row and one program sums
the rows in a fixed order; n_i is an integer count; r_i is summed by one program per sequence in
a fixed order. Results are bitwise reproducible for a given T and block size.

File order (as in Liger's ops): constants → Triton kernels → host functions → torch fallback →
plain reference for tests → autograd Function → public function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton ships for Linux only; the torch path serves everywhere else
    triton = tl = None
    HAS_TRITON = False


def _jit(fn):
    """triton.jit, or the plain function when Triton is missing (never launched then)."""
    return triton.jit(fn) if HAS_TRITON else fn


def _constexpr(value):
    return tl.constexpr(value) if HAS_TRITON else value


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "triton", "torch")

# verl's low_var_kl clamps: the log-ratio before exp (else e^{ref−logp} can overflow and the
# backward forms inf·0 = NaN) and the k3 value (DeepScaleR's only clamp). Both leave k3's value
# unchanged: |d| > 20 already gives k3 > 10.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0

Normaliser = int | float | torch.Tensor | None

# Metric names in the order of the Triton partial sums (columns 2..9 of a block's row).
METRIC_NAMES = (
    "clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "ratio_mean", "pg_loss",
    "entropy_mean", "kl_mean",
)

# Tokens per program of the loss and backward kernels: 8 per thread at 4 warps, so each fp32
# stream is two 128-bit loads per thread and ~50 KB per SM are in flight at 4 blocks per SM
# (≈100 registers per thread, no spills: see the AOT test). Enough to hide HBM latency.
BLOCK_TOKENS = 1024
NUM_WARPS = 4
# Tokens per loop step of the per-sequence kernel (one program per sequence).
BLOCK_SEGMENT = 1024
# Block rows per loop step of the single-program finalize kernel: [128, 16] fp64 accumulators
# are 32 registers per thread at 4 warps.
BLOCK_FINALIZE = 128

# Columns of a block's row of partial sums ([num_blocks, 16], padded to a power of two).
_P_LOSS = _constexpr(0)  # Σ v_t ℓ_t
_P_COUNT = _constexpr(1)  # Σ m_t
_P_FIRST_METRIC = _constexpr(2)  # Σ m_t · (metric term), in METRIC_NAMES order
_NUM_PARTIALS = _constexpr(10)
_PARTIALS_WIDTH = _constexpr(16)

# Integer codes the kernels specialise on.
_AGG_CODES = {mode: i for i, mode in enumerate(AGG_MODES)}
_KL_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}
_AGG_TOKEN_MEAN = _constexpr(0)
_AGG_SEQ_MEAN_TOKEN_SUM_NORM = _constexpr(3)
# Where a normaliser comes from: the local batch, a Python number, or a device scalar tensor.
_SOURCE_LOCAL, _SOURCE_VALUE, _SOURCE_POINTER = 0, 1, 2
_K3_LOG_RATIO_CLAMP = _constexpr(K3_LOG_RATIO_CLAMP)
_K3_VALUE_CLAMP = _constexpr(K3_VALUE_CLAMP)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@_jit
def _sequence_index(cu_seqlens_ptr, offsets, num_seqs, search_steps):
    """Sequence i holding token t (cu[i] ≤ t < cu[i+1]), by binary search on the ends cu[1..B].

    i is the first j in [0, B) with cu[j+1] > t; empty sequences (cu[j] = cu[j+1]) are never
    returned. The interval [lo, hi) starts B long and at least halves per step, so
    search_steps = bit_length(B) steps leave it empty. cu_seqlens is a few KB: the gathers hit L1/L2.
    """
    lo = tl.zeros_like(offsets)
    hi = lo + num_seqs
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        seq_end = tl.load(cu_seqlens_ptr + 1 + mid, mask=active, other=0).to(tl.int64)
        lo = tl.where(active & (seq_end <= offsets), mid + 1, lo)
        hi = tl.where(active & (seq_end > offsets), mid, hi)
    return lo


@_jit
def _segment_stats_kernel(
    logp_ptr, old_ptr, mask_ptr, cu_seqlens_ptr, seq_counts_ptr, seq_log_ratio_ptr,
    HAS_MASK: tl.constexpr, LOG_RATIO: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per sequence i: n_i = Σ_{t∈i} m_t and, for GSPO, r_i = Σ_{t∈i} m_t (logp − old) / n_i.

    The program walks its sequence in BLOCK-token steps and reduces its lanes once at the end, a
    fixed order: deterministic, unlike index_add_ or atomics on floats. n_i is exact (int32). An
    empty or fully masked sequence gets n_i = 0 and r_i = 0. Cost is one read of the mask (and of
    logp, old for GSPO); a very long sequence is walked serially by its one program.
    """
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    log_ratio_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(start, end, BLOCK):
        offsets = block_start + tl.arange(0, BLOCK)
        valid = offsets < end
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + offsets, mask=valid, other=0) != 0)
        count += valid.to(tl.int32)
        if LOG_RATIO:
            logp = tl.load(logp_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            log_ratio_sum += logp - old  # 0 on invalid lanes (both loaded as 0)
    num_valid = tl.sum(count, axis=0)
    tl.store(seq_counts_ptr + seq, num_valid)
    if LOG_RATIO:
        tl.store(seq_log_ratio_ptr + seq, tl.sum(log_ratio_sum, axis=0) / tl.maximum(num_valid, 1).to(tl.float32))


@_jit
def _grpo_loss_block(
    offsets, in_range, valid, logp, token_log_ratio, log_ratio, weight,
    adv_ptr, ref_ptr, ent_ptr, grad_logp_ptr, grad_ent_ptr, partials_ptr,
    clip_lower, clip_upper, dual_clip, kl_coef, entropy_coef,
    KL_TYPE: tl.constexpr, HAS_ENTROPY: tl.constexpr, DUAL_CLIP: tl.constexpr, COMPUTE_GRADS: tl.constexpr,
):
    """Everything after the log-ratio, shared by the token-ratio and the GSPO kernel.

    Per token (ρ = e^{log_ratio}, v = weight on valid tokens, 0 elsewhere):
        pg = max(−Aρ, −A clip(ρ, clip_lower, clip_upper)), then min(pg, −A c) for A < 0 (dual clip)
        ℓ = pg + β kl − c_H H;   grad_logp = v (−Aρ 1{unclipped} + β ∂kl/∂logp);   grad_ent = −c_H v
    and the block's row of partial sums: Σ v ℓ, Σ m, then Σ m × (clipped low, clipped high, dual
    clipped, old − logp, ρ, pg, H, kl). Invalid lanes were loaded as 0, so every term there is
    finite, but ρ = 1 and k-terms need not vanish: each sum masks explicitly.
    """
    adv = tl.load(adv_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    ratio = tl.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg = tl.maximum(pg_unclipped, -adv * tl.minimum(tl.maximum(ratio, clip_lower), clip_upper))
    # Clipped "in a way that changed the loss": the clipped branch is the strict max.
    clipped_low = (adv < 0) & (ratio < clip_lower)
    clipped_high = (adv > 0) & (ratio > clip_upper)
    unclipped = ~(clipped_low | clipped_high)
    dual_clipped = tl.zeros_like(unclipped)
    if DUAL_CLIP:
        dual_bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (pg > dual_bound)
        pg = tl.where(dual_clipped, dual_bound, pg)
        unclipped = unclipped & ~dual_clipped
    d_logp = tl.where(unclipped, pg_unclipped, 0.0)
    loss = pg

    kl = tl.zeros_like(pg)
    if KL_TYPE != 0:
        ref = tl.load(ref_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if KL_TYPE == 1:
            kl = logp - ref
            d_kl = tl.full(pg.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:
            d_kl = logp - ref
            kl = 0.5 * d_kl * d_kl
        else:
            # verl low_var_kl: d = clamp(ref − logp, ±20); k3 = e^d − d − 1 clamped to [−10, 10];
            # the gradient passes only inside both clamps (bounds inclusive, as torch.clamp's).
            d_raw = ref - logp
            d = tl.minimum(tl.maximum(d_raw, -_K3_LOG_RATIO_CLAMP), _K3_LOG_RATIO_CLAMP)
            exp_d = tl.exp(d)
            k3 = exp_d - d - 1.0
            inside = (tl.abs(d_raw) <= _K3_LOG_RATIO_CLAMP) & (tl.abs(k3) <= _K3_VALUE_CLAMP)
            kl = tl.minimum(tl.maximum(k3, -_K3_VALUE_CLAMP), _K3_VALUE_CLAMP)
            d_kl = tl.where(inside, 1.0 - exp_d, 0.0)
        loss += kl_coef * kl
        d_logp += kl_coef * d_kl

    entropy = tl.zeros_like(pg)
    if HAS_ENTROPY:
        entropy = tl.load(ent_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        loss -= entropy_coef * entropy

    weight = tl.where(valid, weight, 0.0)
    if COMPUTE_GRADS:
        # Stores cover masked-out tokens too: their derivative is 0, never garbage.
        tl.store(grad_logp_ptr + offsets, weight * d_logp, mask=in_range)
        if HAS_ENTROPY:
            tl.store(grad_ent_ptr + offsets, -entropy_coef * weight, mask=in_range)

    row = partials_ptr + tl.program_id(0).to(tl.int64) * _PARTIALS_WIDTH
    valid_f = valid.to(tl.float32)
    tl.store(row + _P_LOSS, tl.sum(tl.where(valid, weight * loss, 0.0), axis=0))
    tl.store(row + _P_COUNT, tl.sum(valid_f, axis=0))
    tl.store(row + _P_FIRST_METRIC + 0, tl.sum((valid & clipped_low).to(tl.float32), axis=0))
    tl.store(row + _P_FIRST_METRIC + 1, tl.sum((valid & clipped_high).to(tl.float32), axis=0))
    tl.store(row + _P_FIRST_METRIC + 2, tl.sum((valid & dual_clipped).to(tl.float32), axis=0))
    tl.store(row + _P_FIRST_METRIC + 3, tl.sum(tl.where(valid, -token_log_ratio, 0.0), axis=0))
    tl.store(row + _P_FIRST_METRIC + 4, tl.sum(tl.where(valid, ratio, 0.0), axis=0))
    tl.store(row + _P_FIRST_METRIC + 5, tl.sum(tl.where(valid, pg, 0.0), axis=0))
    tl.store(row + _P_FIRST_METRIC + 6, tl.sum(tl.where(valid, entropy, 0.0), axis=0))
    tl.store(row + _P_FIRST_METRIC + 7, tl.sum(tl.where(valid, kl, 0.0), axis=0))


@_jit
def _token_weight(seq_counts_ptr, seq, valid, SEQ_WEIGHTS: tl.constexpr):
    """v_t / m_t: 1/n_i for seq-mean-token-mean, else 1 (the rest of w_t is the global scalar s)."""
    if SEQ_WEIGHTS:
        num_valid = tl.load(seq_counts_ptr + seq, mask=valid, other=1)
        return 1.0 / tl.maximum(num_valid, 1).to(tl.float32)
    else:
        return tl.full(valid.shape, 1.0, tl.float32)


@_jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, mask_ptr, cu_seqlens_ptr, seq_counts_ptr,
    grad_logp_ptr, grad_ent_ptr, partials_ptr,
    num_tokens, num_seqs, search_steps,
    clip_lower, clip_upper, dual_clip, kl_coef, entropy_coef,
    KL_TYPE: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr, DUAL_CLIP: tl.constexpr,
    SEQ_WEIGHTS: tl.constexpr, COMPUTE_GRADS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Token-level ratio ρ_t = exp(logp_t − old_t); one program per BLOCK tokens (math: _grpo_loss_block).

    The sequence of a token is looked up (binary search on cu_seqlens) only for
    seq-mean-token-mean, whose per-token weight is 1/n_i; the other modes never touch cu_seqlens.
    Offsets are int64, so T is bounded by memory only.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    valid = in_range
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
    logp = tl.load(logp_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    seq = offsets
    if SEQ_WEIGHTS:
        seq = _sequence_index(cu_seqlens_ptr, offsets, num_seqs, search_steps)
    weight = _token_weight(seq_counts_ptr, seq, valid, SEQ_WEIGHTS)
    log_ratio = logp - old
    _grpo_loss_block(
        offsets, in_range, valid, logp, log_ratio, log_ratio, weight,
        adv_ptr, ref_ptr, ent_ptr, grad_logp_ptr, grad_ent_ptr, partials_ptr,
        clip_lower, clip_upper, dual_clip, kl_coef, entropy_coef,
        KL_TYPE, HAS_ENTROPY, DUAL_CLIP, COMPUTE_GRADS,
    )


@_jit
def _gspo_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, mask_ptr, cu_seqlens_ptr, seq_counts_ptr, seq_log_ratio_ptr,
    grad_logp_ptr, grad_ent_ptr, partials_ptr,
    num_tokens, num_seqs, search_steps,
    clip_lower, clip_upper, dual_clip, kl_coef, entropy_coef,
    KL_TYPE: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr, DUAL_CLIP: tl.constexpr,
    SEQ_WEIGHTS: tl.constexpr, COMPUTE_GRADS: tl.constexpr, BLOCK: tl.constexpr,
):
    """GSPO: every token of sequence i takes the sequence ratio s_i = exp(r_i) (r_i from
    _segment_stats_kernel), with ∂s_t/∂logp_t = s_i (GSPO-token form, see the module docstring).

    Since ∂ρ/∂logp = ρ in both forms, the per-token math is _grpo_loss_block's with log ρ = r_i;
    only the ratio's source differs, so it needs the sequence of every token. approx_kl stays
    the token-level mean of old − logp.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    valid = in_range
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
    logp = tl.load(logp_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    seq = _sequence_index(cu_seqlens_ptr, offsets, num_seqs, search_steps)
    seq_log_ratio = tl.load(seq_log_ratio_ptr + seq, mask=valid, other=0.0)
    weight = _token_weight(seq_counts_ptr, seq, valid, SEQ_WEIGHTS)
    _grpo_loss_block(
        offsets, in_range, valid, logp, logp - old, seq_log_ratio, weight,
        adv_ptr, ref_ptr, ent_ptr, grad_logp_ptr, grad_ent_ptr, partials_ptr,
        clip_lower, clip_upper, dual_clip, kl_coef, entropy_coef,
        KL_TYPE, HAS_ENTROPY, DUAL_CLIP, COMPUTE_GRADS,
    )


@_jit
def _pick(values, columns, k):
    """values[k] of a small vector, as a scalar."""
    return tl.sum(tl.where(columns == k, values, 0.0), axis=0)


@_jit
def _normaliser(local_value, value, ptr, SOURCE: tl.constexpr):
    """A normaliser ≥ 1 (0 → 1, so an empty batch gives loss 0, not NaN), in fp64.

    SOURCE: 0 local (local_value), 1 a Python number (value), 2 a device scalar (*ptr).
    """
    if SOURCE == 2:
        result = tl.load(ptr).to(tl.float64)
    elif SOURCE == 1:
        result = tl.cast(value, tl.float64)  # a Python float under the interpreter
    else:
        result = local_value.to(tl.float64)
    return tl.maximum(result, 1.0)


@_jit
def _grpo_loss_finalize_kernel(
    partials_ptr, seq_counts_ptr, global_tokens_ptr, global_seqs_ptr, loss_ptr, grad_scale_ptr, metrics_ptr,
    num_blocks, num_counted_seqs, global_tokens, global_seqs, norm_len,
    AGG: tl.constexpr, TOKENS_SOURCE: tl.constexpr, SEQS_SOURCE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: Σ over blocks of the partial rows (fp64, fixed order), then

        s = 1/N (token-mean) | 1/S (seq-mean-token-mean, -sum) | 1/(S L) (-sum-norm)
        loss = s · Σ v ℓ;   metric = Σ m·term / max(Σ m, 1)

    with N, S, L from the caller (a number or a device scalar, e.g. after an all-reduce) or from
    the local batch: N = Σ m, S = #{i: n_i ≥ 1}, L = max n_i (norm_len ≤ 0 means local). The
    counts n_i are read only when num_counted_seqs > 0. Writes loss, s (for the backward) and
    the 8 metrics.
    """
    columns = tl.arange(0, _PARTIALS_WIDTH)
    acc = tl.zeros([BLOCK, _PARTIALS_WIDTH], dtype=tl.float64)
    for block_start in range(0, num_blocks, BLOCK):
        rows = block_start + tl.arange(0, BLOCK)
        tile = tl.load(
            partials_ptr + rows.to(tl.int64)[:, None] * _PARTIALS_WIDTH + columns[None, :],
            mask=(rows[:, None] < num_blocks) & (columns[None, :] < _NUM_PARTIALS), other=0.0,
        )
        acc += tile.to(tl.float64)
    sums = tl.sum(acc, axis=0)

    nonempty = tl.zeros([BLOCK], dtype=tl.int32)
    longest = tl.zeros([BLOCK], dtype=tl.int32)
    for seq_start in range(0, num_counted_seqs, BLOCK):
        seqs = seq_start + tl.arange(0, BLOCK)
        counts = tl.load(seq_counts_ptr + seqs, mask=seqs < num_counted_seqs, other=0)
        nonempty += (counts > 0).to(tl.int32)
        longest = tl.maximum(longest, counts)

    num_valid = _pick(sums, columns, _P_COUNT)
    if AGG == _AGG_TOKEN_MEAN:
        denominator = _normaliser(num_valid, global_tokens, global_tokens_ptr, TOKENS_SOURCE)
    else:
        denominator = _normaliser(tl.sum(nonempty, axis=0), global_seqs, global_seqs_ptr, SEQS_SOURCE)
        if AGG == _AGG_SEQ_MEAN_TOKEN_SUM_NORM:
            norm_len = tl.cast(norm_len, tl.float64)
            length = tl.where(norm_len > 0, norm_len, tl.max(longest, axis=0).to(tl.float64))
            denominator *= tl.maximum(length, 1.0)
    scale = 1.0 / denominator
    tl.store(loss_ptr, (_pick(sums, columns, _P_LOSS) * scale).to(tl.float32))
    tl.store(grad_scale_ptr, scale.to(tl.float32))
    metrics = sums / tl.maximum(num_valid, 1.0)
    is_metric = (columns >= _P_FIRST_METRIC) & (columns < _NUM_PARTIALS)
    tl.store(metrics_ptr + columns - _P_FIRST_METRIC, metrics.to(tl.float32), mask=is_metric)


@_jit
def _grpo_loss_bwd_kernel(
    grad_logp_ptr, grad_ent_ptr, grad_scale_ptr, grad_loss_ptr, d_logp_ptr, d_ent_ptr,
    num_tokens,
    LOGP_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """∂L/∂x_t = s · upstream · (stored derivative), cast to the input's dtype; s and the upstream
    gradient are device scalars, read here rather than multiplied on the host (no sync, no launch)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    factor = tl.load(grad_scale_ptr) * tl.load(grad_loss_ptr).to(tl.float32)
    if LOGP_GRAD:
        grad = tl.load(grad_logp_ptr + offsets, mask=in_range, other=0.0)
        tl.store(d_logp_ptr + offsets, (grad * factor).to(d_logp_ptr.dtype.element_ty), mask=in_range)
    if ENTROPY_GRAD:
        grad = tl.load(grad_ent_ptr + offsets, mask=in_range, other=0.0)
        tl.store(d_ent_ptr + offsets, (grad * factor).to(d_ent_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOLossConfig:
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_type: str
    entropy_coef: float
    agg: str
    ratio_level: str
    norm_len: int | None


def check_grpo_options(config: GRPOLossConfig, has_ref: bool, has_entropy: bool) -> None:
    """ValueError for unknown modes, out-of-range hyperparameters and missing inputs."""
    if config.agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {config.agg!r}")
    if config.kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {config.kl_type!r}")
    if config.ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {config.ratio_level!r}")
    if not 0.0 <= config.clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {config.clip_low}")
    if not config.clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {config.clip_high}")
    if config.dual_clip is not None and not config.dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or > 1, got {config.dual_clip}")
    if config.kl_coef != 0.0 and not has_ref:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs, got None")
    if config.entropy_coef != 0.0 and not has_entropy:
        raise ValueError(f"entropy_coef={config.entropy_coef} needs entropy, got None")
    if config.norm_len is not None and not (isinstance(config.norm_len, int) and config.norm_len >= 1):
        raise ValueError(f"norm_len must be None or an int >= 1, got {config.norm_len!r}")


def check_grpo_tensors(
    logprobs: torch.Tensor,
    cu_seqlens: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
    normalisers: dict[str, Normaliser],
) -> None:
    """ValueError naming the argument for wrong shapes, dtypes, devices and (on CPU) cu_seqlens."""
    if logprobs.dim() != 1 or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a 1-D float tensor [T], got shape {tuple(logprobs.shape)}, "
            f"dtype {logprobs.dtype}"
        )
    num_tokens = logprobs.shape[0]
    for name, tensor in per_token.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != (num_tokens,):
            raise ValueError(
                f"{name} must have shape [T] = ({num_tokens},) like logprobs, got {tuple(tensor.shape)}"
            )
        if name != "loss_mask" and not tensor.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")
        if tensor.device != logprobs.device:
            raise ValueError(f"{name} is on {tensor.device} but logprobs is on {logprobs.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor [B+1], got shape "
            f"{tuple(cu_seqlens.shape)}, dtype {cu_seqlens.dtype}"
        )
    # Only a CPU cu_seqlens can be checked for free; on the GPU it would cost a host sync.
    if cu_seqlens.device.type == "cpu":
        bounds = cu_seqlens.long()
        if bounds[0] != 0 or bounds[-1] != num_tokens or bool((bounds.diff() < 0).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing from 0 to T={num_tokens}, got "
                f"{bounds.tolist() if bounds.numel() <= 16 else bounds}"
            )
    for name, value in normalisers.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        elif value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def triton_is_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return HAS_TRITON and type(_grpo_loss_fwd_kernel).__name__ == "InterpretedFunction"


def select_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for tensors on `device`; "auto" is Triton on CUDA, torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not triton_is_interpreted():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before dsr_fast.kernels is first imported"
            )
    return backend


def sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Sequence index of every token, int64 [T]; sync-free (T comes from a shape, not cu_seqlens)."""
    ends = cu_seqlens[1:].to(device=device, dtype=torch.int64, non_blocking=True)
    positions = torch.arange(num_tokens, device=device)
    # Sequence of token t = number of sequence ends ≤ t; empty sequences are skipped naturally.
    return torch.searchsorted(ends, positions, right=True)


def segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums [B] of per-token values [T] (empty sequences give 0)."""
    return values.new_zeros(num_seqs).index_add_(0, seq_ids, values)


def grpo_loss_forward(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    num_global_tokens: Normaliser,
    num_global_seqs: Normaliser,
    config: GRPOLossConfig,
    compute_grads: bool,
    backend: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss, metrics, D_logp [T] fp32, D_H [T] fp32, s): ∂loss/∂logprobs = s · D_logp and
    ∂loss/∂entropy = s · D_H, s a 0-dim fp32 device tensor (None means 1: the torch path)."""
    args = (
        logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
        num_global_tokens, num_global_seqs, config, compute_grads,
    )
    if backend == "triton":
        return _triton_grpo_loss_forward(*args)
    return (*_torch_grpo_loss_forward(*args), None)


def _normaliser_argument(value: Normaliser, device: torch.device, dummy: torch.Tensor):
    """(source code, value for the kernel, pointer for the kernel), never syncing the host."""
    if value is None:
        return _SOURCE_LOCAL, 0.0, dummy
    if isinstance(value, torch.Tensor):
        if value.device == device:  # e.g. the result of an all-reduce: read on the device
            return _SOURCE_POINTER, 0.0, value.reshape(())
        if value.device.type == "cpu":  # reading a CPU tensor is free
            return _SOURCE_VALUE, float(value.reshape(())), dummy
        return _SOURCE_POINTER, 0.0, value.reshape(()).to(device)
    return _SOURCE_VALUE, float(value), dummy


def _triton_grpo_loss_forward(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    num_global_tokens: Normaliser,
    num_global_seqs: Normaliser,
    config: GRPOLossConfig,
    compute_grads: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Launches: [segment stats] → loss → finalize (2 or 3 kernels, no host sync)."""
    num_tokens, device = logprobs.shape[0], logprobs.device
    num_seqs = cu_seqlens.shape[0] - 1
    metric_names = [
        name for name in METRIC_NAMES
        if not (name == "clip_frac_dual" and config.dual_clip is None)
        and not (name == "entropy_mean" and entropy is None)
        and not (name == "kl_mean" and ref_logprobs is None)
    ]
    f32 = dict(dtype=torch.float32, device=device)
    if num_tokens == 0:  # nothing to launch over; also keeps null pointers away from the kernels
        zero = torch.zeros((), **f32)
        grads = torch.zeros(0, **f32) if compute_grads else None
        return zero, {name: torch.zeros((), **f32) for name in metric_names}, grads, grads, torch.ones((), **f32)

    logprobs, old_logprobs, advantages = logprobs.contiguous(), old_logprobs.contiguous(), advantages.contiguous()
    cu_seqlens = cu_seqlens.to(device).contiguous()
    kl_code = _KL_CODES[None if ref_logprobs is None else config.kl_type]
    ref_logprobs = logprobs if ref_logprobs is None else ref_logprobs.contiguous()  # dummy when absent
    entropy_arg = logprobs if entropy is None else entropy.contiguous()
    if loss_mask is None:
        mask_arg = logprobs
    else:  # a bool tensor is read as its bytes (Triton's i1 pointers are awkward); others as != 0
        mask_arg = loss_mask.contiguous()
        mask_arg = mask_arg.view(torch.uint8) if mask_arg.dtype == torch.bool else mask_arg

    gspo = config.ratio_level == "sequence"
    seq_weights = config.agg == "seq-mean-token-mean"
    local_seqs = config.agg != "token-mean" and num_global_seqs is None
    local_norm_len = config.agg == "seq-mean-token-sum-norm" and config.norm_len is None
    seq_counts, seq_log_ratio, num_counted_seqs = cu_seqlens, logprobs, 0  # dummies when not needed
    if (gspo or seq_weights or local_seqs or local_norm_len) and num_seqs > 0:
        seq_counts = torch.empty(num_seqs, dtype=torch.int32, device=device)
        seq_log_ratio = torch.empty(num_seqs, **f32) if gspo else logprobs
        _segment_stats_kernel[(num_seqs,)](
            logprobs, old_logprobs, mask_arg, cu_seqlens, seq_counts, seq_log_ratio,
            HAS_MASK=loss_mask is not None, LOG_RATIO=gspo, BLOCK=BLOCK_SEGMENT, num_warps=NUM_WARPS,
        )
        num_counted_seqs = num_seqs

    num_blocks = triton.cdiv(num_tokens, BLOCK_TOKENS)
    partials = torch.empty(num_blocks, int(_PARTIALS_WIDTH), **f32)
    grad_logp = torch.empty(num_tokens, **f32) if compute_grads else partials
    grad_ent = torch.empty(num_tokens, **f32) if compute_grads and entropy is not None else partials
    pointers = (logprobs, old_logprobs, advantages, ref_logprobs, entropy_arg, mask_arg, cu_seqlens, seq_counts)
    if gspo:
        pointers += (seq_log_ratio,)
    kernel = _gspo_loss_fwd_kernel if gspo else _grpo_loss_fwd_kernel
    kernel[(num_blocks,)](
        *pointers, grad_logp, grad_ent, partials,
        num_tokens, num_seqs, num_seqs.bit_length(),
        1.0 - config.clip_low, 1.0 + config.clip_high,
        0.0 if config.dual_clip is None else config.dual_clip, config.kl_coef, config.entropy_coef,
        KL_TYPE=kl_code,
        HAS_ENTROPY=entropy is not None, HAS_MASK=loss_mask is not None, DUAL_CLIP=config.dual_clip is not None,
        SEQ_WEIGHTS=seq_weights, COMPUTE_GRADS=compute_grads, BLOCK=BLOCK_TOKENS, num_warps=NUM_WARPS,
    )

    tokens_source, tokens_value, tokens_ptr = _normaliser_argument(num_global_tokens, device, partials)
    seqs_source, seqs_value, seqs_ptr = _normaliser_argument(num_global_seqs, device, partials)
    loss, grad_scale = torch.empty((), **f32), torch.empty((), **f32)
    metrics_out = torch.empty(len(METRIC_NAMES), **f32)
    _grpo_loss_finalize_kernel[(1,)](
        partials, seq_counts, tokens_ptr, seqs_ptr, loss, grad_scale, metrics_out,
        num_blocks, num_counted_seqs, tokens_value, seqs_value,
        float(config.norm_len or 0),  # a float: Triton would turn an int 1 into a constant
        AGG=_AGG_CODES[config.agg], TOKENS_SOURCE=tokens_source, SEQS_SOURCE=seqs_source,
        BLOCK=BLOCK_FINALIZE, num_warps=NUM_WARPS,
    )
    metrics = {name: metrics_out[METRIC_NAMES.index(name)] for name in metric_names}
    if not compute_grads:
        return loss, metrics, None, None, grad_scale
    return loss, metrics, grad_logp, grad_ent if entropy is not None else None, grad_scale


def triton_scale_grads(
    grad_logp: torch.Tensor | None,
    grad_ent: torch.Tensor | None,
    grad_scale: torch.Tensor,
    grad_loss: torch.Tensor,
    logp_dtype: torch.dtype | None,
    ent_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward: s · upstream · D for each requested input (dtype None: not requested)."""
    want_logp, want_ent = logp_dtype is not None, ent_dtype is not None and grad_ent is not None
    num_tokens = grad_logp.shape[0]
    d_logp = torch.empty(num_tokens, dtype=logp_dtype, device=grad_logp.device) if want_logp else None
    d_ent = torch.empty(num_tokens, dtype=ent_dtype, device=grad_logp.device) if want_ent else None
    if num_tokens > 0 and (want_logp or want_ent):
        _grpo_loss_bwd_kernel[(triton.cdiv(num_tokens, BLOCK_TOKENS),)](
            grad_logp, grad_ent if want_ent else grad_logp, grad_scale, grad_loss.reshape(()).contiguous(),
            d_logp if want_logp else grad_logp, d_ent if want_ent else grad_logp,
            num_tokens,
            LOGP_GRAD=want_logp, ENTROPY_GRAD=want_ent, BLOCK=BLOCK_TOKENS, num_warps=NUM_WARPS,
        )
    return d_logp, d_ent


# ---------------------------------------------------------------------------------------------
# Torch fallback (vectorised over tokens; any device)
# ---------------------------------------------------------------------------------------------


def _as_normaliser(value: Normaliser, default: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim normaliser on default's device; 0 becomes 1 so that an empty batch gives 0, not NaN."""
    if value is None:
        value = default
    return torch.as_tensor(value, dtype=torch.float32, device=default.device).reshape(()).clamp_min(1.0)


def _aggregation_weights(
    valid: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    config: GRPOLossConfig,
    num_global_tokens: Normaliser,
    num_global_seqs: Normaliser,
) -> torch.Tensor:
    """w [T] fp32 such that loss = Σ_t w_t ℓ_t (zero where the mask is off)."""
    valid_f = valid.float()
    if config.agg == "token-mean":
        return valid_f / _as_normaliser(num_global_tokens, valid_f.sum())
    counts = segment_sum(valid.long(), seq_ids, num_seqs)  # integer: exact and order-free
    num_seqs_valid = _as_normaliser(num_global_seqs, (counts > 0).sum())
    if config.agg == "seq-mean-token-mean":
        return valid_f / (counts.clamp_min(1).float()[seq_ids] * num_seqs_valid)
    if config.agg == "seq-mean-token-sum":
        return valid_f / num_seqs_valid
    # seq-mean-token-sum-norm (Dr. GRPO)
    longest = counts.amax() if num_seqs > 0 else counts.new_zeros(())
    norm_len = _as_normaliser(config.norm_len, longest)
    return valid_f / (num_seqs_valid * norm_len)


def _log_ratio(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    valid: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    ratio_level: str,
) -> torch.Tensor:
    """Per-token log ρ [T] fp32: token log-ratio, or its masked sequence mean for GSPO."""
    log_ratio = logprobs - old_logprobs
    if ratio_level == "token":
        return log_ratio
    # fp64 sums: a long sequence's log-ratios are small numbers of both signs.
    masked = torch.where(valid, log_ratio, 0.0).double()
    counts = segment_sum(valid.double(), seq_ids, num_seqs).clamp_min(1.0)
    return (segment_sum(masked, seq_ids, num_seqs) / counts).float()[seq_ids]


def _policy_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, config: GRPOLossConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(pg [T], ∂pg/∂logp [T], clip indicators [T] bool) for the PPO-clip (and dual-clip) loss."""
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(low, high))
    # Clipped "in a way that changed the loss": the clipped branch is the strict max.
    clipped = {
        "clip_frac_low": (advantages < 0) & (ratio < low),
        "clip_frac_high": (advantages > 0) & (ratio > high),
    }
    unclipped = ~(clipped["clip_frac_low"] | clipped["clip_frac_high"])
    if config.dual_clip is not None:
        dual_bound = -advantages * config.dual_clip
        dual_clipped = (advantages < 0) & (pg > dual_bound)
        pg = torch.where(dual_clipped, dual_bound, pg)
        unclipped &= ~dual_clipped
        clipped["clip_frac_dual"] = dual_clipped
    grad = torch.where(unclipped, -advantages * ratio, 0.0)
    return pg, grad, clipped


def _kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl [T], ∂kl/∂logp [T]) for k1, k2 or verl-clamped k3."""
    if kl_type == "k1":
        return logprobs - ref_logprobs, torch.ones_like(logprobs)
    if kl_type == "k2":
        diff = logprobs - ref_logprobs
        return 0.5 * diff.square(), diff
    log_ratio = ref_logprobs - logprobs
    clamped = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    exp_ratio = clamped.exp()
    k3 = exp_ratio - clamped - 1.0
    # Inclusive bounds, as torch.clamp's own gradient passes at the bound.
    inside = (log_ratio.abs() <= K3_LOG_RATIO_CLAMP) & (k3.abs() <= K3_VALUE_CLAMP)
    grad = torch.where(inside, 1.0 - exp_ratio, 0.0)
    return k3.clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP), grad


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, values.float(), 0.0).sum() / num_valid


def _torch_grpo_loss_forward(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    num_global_tokens: Normaliser,
    num_global_seqs: Normaliser,
    config: GRPOLossConfig,
    compute_grads: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    num_tokens, device = logprobs.shape[0], logprobs.device
    num_seqs = cu_seqlens.shape[0] - 1
    logp, old, adv = logprobs.float(), old_logprobs.float(), advantages.float()
    valid = (
        torch.ones(num_tokens, dtype=torch.bool, device=device) if loss_mask is None else loss_mask != 0
    )
    # Token ids → sequence ids only where a mode needs per-sequence sums (token-mean does not).
    needs_seq_ids = config.ratio_level == "sequence" or config.agg != "token-mean"
    seq_ids = sequence_ids(cu_seqlens, num_tokens, device) if needs_seq_ids else None

    ratio = _log_ratio(logp, old, valid, seq_ids, num_seqs, config.ratio_level).exp()
    pg, d_loss_d_logp, clipped = _policy_loss(ratio, adv, config)
    per_token_loss = pg
    kl = None
    if ref_logprobs is not None:
        kl, d_kl = _kl_penalty(logp, ref_logprobs.float(), config.kl_type)
        if config.kl_coef != 0.0:
            per_token_loss = per_token_loss + config.kl_coef * kl
            d_loss_d_logp = d_loss_d_logp + config.kl_coef * d_kl
    if entropy is not None and config.entropy_coef != 0.0:
        per_token_loss = per_token_loss - config.entropy_coef * entropy.float()

    weights = _aggregation_weights(valid, seq_ids, num_seqs, config, num_global_tokens, num_global_seqs)
    # where(), not multiply: masked-out tokens may hold inf/NaN (padding, overflowed ratios).
    loss = (weights * torch.where(valid, per_token_loss, 0.0)).sum()

    num_valid = valid.sum().float().clamp_min(1.0)
    metrics = {name: _masked_mean(flag, valid, num_valid) for name, flag in clipped.items()}
    metrics["approx_kl"] = _masked_mean(old - logp, valid, num_valid)
    metrics["ratio_mean"] = _masked_mean(ratio, valid, num_valid)
    metrics["pg_loss"] = _masked_mean(pg, valid, num_valid)
    if entropy is not None:
        metrics["entropy_mean"] = _masked_mean(entropy, valid, num_valid)
    if kl is not None:
        metrics["kl_mean"] = _masked_mean(kl, valid, num_valid)

    grad_logprobs = grad_entropy = None
    if compute_grads:
        grad_logprobs = torch.where(valid, weights * d_loss_d_logp, 0.0)
        if entropy is not None:
            grad_entropy = weights * -config.entropy_coef
    return loss, metrics, grad_logprobs, grad_entropy


# ---------------------------------------------------------------------------------------------
# Plain reference (tests only): float64, one sequence at a time, autograd for gradients
# ---------------------------------------------------------------------------------------------


def reference_grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    num_global_tokens: Normaliser = None,
    num_global_seqs: Normaliser = None,
    ratio_level: str = "token",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as grpo_loss, written as plainly as possible in float64."""
    config = GRPOLossConfig(
        clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, agg, ratio_level, norm_len
    )
    check_grpo_options(config, ref_logprobs is not None, entropy is not None)
    f64 = lambda x: None if x is None else x.double()  # noqa: E731 (keeps the autograd graph)
    logp, old, adv, ref, ent = map(f64, (logprobs, old_logprobs, advantages, ref_logprobs, entropy))
    mask = torch.ones_like(logp, dtype=torch.bool) if loss_mask is None else loss_mask != 0
    bounds = [int(b) for b in cu_seqlens.tolist()]

    seq_loss_sums, seq_counts, tokens = [], [], {k: [] for k in ("pg", "ratio", "low", "high", "dual", "kl")}
    for start, end in zip(bounds[:-1], bounds[1:]):
        keep = mask[start:end]
        lp, lp_old, a = logp[start:end][keep], old[start:end][keep], adv[start:end][keep]
        if ratio_level == "token":
            log_ratio = lp - lp_old
        else:
            seq_mean = (lp - lp_old).mean() if len(lp) > 0 else lp.new_zeros(())
            log_ratio = lp - lp.detach() + seq_mean.detach()  # value r_i, gradient 1 w.r.t. lp
        ratio = torch.exp(log_ratio)
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        tokens["low"].append((a < 0) & (ratio < 1 - clip_low))
        tokens["high"].append((a > 0) & (ratio > 1 + clip_high))
        if dual_clip is not None:
            tokens["dual"].append((a < 0) & (pg > -a * dual_clip))
            pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
        loss_t = pg
        if ref is not None:
            r = ref[start:end][keep]
            if kl_type == "k1":
                kl = lp - r
            elif kl_type == "k2":
                kl = 0.5 * (lp - r) ** 2
            else:
                d = torch.clamp(r - lp, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
                kl = torch.clamp(torch.exp(d) - d - 1, -K3_VALUE_CLAMP, K3_VALUE_CLAMP)
            tokens["kl"].append(kl.detach())
            loss_t = loss_t + kl_coef * kl
        if ent is not None:
            loss_t = loss_t - entropy_coef * ent[start:end][keep]
        tokens["pg"].append(pg.detach())
        tokens["ratio"].append(ratio.detach())
        seq_loss_sums.append(loss_t.sum())
        seq_counts.append(len(lp))

    zero = logp[:0].sum()  # 0 that is still connected to the graph
    total_tokens = float(num_global_tokens) if num_global_tokens is not None else sum(seq_counts)
    nonempty = [i for i, n in enumerate(seq_counts) if n > 0]
    total_seqs = float(num_global_seqs) if num_global_seqs is not None else len(nonempty)
    if agg == "token-mean":
        loss = sum(seq_loss_sums, zero) / total_tokens if total_tokens > 0 else zero
    elif total_seqs == 0:
        loss = zero
    elif agg == "seq-mean-token-mean":
        loss = sum((seq_loss_sums[i] / seq_counts[i] for i in nonempty), zero) / total_seqs
    elif agg == "seq-mean-token-sum":
        loss = sum(seq_loss_sums, zero) / total_seqs
    else:
        longest = norm_len if norm_len is not None else max(seq_counts, default=0)
        loss = sum(seq_loss_sums, zero) / (total_seqs * longest) if longest > 0 else zero

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(values).double() if values else logp.new_zeros(0).detach()
        return flat.mean() if flat.numel() > 0 else flat.new_zeros(())

    valid_old = torch.cat([old[s:e][mask[s:e]] for s, e in zip(bounds[:-1], bounds[1:])] or [old[:0]])
    valid_logp = torch.cat([logp[s:e][mask[s:e]] for s, e in zip(bounds[:-1], bounds[1:])] or [logp[:0]])
    metrics = {
        "clip_frac_low": mean(tokens["low"]),
        "clip_frac_high": mean(tokens["high"]),
        "approx_kl": mean([(valid_old - valid_logp).detach()]),
        "ratio_mean": mean(tokens["ratio"]),
        "pg_loss": mean(tokens["pg"]),
    }
    if dual_clip is not None:
        metrics["clip_frac_dual"] = mean(tokens["dual"])
    if ent is not None:
        valid_ent = torch.cat([ent[s:e][mask[s:e]] for s, e in zip(bounds[:-1], bounds[1:])] or [ent[:0]])
        metrics["entropy_mean"] = mean([valid_ent.detach()])
    if ref is not None:
        metrics["kl_mean"] = mean(tokens["kl"])
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------------------------


class GRPOLossFunction(torch.autograd.Function):
    """loss = Σ_t w_t ℓ_t; the forward stores ∂loss/∂logp and ∂loss/∂H per token (fp32, up to
    the device scalar s of the Triton path), the backward scales them by s and the upstream grad."""

    @staticmethod
    def forward(
        ctx,
        logprobs: torch.Tensor,
        entropy: torch.Tensor | None,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        cu_seqlens: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        loss_mask: torch.Tensor | None,
        num_global_tokens: Normaliser,
        num_global_seqs: Normaliser,
        config: GRPOLossConfig,
        backend: str,
        metrics_out: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        loss, metrics, grad_logprobs, grad_entropy, grad_scale = grpo_loss_forward(
            logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
            num_global_tokens, num_global_seqs, config, compute_grads=True, backend=backend,
        )
        # apply() returns tensors only; the metrics (no gradient) leave through this dict.
        metrics_out.update(metrics)
        ctx.save_for_backward(grad_logprobs, grad_entropy, grad_scale)
        ctx.logprobs_dtype = logprobs.dtype
        ctx.entropy_dtype = None if entropy is None else entropy.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logprobs, grad_entropy, grad_scale = ctx.saved_tensors
        want_logp, want_ent = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_scale is not None:  # Triton: one launch for both inputs, s read on the device
            d_logprobs, d_entropy = triton_scale_grads(
                grad_logprobs, grad_entropy, grad_scale, grad_loss,
                ctx.logprobs_dtype if want_logp else None, ctx.entropy_dtype if want_ent else None,
            )
        else:
            d_logprobs = (grad_logprobs * grad_loss).to(ctx.logprobs_dtype) if want_logp else None
            d_entropy = (grad_entropy * grad_loss).to(ctx.entropy_dtype) if want_ent else None
        return d_logprobs, d_entropy, None, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    num_global_tokens: Normaliser = None,
    num_global_seqs: Normaliser = None,
    ratio_level: str = "token",
    norm_len: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/PPO-clip loss over a packed batch; see the module docstring for the formulas.

    Args:
        logprobs: [T] current-policy log-probs (differentiable).
        old_logprobs, advantages: [T] behaviour log-probs and per-token advantages.
        cu_seqlens: [B+1] int32/int64 sequence boundaries, 0 ... T.
        ref_logprobs: [T] reference-policy log-probs; needed when kl_coef != 0.
        entropy: [T] per-token entropy (differentiable); needed when entropy_coef != 0.
        loss_mask: [T] bool or 0/1, the tokens that count; default all.
        clip_low, clip_high: ε_l, ε_h of clip(ρ, 1−ε_l, 1+ε_h).
        dual_clip: c > 1 caps the loss of A < 0 tokens at −A·c; None disables it.
        kl_coef, kl_type: β and the estimator ("k1", "k2", "k3" = verl low_var_kl).
        entropy_coef: c_H of the −c_H·H bonus.
        agg: one of AGG_MODES; KL and entropy use the same aggregation as the policy term.
        num_global_tokens: N for "token-mean" (micro-batch × data-parallel total), default local.
        num_global_seqs: S for the seq-mean modes, default the local sequences with a valid token.
        ratio_level: "token" or "sequence" (GSPO).
        norm_len: L for "seq-mean-token-sum-norm", default the longest local n_i.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" (CUDA, or CPU tensors
            under TRITON_INTERPRET=1 for tests) or "torch". Both give the same results to fp32
            rounding.
        Normalisers a mode does not use are ignored. With global normalisers, summing the loss
        over micro-batches and ranks gives the global aggregate exactly.

    Returns:
        (loss, metrics): 0-dim fp32 loss; metrics are 0-dim fp32 tensors (no host sync), masked
        means over the local valid tokens: clip_frac_low, clip_frac_high (clip_frac_dual with
        dual_clip), approx_kl (mean of old − logp), ratio_mean, pg_loss, entropy_mean (with
        entropy), kl_mean (with ref_logprobs).
    """
    config = GRPOLossConfig(
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        float(kl_coef), kl_type, float(entropy_coef), agg, ratio_level, norm_len,
    )
    check_grpo_options(config, ref_logprobs is not None, entropy is not None)
    check_grpo_tensors(
        logprobs,
        cu_seqlens,
        {"old_logprobs": old_logprobs, "advantages": advantages, "ref_logprobs": ref_logprobs,
         "entropy": entropy, "loss_mask": loss_mask},
        {"num_global_tokens": num_global_tokens, "num_global_seqs": num_global_seqs},
    )
    backend = select_backend(backend, logprobs.device)
    needs_grad = torch.is_grad_enabled() and (
        logprobs.requires_grad or (entropy is not None and entropy.requires_grad)
    )
    if not needs_grad:
        loss, metrics, _, _, _ = grpo_loss_forward(
            logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
            num_global_tokens, num_global_seqs, config, compute_grads=False, backend=backend,
        )
        return loss, metrics
    metrics: dict[str, torch.Tensor] = {}
    loss = GRPOLossFunction.apply(
        logprobs, entropy, old_logprobs, advantages, cu_seqlens, ref_logprobs, loss_mask,
        num_global_tokens, num_global_seqs, config, backend, metrics,
    )
    return loss, metrics
