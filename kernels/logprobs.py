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

The full [T, V] logits are never materialised. The torch path walks the tokens in chunks whose
[chunk, V] fp32 logits fit a byte budget; the forward keeps only lse and z̄ per token (8 bytes),
and the backward recomputes each chunk's logits. All softmax math is fp32 whatever the input dtype;
gradients are accumulated in fp32 and returned in the input dtypes.

File order (as in Liger's ops): constants → Triton kernels (none yet) → host functions → torch
fallback → plain reference for tests → autograd Function → public function.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

# Budget for one [chunk, V] fp32 buffer. The backward holds about three of them at once (logits,
# probabilities, a temporary), so the peak is ~3× this: ~0.4 GB. At V = 151,936 that is 220 tokens
# per chunk, about the 256-token chunks Liger's FLCE settles on for the same vocabulary.
CHUNK_BYTES = 128 * 2**20

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Triton kernels: none yet (the torch path below serves every device).
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------


def check_logprobs_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """Raise ValueError naming the offending argument, with shapes/dtypes, for bad inputs.

    The label range check reads one boolean back from the device: a deliberate host sync, once
    per call, because an out-of-range label would otherwise be a device-side assert in `gather`.
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
    vocab_size = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if labels.numel() > 0 and bool(bad.any()):  # host sync, see docstring
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must lie in [0, V={vocab_size}) or equal ignore_index={ignore_index}; "
            f"labels[{position}] = {int(labels[position])}"
        )


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one [chunk, V] fp32 buffer fits CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Returns (logprobs [T] fp32, entropy [T] fp32 or None, lse [T] fp32, z̄ [T] fp32 or None).

    lse and z̄ (on the temperature-scaled logits) are all the backward needs besides the inputs.
    """
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_hidden [T, H] in hidden.dtype or None, grad_weight [V, H] in weight.dtype or None)."""
    return _torch_logprobs_backward(
        grad_logprobs, grad_entropy, hidden, weight, labels, lse, mean_logit,
        temperature, ignore_index, chunk_size, needs_grad_hidden, needs_grad_weight,
    )


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


def _labels_or_zero(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # Ignored positions gather column 0 (any valid column); their outputs are zeroed afterwards.
    return torch.where(labels == ignore_index, 0, labels).long()


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
    safe_labels = _labels_or_zero(labels, ignore_index)

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
    safe_labels = _labels_or_zero(labels, ignore_index)
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs, entropy, lse, mean_logit = logprobs_forward(
            hidden, weight, labels, temperature, ignore_index, compute_entropy, chunk_size
        )
        # Per token only lse and z̄ (8 bytes) are kept; the backward recomputes the logits.
        ctx.save_for_backward(hidden, weight, labels, lse, mean_logit)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        # An unused output then arrives as None and its term is skipped, not multiplied by zeros.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        hidden, weight, labels, lse, mean_logit = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        grad_hidden, grad_weight = logprobs_backward(
            grad_logprobs, grad_entropy, hidden, weight, labels, lse, mean_logit,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, needs_hidden, needs_weight,
        )
        return grad_hidden, grad_weight, None, None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(labels[t]) and entropy under softmax(hidden[t]·weightᵀ / temperature).

    Args:
        hidden: [T, H] fp32/bf16/fp16 final hidden states (rows already aligned with labels).
        weight: [V, H] lm_head weight, same dtype as hidden.
        labels: [T] integer token ids in [0, V), or ignore_index.
        temperature: τ > 0; logits are divided by it in fp32 (use the sampling temperature).
        return_entropy: also return the entropy, differentiable like the logprobs.
        ignore_index: label marking positions that give 0 and receive no gradient.
        chunk_size: tokens per chunk; default from CHUNK_BYTES. Results do not depend on it
            beyond fp32 rounding.

    Returns:
        (logprobs [T] fp32, entropy [T] fp32 or None). Gradients flow to hidden and weight
        (returned in their dtypes). With grad disabled, or when neither input requires grad,
        nothing is saved for backward.
    """
    check_logprobs_inputs(hidden, weight, labels, temperature, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    temperature = float(temperature)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        logprobs, entropy, _, _ = logprobs_forward(
            hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size
        )
        return logprobs, entropy
    return FusedLogprobsFunction.apply(
        hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size
    )
