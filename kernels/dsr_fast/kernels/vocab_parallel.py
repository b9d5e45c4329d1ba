"""Per-token logprobs (+ entropy) from a vocabulary-parallel lm_head, without gathering the vocabulary.

Tensor-parallel trainers split the head along the vocabulary: rank r holds rows
[vocab_start_r, vocab_start_r + V_r) of W, and every rank holds the same hidden states h and labels.
With z = h·W_rᵀ / τ on rank r, each rank reduces its own shard to four numbers per token

    m_r = max_j z_j,   s_r = Σ_j e^{z_j − m_r},   u_r = Σ_j e^{z_j − m_r}(z_j − m_r),
    t_r = z_y if y ∈ shard r else 0

and two all-reduces combine them (M = max_r m_r, then one sum over a [4, T] stack):

    S = Σ_r e^{m_r − M} s_r,   U = Σ_r e^{m_r − M} (u_r + (m_r − M) s_r)   (= Σ_j e^{z_j − M}(z_j − M))
    lse = M + log S,   logp_y = Σ_r t_r − lse,   z̄ = M + U/S,   H = log S − U/S

The fourth summed row counts the shards holding y: anything but exactly 1 means the labels or the
shard layout are wrong, and is reported instead of returning a silently wrong logprob.

Backward (upstream g_lp, g_H per token, the same on every rank as in any tensor-parallel loss):
each rank recomputes its logit chunks and forms, for its own columns only,

    dz_j = g_lp (1[j=y] − p_j) − g_H p_j (z_j − z̄),   p_j = e^{z_j − lse},   dx = dz / τ
    dW_r = dxᵀ·h            (local: the rank's shard gradient, complete as it is)
    dh   = Σ_r dx_r·W_r     (one all-reduce of the partial products)

so the full vocabulary is never gathered and nothing but [T]-sized statistics and one [T, H]
gradient cross the group. The returned hidden gradient is already summed over the group: do not
also wrap the hidden states in a "copy to tensor-parallel region" op whose backward all-reduces,
or it is counted world-size times.

Memory: tokens are processed in chunks whose [chunk, V_r] fp32 logits fit CHUNK_BYTES; only lse
and z̄ (8 bytes per token) are kept for the backward, which recomputes the logits.

Built on torch ops (any device, any backend of torch.distributed that has MAX and SUM all-reduces;
gloo on CPU in the tests). Deterministic as far as the collective backend's sums are.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# CHUNK_BYTES bounds one [chunk, V_r] fp32 logits buffer here as in the single-device fallback;
# the backward holds about three at once.
from .logprobs import CHUNK_BYTES, SUPPORTED_DTYPES, _gemm_operand, _mm_fp32

_ROW_SUM, _ROW_MOMENT, _ROW_TARGET, _ROW_FOUND = range(4)


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------


def check_vocab_parallel_inputs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    temperature: float,
) -> None:
    """ValueError naming the argument for bad shapes, dtypes, devices or scalars (no host sync)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard must be 2-D [V_local, H], got shape {tuple(weight_shard.shape)}")
    if weight_shard.shape[0] == 0:
        raise ValueError("weight_shard has no rows: every rank must hold at least one vocabulary row")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be 1-D [T={hidden.shape[0]}], got shape {tuple(labels.shape)}")
    if hidden.shape[1] != weight_shard.shape[1]:
        raise ValueError(
            f"hidden and weight_shard disagree on H: {tuple(hidden.shape)} vs {tuple(weight_shard.shape)}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if hidden.dtype not in SUPPORTED_DTYPES or hidden.dtype != weight_shard.dtype:
        raise ValueError(
            f"hidden and weight_shard must share one of {[str(d) for d in SUPPORTED_DTYPES]}, got "
            f"{hidden.dtype} and {weight_shard.dtype}"
        )
    if not (hidden.device == weight_shard.device == labels.device):
        raise ValueError(
            f"hidden, weight_shard and labels must be on one device, got {hidden.device}, "
            f"{weight_shard.device}, {labels.device}"
        )
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _row_chunks(num_tokens: int, vocab_local: int, chunk_size: int | None):
    """Slices of at most `chunk_size` tokens (default: a [chunk, V_local] fp32 buffer ≤ CHUNK_BYTES)."""
    step = chunk_size or max(1, CHUNK_BYTES // (4 * vocab_local))
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _local_labels(labels: torch.Tensor, vocab_start: int, vocab_local: int, ignore_index: int):
    """(column of y in this shard, clamped to a valid one; mask of tokens whose y lies here)."""
    local = labels.long() - vocab_start
    here = (labels != ignore_index) & (local >= 0) & (local < vocab_local)
    return torch.where(here, local, 0), here


# ---------------------------------------------------------------------------------------------
# Forward: per-shard statistics, combined across the group
# ---------------------------------------------------------------------------------------------


def _shard_statistics(hidden, weight, local_labels, here, inv_temperature, compute_entropy, chunk_size):
    """m_r [T] and the [4, T] stack (s_r, u_r, t_r, found) of the module docstring, fp32."""
    num_tokens = hidden.shape[0]
    device = hidden.device
    shard_max = torch.empty(num_tokens, dtype=torch.float32, device=device)
    stats = torch.zeros(4, num_tokens, dtype=torch.float32, device=device)
    weight_op = _gemm_operand(weight)
    for rows in _row_chunks(num_tokens, weight.shape[0], chunk_size):
        z = _mm_fp32(_gemm_operand(hidden[rows]), weight_op.T).mul_(inv_temperature)
        target = z.gather(1, local_labels[rows, None]).squeeze(1)
        z_max = z.amax(dim=1, keepdim=True)  # identity −inf (verl #2656: never a 0 identity)
        shifted = z.sub_(z_max)
        exp_shifted = shifted.exp()
        stats[_ROW_SUM, rows] = exp_shifted.sum(dim=1)
        if compute_entropy:
            stats[_ROW_MOMENT, rows] = (exp_shifted * shifted).sum(dim=1)
        stats[_ROW_TARGET, rows] = torch.where(here[rows], target, 0.0)
        shard_max[rows] = z_max.squeeze(1)
        del z, shifted, exp_shifted
    stats[_ROW_FOUND] = here.float()
    return shard_max, stats


def _combine(shard_max, stats, group, compute_entropy):
    """All-reduce the shard statistics → (z_y, lse, log S, z̄ − M or None, M, shards holding y), [T] each."""
    global_max = shard_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    rescale = torch.exp(shard_max - global_max)  # ≤ 1; the shard holding the max gets exactly 1
    if compute_entropy:
        # Σ e^{z−M}(z−M) = e^{m−M} (Σ e^{z−m}(z−m) + (m−M) Σ e^{z−m}): re-centre before summing.
        stats[_ROW_MOMENT] = rescale * (stats[_ROW_MOMENT] + (shard_max - global_max) * stats[_ROW_SUM])
    stats[_ROW_SUM] *= rescale
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    log_sum = stats[_ROW_SUM].log()
    lse = global_max + log_sum
    mean_shifted = stats[_ROW_MOMENT] / stats[_ROW_SUM] if compute_entropy else None  # z̄ − M
    return stats[_ROW_TARGET], lse, log_sum, mean_shifted, global_max, stats[_ROW_FOUND]


def _check_found(found: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    # Deliberate host sync, once per call: a label in no shard (out of range, or a gap between
    # shards) or in two (overlapping shards) would otherwise give a silently wrong logprob.
    bad = (labels != ignore_index) & (found != 1)
    if labels.numel() > 0 and bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}] = {int(labels[position])} lies in {int(found[position])} vocabulary "
            "shards, expected exactly 1: labels must be global ids in [0, V) and the shards "
            "[vocab_start, vocab_start + V_local) of the group must tile [0, V) without overlap"
        )


