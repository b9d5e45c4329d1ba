"""hf_logprobs + grpo_loss vs the TRL-style path on tiny random transformers models.

The reference is what a TRL-style trainer runs: the model's own logits, divided by the
temperature, `selective_log_softmax` and `entropy_from_logits` (written here from their
definitions), and a PPO-clip loss with k3 KL and an entropy bonus in plain torch. Our side is the
two library calls. Both must give the same per-token logprobs and entropy, the same loss and the
same gradient on every parameter (fp32), for padded and packed inputs and tied and untied heads.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsr_fast.kernels import grpo_loss, hf_logprobs, next_token_labels

VOCAB, HIDDEN = 97, 32
TEMPERATURE = 0.6
CLIP_LOW, CLIP_HIGH, KL_COEF, ENTROPY_COEF = 0.2, 0.28, 0.05, 0.01


def make_model(kind: str, tied: bool, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **config,
    )
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common))
    else:
        raise ValueError(kind)
    model.float()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


# ---------------------------------------------------------------------------------------------
# TRL-style reference
# ---------------------------------------------------------------------------------------------


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] with the full logits (TRL's fp32 branch)."""
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def reference_loss(logps, old_logps, advantages, ref_logps, entropy, mask, loss_type: str) -> torch.Tensor:
    """TRL's GRPO loss on [B, L] tensors: "grpo" = mean over sequences of token-means, "bnpo" = token-mean."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages[:, None]
    clipped = torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * advantages[:, None]
    # k3 without clamps: the inputs keep |ref − logp| far below the kernel's ±20 / [−10, 10] clamps.
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    per_token = -torch.min(unclipped, clipped) + KL_COEF * kl - ENTROPY_COEF * entropy
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    return (per_token * mask).sum() / mask.sum()


AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean"}


def ours_loss(logps, old_logps, advantages, ref_logps, entropy, mask, cu_seqlens, loss_type: str):
    loss, _ = grpo_loss(
        logps, old_logps, advantages, cu_seqlens, ref_logprobs=ref_logps, entropy=entropy,
        loss_mask=mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF, kl_type="k3",
        entropy_coef=ENTROPY_COEF, agg=AGG[loss_type], backend="torch",
    )
    return loss


def take_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for name, grad in ref.items():
        assert grad.abs().max() > 0, f"reference grad of {name} is zero: the test would prove nothing"
        # atol relative to the tensor's scale: single entries near 0 carry no relative precision.
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def padded_batch(seed: int = 0):
    """TRL's layout: left-padded prompts, right-padded completions. Returns (input_ids, attention_mask,
    completion_mask), all [B, L]."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens, completion_lens = [4, 2, 5], [6, 3, 1]
    prompt_width, completion_width = max(prompt_lens), max(completion_lens)
    rows, attn, comp = [], [], []
    for p, c in zip(prompt_lens, completion_lens):
        pad_left, pad_right = prompt_width - p, completion_width - c
        ids = torch.randint(0, VOCAB, (prompt_width + completion_width,), generator=gen)
        rows.append(ids)
        attn.append(torch.tensor([0] * pad_left + [1] * (p + c) + [0] * pad_right))
        comp.append(torch.tensor([0] * prompt_width + [1] * c + [0] * pad_right, dtype=torch.bool))
    return torch.stack(rows), torch.stack(attn), torch.stack(comp)


