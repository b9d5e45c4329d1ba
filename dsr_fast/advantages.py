"""Outcome advantages for GRPO-style training, per prompt group.

Rewards arrive group-major: the `group_size` samples of prompt 0, then of prompt 1, and so on.

    grpo     A = (r − mean_g) / (std_g + eps)    std unbiased (N − 1), as DeepScaleR/verl
    dr_grpo  A = r − mean_g                      (Dr. GRPO: no std normalisation)

Groups with at least two samples whose rewards are all equal get A = 0 exactly (DeepScaleR keeps
them in the batch). A DAPO-style trainer (dynamic sampling) drops them instead: `uniform_groups`
flags them per group and `kept_samples` gives the per-sample mask to index rewards, advantages
and sequences with. A group of one sample follows verl: mean 0, std 1, so A = r / (1 + eps) for
grpo and A = r for dr_grpo.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "dr_grpo")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N] → [G, group_size] float view, with ValueErrors for bad shapes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards has N = {rewards.shape[0]} entries, not a multiple of group_size = {group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [G]: True where every reward of the group is equal (no learning signal).

    A group of one sample is uniform: it has no within-group contrast.
    """
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def kept_samples(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [N]: True for the samples of groups with some reward contrast (DAPO dynamic sampling).

    Groups are independent, so group_advantages(rewards[keep], group_size) equals
    group_advantages(rewards, group_size)[keep]. With group_size ≥ 2 the dropped samples'
    advantages are exactly 0; groups of one are always dropped (they have no contrast, although
    verl gives them A = r / (1 + eps)).
    """
    return (~uniform_groups(rewards, group_size)).repeat_interleave(group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages [N] (rewards' float dtype) from group-major rewards [N]."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    grouped = _grouped(rewards, group_size)
    if grouped.shape[0] == 0:  # e.g. every group dropped by dynamic sampling
        return grouped.reshape(-1)
    if group_size == 1:
        # verl: a singleton group has mean 0 and std 1 (torch.std of one value would be NaN).
        mean, std = torch.zeros_like(grouped), torch.ones_like(grouped)
    else:
        mean = grouped.mean(dim=1, keepdim=True)
        std = grouped.std(dim=1, keepdim=True)  # unbiased, as torch.std in verl
    centred = grouped - mean
    advantages = centred / (std + eps) if estimator == "grpo" else centred
    if group_size > 1:
        # Exactly 0: a float mean of equal values can be one ulp off the values themselves.
        uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
        advantages = torch.where(uniform, 0.0, advantages)
    return advantages.reshape(-1)


def broadcast_to_tokens(
    per_sequence: torch.Tensor, cu_seqlens: torch.Tensor, *, num_tokens: int | None = None
) -> torch.Tensor:
    """per_sequence [B] → per_token [T], token t of sequence i getting per_sequence[i].

    num_tokens (= T = cu_seqlens[-1]) is optional; passing it avoids a host sync on the GPU.
    """
    if per_sequence.dim() != 1:
        raise ValueError(f"per_sequence must be 1-D [B], got shape {tuple(per_sequence.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != per_sequence.shape[0] + 1:
        raise ValueError(
            f"cu_seqlens must have shape [B+1] = ({per_sequence.shape[0] + 1},) for per_sequence "
            f"{tuple(per_sequence.shape)}, got {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    lengths = cu_seqlens.to(per_sequence.device).long().diff()
    return torch.repeat_interleave(per_sequence, lengths, output_size=num_tokens)
