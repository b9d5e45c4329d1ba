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
by the upstream gradient. Sequence reductions use index_add_ over sequence ids, never a Python loop
over sequences and never a host sync, so T can be 10M tokens and the loss can be captured.

File order (as in Liger's ops): constants → Triton kernels (none yet) → host functions → torch
fallback → plain reference for tests → autograd Function → public function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")

# verl's low_var_kl clamps: the log-ratio before exp (else e^{ref−logp} can overflow and the
# backward forms inf·0 = NaN) and the k3 value (DeepScaleR's only clamp). Both leave k3's value
# unchanged: |d| > 20 already gives k3 > 10.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0

Normaliser = int | float | torch.Tensor | None

# ---------------------------------------------------------------------------------------------
# Triton kernels: none yet (the torch path below serves every device).
# ---------------------------------------------------------------------------------------------

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
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Returns (loss, metrics, ∂loss/∂logprobs [T] fp32 or None, ∂loss/∂entropy [T] fp32 or None)."""
    return _torch_grpo_loss_forward(
        logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
        num_global_tokens, num_global_seqs, config, compute_grads,
    )


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
    seq_ids = sequence_ids(cu_seqlens, num_tokens, device)

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
    """loss = Σ_t w_t ℓ_t; the forward stores ∂loss/∂logp and ∂loss/∂H per token (fp32)."""

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
        metrics_out: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        loss, metrics, grad_logprobs, grad_entropy = grpo_loss_forward(
            logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
            num_global_tokens, num_global_seqs, config, compute_grads=True,
        )
        # apply() returns tensors only; the metrics (no gradient) leave through this dict.
        metrics_out.update(metrics)
        ctx.save_for_backward(grad_logprobs, grad_entropy)
        ctx.logprobs_dtype = logprobs.dtype
        ctx.entropy_dtype = None if entropy is None else entropy.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logprobs, grad_entropy = ctx.saved_tensors
        d_logprobs = d_entropy = None
        if ctx.needs_input_grad[0]:
            d_logprobs = (grad_logprobs * grad_loss).to(ctx.logprobs_dtype)
        if ctx.needs_input_grad[1]:
            d_entropy = (grad_entropy * grad_loss).to(ctx.entropy_dtype)
        return d_logprobs, d_entropy, None, None, None, None, None, None, None, None, None


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
    needs_grad = torch.is_grad_enabled() and (
        logprobs.requires_grad or (entropy is not None and entropy.requires_grad)
    )
    if not needs_grad:
        loss, metrics, _, _ = grpo_loss_forward(
            logprobs, old_logprobs, advantages, cu_seqlens, ref_logprobs, entropy, loss_mask,
            num_global_tokens, num_global_seqs, config, compute_grads=False,
        )
        return loss, metrics
    metrics: dict[str, torch.Tensor] = {}
    loss = GRPOLossFunction.apply(
        logprobs, entropy, old_logprobs, advantages, cu_seqlens, ref_logprobs, loss_mask,
        num_global_tokens, num_global_seqs, config, metrics,
    )
    return loss, metrics