def policy_inputs(shape, seed: int = 1):
    """(advantages [B], noise for old and ref logprobs [B, L]): ratios spread over both clip edges."""
    gen = torch.Generator().manual_seed(seed)
    advantages = torch.randn(shape[0], generator=gen)
    return advantages, 0.3 * torch.randn(shape, generator=gen), 0.3 * torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,tied,loss_type",
    [("qwen2", True, "bnpo"), ("qwen2", False, "grpo"), ("llama", False, "bnpo"), ("llama", True, "grpo")],
)
def test_padded_batch_matches_trl_path(kind, tied, loss_type):
    model = make_model(kind, tied)
    input_ids, attention_mask, completion_mask = padded_batch()
    advantages, old_noise, ref_noise = policy_inputs(input_ids[:, 1:].shape)
    mask = completion_mask[:, 1:]  # logits[:, t] score input_ids[:, t + 1]

    # TRL-style: full logits, shifted, tempered.
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / TEMPERATURE
    ref_logps = selective_log_softmax(logits, input_ids[:, 1:])
    ref_entropy = entropy_from_logits(logits)
    old_logps, kl_ref_logps = ref_logps.detach() + old_noise, ref_logps.detach() + ref_noise
    ref_loss = reference_loss(ref_logps, old_logps, advantages, kl_ref_logps, ref_entropy, mask, loss_type)
    ref_loss.backward()
    ref_grads = take_grads(model)

    # Ours: the HF helper (no logits) and grpo_loss over the flattened [B, L-1] grid.
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = torch.where(mask, input_ids[:, 1:], -100)
    logps, entropy = hf_logprobs(
        model, input_ids, labels, attention_mask=attention_mask, temperature=TEMPERATURE, return_entropy=True
    )
    assert logps.shape == entropy.shape == input_ids.shape and logps.dtype == torch.float32
    torch.testing.assert_close(logps[:, :-1][mask], ref_logps[mask].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[:, :-1][mask], ref_entropy[mask].detach(), rtol=1e-5, atol=1e-5)
    assert (logps[:, :-1][~mask] == 0).all() and (entropy[:, -1] == 0).all()

    batch, width = mask.shape
    cu_seqlens = torch.arange(batch + 1) * width
    loss = ours_loss(
        logps[:, :-1].reshape(-1), old_logps.reshape(-1), advantages.repeat_interleave(width),
        kl_ref_logps.reshape(-1), entropy[:, :-1].reshape(-1), mask.reshape(-1), cu_seqlens, loss_type,
    )
    loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7)
    assert_same_grads(take_grads(model), ref_grads)