def vocab_parallel_forward(
    hidden, weight_shard, labels, vocab_start, group, temperature, ignore_index, compute_entropy, chunk_size
):
    """(logprobs [T], entropy [T] or None, lse [T], z̄ [T] or None), all fp32, ignored tokens 0."""
    inv_temperature = 1.0 / temperature
    local_labels, here = _local_labels(labels, vocab_start, weight_shard.shape[0], ignore_index)
    shard_max, stats = _shard_statistics(
        hidden, weight_shard, local_labels, here, inv_temperature, compute_entropy, chunk_size
    )
    target, lse, log_sum, mean_shifted, global_max, found = _combine(shard_max, stats, group, compute_entropy)
    _check_found(found, labels, ignore_index)
    ignored = labels == ignore_index
    logprobs = torch.where(ignored, 0.0, target - lse)
    if not compute_entropy:
        return logprobs, None, lse, None
    entropy = torch.where(ignored, 0.0, log_sum - mean_shifted)
    return logprobs, entropy, lse, global_max + mean_shifted


# ---------------------------------------------------------------------------------------------
# Backward: local dW, all-reduced dh
# ---------------------------------------------------------------------------------------------


def vocab_parallel_backward(
    grad_logprobs, grad_entropy, hidden, weight_shard, labels, lse, mean_logit, vocab_start, group,
    temperature, ignore_index, chunk_size, needs_grad_hidden, needs_grad_weight,
):
    num_tokens = hidden.shape[0]
    inv_temperature = 1.0 / temperature
    ignored = labels == ignore_index
    # where(), not multiply: an upstream NaN/inf at an ignored position must not leak in.
    g_lp = None if grad_logprobs is None else torch.where(ignored, 0.0, grad_logprobs.float())
    g_h = None if grad_entropy is None else torch.where(ignored, 0.0, grad_entropy.float())
    local_labels, here = _local_labels(labels, vocab_start, weight_shard.shape[0], ignore_index)
    # The one-hot term lands only on the shard holding y.
    g_target = None if g_lp is None else torch.where(here, g_lp, 0.0)
    weight_op = _gemm_operand(weight_shard)

    grad_hidden = (
        torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_grad_hidden else None
    )
    grad_weight = (
        torch.zeros(weight_shard.shape, dtype=torch.float32, device=weight_shard.device)
        if needs_grad_weight else None
    )
    for rows in _row_chunks(num_tokens, weight_shard.shape[0], chunk_size):
        hidden_op = _gemm_operand(hidden[rows])
        z = _mm_fp32(hidden_op, weight_op.T).mul_(inv_temperature)
        probs = (z - lse[rows, None]).exp_()
        if g_h is not None:
            # coefficient of p_j: −g_lp − g_H (z_j − z̄)
            coeff = z.sub_(mean_logit[rows, None]).mul_(-g_h[rows, None])
            if g_lp is not None:
                coeff.sub_(g_lp[rows, None])
            dz = probs.mul_(coeff)
        else:
            dz = probs.mul_(-g_lp[rows, None])
        if g_target is not None:
            dz.scatter_add_(1, local_labels[rows, None], g_target[rows, None])
        dx = dz.mul_(inv_temperature).to(weight_op.dtype)
        if needs_grad_hidden:
            grad_hidden[rows] = _mm_fp32(dx, weight_op)
        if needs_grad_weight:
            grad_weight += _mm_fp32(dx.T, hidden_op)
        del z, probs, dz, dx
    if needs_grad_hidden:
        # Summed in fp32 whatever the input dtype: gloo has no bf16 sums, and fewer roundings.
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        grad_hidden = grad_hidden.to(hidden.dtype)
    if needs_grad_weight:
        grad_weight = grad_weight.to(weight_shard.dtype)
    return grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------------
