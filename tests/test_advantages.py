"""Group advantages (GRPO / Dr. GRPO), uniform-group detection and broadcasting to tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr_fast.advantages import (
    broadcast_to_tokens,
    group_advantages,
    kept_samples,
    uniform_groups,
)


def test_hand_computed_example():
    rewards = torch.tensor([1.0, 0, 0, 0,  1, 1, 0, 0,  1, 1, 1, 1,  0, 0, 0, 0])
    # group 0: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5
    #          A = 0.75/0.500001 = 1.499997000006, −0.25/0.500001 = −0.499999000002
    # group 1: mean 0.5, std sqrt(4·0.25/3) = 0.5773503; A = ±0.5/0.5773513 = ±0.8660239038
    # groups 2 and 3: all equal → 0
    a, b, c = 1.499997000006, 0.499999000002, 0.8660239037870368
    expected = torch.tensor([a, -b, -b, -b,  c, c, -c, -c,  0, 0, 0, 0,  0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected, rtol=0, atol=1e-6)

    dr_expected = torch.tensor([0.75, -0.25, -0.25, -0.25,  0.5, 0.5, -0.5, -0.5,  0, 0, 0, 0,  0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, estimator="dr_grpo"), dr_expected, rtol=0, atol=0)
    assert uniform_groups(rewards, 4).tolist() == [False, False, True, True]
    assert kept_samples(rewards, 4).tolist() == [True] * 8 + [False] * 8


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    num_groups=st.integers(1, 6),
    group_size=st.integers(2, 9),
    seed=st.integers(0, 2**16),
    binary=st.booleans(),
)
def test_matches_torch_std_per_group(num_groups, group_size, seed, binary):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(num_groups * group_size, generator=gen)
    if binary:
        rewards = (rewards > 0.5).float()
    advantages = group_advantages(rewards, group_size)
    dr_advantages = group_advantages(rewards, group_size, estimator="dr_grpo")
    for g in range(num_groups):
        group = rewards[g * group_size : (g + 1) * group_size]
        if bool((group == group[0]).all()):
            want = dr_want = torch.zeros(group_size)
        else:
            dr_want = group - group.mean()
            want = dr_want / (torch.std(group, unbiased=True) + 1e-6)
        got = advantages[g * group_size : (g + 1) * group_size]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dr_advantages[g * group_size : (g + 1) * group_size], dr_want, rtol=1e-6, atol=1e-6)


def test_uniform_groups_are_exactly_zero():
    # 0.1·7 / 7 is not exactly 0.1 in float arithmetic; the advantage must still be exactly 0.
    rewards = torch.tensor([0.1] * 7 + [0.3, 0.7, 0.1, 0.1, 0.1, 0.1, 0.2], dtype=torch.float32)
    advantages = group_advantages(rewards, 7)
    assert torch.equal(advantages[:7], torch.zeros(7))
    assert bool((advantages[7:] != 0).any())
    assert uniform_groups(rewards, 7).tolist() == [True, False]


def test_group_of_one_follows_verl():
    rewards = torch.tensor([1.0, 0.0, 0.5])
    # verl: mean 0, std 1 for a singleton group → A = r / (1 + eps)
    torch.testing.assert_close(group_advantages(rewards, 1), rewards / (1 + 1e-6), rtol=0, atol=0)
    torch.testing.assert_close(group_advantages(rewards, 1, estimator="dr_grpo"), rewards, rtol=0, atol=0)
    assert uniform_groups(rewards, 1).tolist() == [True, True, True]


def test_dtypes():
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    int_rewards = group_advantages(torch.tensor([1, 0, 0, 1]), 2)
    assert int_rewards.dtype == torch.float32
    torch.testing.assert_close(int_rewards, group_advantages(torch.tensor([1.0, 0, 0, 1]), 2))


@pytest.mark.parametrize(
    "rewards, group_size, kwargs, message",
    [
        (torch.zeros(10), 4, {}, r"N = 10 entries, not a multiple of group_size = 4"),
        (torch.zeros(8), 4, {"estimator": "rloo"}, r"estimator must be one of \('grpo', 'dr_grpo'\), got 'rloo'"),
        (torch.zeros(8), 0, {}, r"group_size must be an int >= 1, got 0"),
        (torch.zeros(2, 4), 4, {}, r"rewards must be 1-D \[N\], got shape \(2, 4\)"),
        (torch.zeros(8), 4, {"eps": -1.0}, r"eps must be >= 0"),
    ],
)
def test_errors(rewards, group_size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size, **kwargs)


def test_uniform_groups_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        uniform_groups(torch.zeros(5), 2)


def test_broadcast_to_tokens():
    per_sequence = torch.tensor([1.5, -2.0, 7.0, 0.25])
    cu_seqlens = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)  # lengths 3, 0, 1, 2
    expected = torch.tensor([1.5, 1.5, 1.5, 7.0, 0.25, 0.25])
    assert torch.equal(broadcast_to_tokens(per_sequence, cu_seqlens), expected)
    assert torch.equal(broadcast_to_tokens(per_sequence, cu_seqlens.long(), num_tokens=6), expected)
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \[B\+1\] = \(5,\)"):
        broadcast_to_tokens(per_sequence, cu_seqlens[:-1])
    with pytest.raises(ValueError, match=r"per_sequence must be 1-D"):
        broadcast_to_tokens(per_sequence[None], cu_seqlens)
    with pytest.raises(ValueError, match=r"cu_seqlens must be an integer tensor"):
        broadcast_to_tokens(per_sequence, cu_seqlens.float())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    num_groups=st.integers(1, 8),
    group_size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    estimator=st.sampled_from(["grpo", "dr_grpo"]),
)
def test_dropping_uniform_groups_commutes_with_advantages(num_groups, group_size, seed, estimator):
    """DAPO dynamic sampling: filtering first or after gives the same advantages; dropped ones are 0."""
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(num_groups * group_size, generator=gen) > 0.6).float()
    keep = kept_samples(rewards, group_size)
    assert keep.dtype == torch.bool and keep.shape == rewards.shape
    assert torch.equal(keep.view(num_groups, group_size).all(1), keep.view(num_groups, group_size).any(1))
    advantages = group_advantages(rewards, group_size, estimator=estimator)
    if group_size == 1:
        assert not bool(keep.any())  # a singleton group has no contrast
    else:
        assert torch.equal(advantages[~keep], torch.zeros(int((~keep).sum())))
        torch.testing.assert_close(
            group_advantages(rewards[keep], group_size, estimator=estimator), advantages[keep], rtol=0, atol=0
        )


def test_kept_samples_broadcast_to_tokens():
    """The sample mask and per-sample advantages broadcast to a packed batch's tokens."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group 0 mixed, group 1 uniform
    cu_seqlens = torch.tensor([0, 2, 5, 5, 6], dtype=torch.int32)  # lengths 2, 3, 0, 1
    keep = broadcast_to_tokens(kept_samples(rewards, 2), cu_seqlens)
    assert keep.tolist() == [True, True, True, True, True, False]
    advantages = broadcast_to_tokens(group_advantages(rewards, 2), cu_seqlens, num_tokens=6)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(advantages, torch.tensor([a, a, -a, -a, -a, 0.0]))


def test_no_groups_left():
    assert group_advantages(torch.zeros(0), 4).shape == (0,)
    assert kept_samples(torch.zeros(0), 4).shape == (0,)


def test_kept_samples_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        kept_samples(torch.zeros(5), 2)