@pytest.mark.parametrize("kind,tied,boundaries", [("qwen2", True, "cu_seqlens"), ("llama", False, "position_ids")])
def test_packed_batch_matches_padded_trl_path(kind, tied, boundaries):
    """Packed [1, T] tokens through our helper vs the same sequences right-padded through HF's logits."""
    model = make_model(kind, tied)
    gen = torch.Generator().manual_seed(2)
    lengths, prompt_lens = [5, 9, 3, 7], [2, 4, 1, 3]
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    width = max(lengths)

    padded = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(padded)
    completion = torch.zeros_like(padded, dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        padded[i, : len(seq)], attention_mask[i, : len(seq)], completion[i, p : len(seq)] = seq, 1, True
    mask = completion[:, 1:]
    advantages, old_noise, ref_noise = policy_inputs(mask.shape)

    logits = model(input_ids=padded, attention_mask=attention_mask).logits[:, :-1] / TEMPERATURE
    ref_logps = selective_log_softmax(logits, padded[:, 1:])
    ref_entropy = entropy_from_logits(logits)
    old_logps, kl_ref_logps = ref_logps.detach() + old_noise, ref_logps.detach() + ref_noise
    ref_loss = reference_loss(ref_logps, old_logps, advantages, kl_ref_logps, ref_entropy, mask, "grpo")
    ref_loss.backward()
    ref_grads = take_grads(model)

    # Packed: token t of sequence i sits at cu_seqlens[i] + t; its label is the next token of the
    # same sequence, scored only where the reference scores it.
    packed = torch.cat(sequences).unsqueeze(0)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    where = [(i, t) for i, n in enumerate(lengths) for t in range(n)]

    def pad(grid: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(grid, (0, 1))  # [B, L-1] → [B, L]

    def flat(grid: torch.Tensor) -> torch.Tensor:
        """[B, L] padded grid → [T] packed tokens."""
        return torch.stack([grid[i, t] for i, t in where])

    scored = flat(pad(mask))
    labels = next_token_labels(packed, cu_seqlens=cu_seqlens).masked_fill(~scored.unsqueeze(0), -100)
    assert (labels[0, cu_seqlens[1:] - 1] == -100).all()  # no label crosses into the next sequence
    kwargs = {"cu_seqlens": cu_seqlens} if boundaries == "cu_seqlens" else {"position_ids": position_ids}
    logps, entropy = hf_logprobs(model, packed, labels, temperature=TEMPERATURE, return_entropy=True, **kwargs)

    torch.testing.assert_close(logps[0][scored], flat(pad(ref_logps.detach()))[scored], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[0][scored], flat(pad(ref_entropy.detach()))[scored], rtol=1e-5, atol=1e-5)

    loss = ours_loss(
        logps[0], flat(pad(old_logps)), flat(pad(advantages[:, None].expand_as(mask))), flat(pad(kl_ref_logps)),
        entropy[0], scored, cu_seqlens, "grpo",
    )
    loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7)
    assert_same_grads(take_grads(model), ref_grads)


def test_lm_head_bias_is_included():
    model = make_model("qwen2", tied=False)
    with torch.no_grad():
        biased = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
        biased.weight.copy_(model.lm_head.weight)
        biased.bias.normal_(0, 2.0)  # large enough that dropping it would be far outside tolerance
    model.lm_head = biased
    input_ids, attention_mask, _ = padded_batch()
    labels = next_token_labels(input_ids, attention_mask=attention_mask)
    valid = labels != -100

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits / TEMPERATURE
    ref = selective_log_softmax(logits, labels.clamp_min(0))
    (ref[valid] * torch.linspace(-1, 1, int(valid.sum()))).sum().backward()
    ref_grads = take_grads(model)

    logps, _ = hf_logprobs(model, input_ids, attention_mask=attention_mask, temperature=TEMPERATURE)
    torch.testing.assert_close(logps[valid], ref[valid].detach(), rtol=1e-5, atol=1e-5)
    (logps[valid] * torch.linspace(-1, 1, int(valid.sum()))).sum().backward()
    assert_same_grads(take_grads(model), ref_grads)


def test_constant_logit_factor_is_folded_into_temperature():
    model = make_model("granite", tied=False, logits_scaling=2.5)  # Granite divides its logits by 2.5
    input_ids, attention_mask, _ = padded_batch()
    labels = next_token_labels(input_ids, attention_mask=attention_mask)
    valid = labels != -100
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits / TEMPERATURE
        logps, entropy = hf_logprobs(
            model, input_ids, attention_mask=attention_mask, temperature=TEMPERATURE, return_entropy=True
        )
    torch.testing.assert_close(logps[valid], selective_log_softmax(logits, labels.clamp_min(0))[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[valid], entropy_from_logits(logits)[valid], rtol=1e-5, atol=1e-5)


def test_soft_capped_logits_are_refused():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )
    model = transformers.Gemma2ForCausalLM(config)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        hf_logprobs(model, torch.randint(0, VOCAB, (1, 4)))


def test_no_grad_path_and_default_labels_match_model_logits():
    """Old/reference logprobs: under no_grad, default next-token labels, 1-D packed input_ids."""
    model = make_model("qwen2", tied=True)
    gen = torch.Generator().manual_seed(3)
    lengths = [4, 6]
    packed = torch.randint(0, VOCAB, (sum(lengths),), generator=gen)
    cu_seqlens = torch.tensor([0, 4, 10])
    with torch.no_grad():
        logps, entropy = hf_logprobs(model, packed, cu_seqlens=cu_seqlens)
        # Each sequence alone through HF: no packing machinery involved on this side.
        expected = []
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            seq = packed[start:end]
            logits = model(input_ids=seq.unsqueeze(0)).logits[0, :-1]
            expected.append(torch.cat([selective_log_softmax(logits, seq[1:]), torch.zeros(1)]))
    assert entropy is None and logps.shape == packed.shape and logps.grad_fn is None
    torch.testing.assert_close(logps, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    model = make_model("qwen2", tied=True)
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        hf_logprobs(model, ids[:1], attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        hf_logprobs(model, ids, ids[:, :3])
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        hf_logprobs(model, ids, cu_seqlens=torch.tensor([0, 5, 10]))