# Autograd Function and public function
# ---------------------------------------------------------------------------------------------


class VocabParallelLogprobsFunction(torch.autograd.Function):
    """Differentiable w.r.t. hidden (gradient summed over the group) and the local weight shard."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, labels, vocab_start, group, temperature, ignore_index,
                compute_entropy, chunk_size):
        logprobs, entropy, lse, mean_logit = vocab_parallel_forward(
            hidden, weight_shard, labels, vocab_start, group, temperature, ignore_index, compute_entropy,
            chunk_size,
        )
        ctx.save_for_backward(hidden, weight_shard, labels, lse, mean_logit)
        ctx.vocab_start, ctx.group, ctx.temperature = vocab_start, group, temperature
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight_shard, labels, lse, mean_logit = ctx.saved_tensors
        nones = (None,) * 7
        if grad_logprobs is None and grad_entropy is None:
            # Every rank takes this branch together (same graph everywhere), so no collective is skipped
            # on one rank only.
            return (None, None) + nones
        grad_hidden, grad_weight = vocab_parallel_backward(
            grad_logprobs, grad_entropy, hidden, weight_shard, labels, lse, mean_logit, ctx.vocab_start,
            ctx.group, ctx.temperature, ctx.ignore_index, ctx.chunk_size, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        return (grad_hidden, grad_weight) + nones


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(labels[t]) (and entropy) under softmax(hidden[t]·Wᵀ / τ), W split by vocabulary.

    Collective: every rank of `group` must call it with the same hidden, labels and scalars.

    Args:
        hidden: [T, H] fp32/bf16/fp16, identical on every rank of the group.
        weight_shard: [V_local, H] this rank's rows [vocab_start, vocab_start + V_local) of the
            lm_head weight, same dtype as hidden. Shards may be uneven but must tile [0, V).
        labels: [T] global token ids in [0, V), or ignore_index; identical on every rank.
        vocab_start: global id of weight_shard's first row.
        group: the tensor-parallel process group (default: the world).
        temperature: τ > 0; logits are divided by it in fp32.
        return_entropy: also return the (differentiable) entropy of the full distribution.
        ignore_index: label of positions that give 0 and receive no gradient.
        chunk_size: tokens per chunk; default so a [chunk, V_local] fp32 buffer fits CHUNK_BYTES.

    Returns:
        (logprobs [T] fp32, entropy [T] fp32 or None), identical on every rank. Backward gives the
        full hidden gradient (already all-reduced over the group) and this rank's shard gradient;
        it must be run on every rank with the same upstream gradient.
    """
    check_vocab_parallel_inputs(hidden, weight_shard, labels, vocab_start, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    temperature = float(temperature)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)
    if not needs_grad:
        logprobs, entropy, _, _ = vocab_parallel_forward(
            hidden, weight_shard, labels, vocab_start, group, temperature, ignore_index, return_entropy,
            chunk_size,
        )
        return logprobs, entropy
    return VocabParallelLogprobsFunction.apply(
        hidden, weight_shard, labels, vocab_start, group, temperature, ignore_index, return_entropy, chunk_size
    )
