"""HF drop-in (hf_logprobs + grpo_loss) vs HF's own logits path (model(...).logits → log-softmax).

A Qwen2 causal LM with the real 151,936-word vocabulary and a small body, one packed row of
tokens, every next token scored (as for a completion), temperature 0.6, DeepScaleR's loss (PPO
clip 0.2, k3 KL 0.001, entropy bonus 0.001, token-mean). Two workloads:

    fwd      old/ref logprobs: no grad, logprobs only
    fwd_bwd  policy step: logprobs + entropy → loss → backward into every parameter

and two implementations, sharing model and inputs:

    dsr_fast  hf_logprobs (body → fused head, no logits) + grpo_loss
    hf        model(...).logits / T, selective log-softmax and entropy from the full logits,
              the same loss in plain torch (what a TRL-style trainer runs)

Sizes: CPU T=1,024, H=128 (2 layers); with --real-sizes on a GPU T=8,192, H=1,536 (2 layers,
bf16), the head of DeepSeek-R1-Distill-Qwen-1.5B. extra_info records peak_extra_MB: the peak
memory of one step above what was allocated before it (dsr_fast.memory: the CUDA allocator's peak,
or on CPU the profiler's allocation events replayed), next to fp32_logits_MB, the size of one [T, V] fp32
logits tensor. On CPU the measured call is also the warm-up; on a GPU a warm-up call (Triton JIT)
comes first.
"""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsr_fast.kernels import grpo_loss, hf_logprobs
from dsr_fast.memory import peak_extra_bytes

VOCAB = 151_936
TEMPERATURE, CLIP, KL_COEF, ENTROPY_COEF = 0.6, 0.2, 0.001, 0.001


def make_setup(real: bool, device):
    hidden, tokens = (1536, 8192) if real else (128, 1024)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden if not real else 8960,
        num_hidden_layers=2, num_attention_heads=12 if real else 4, num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16 if real else torch.float32)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (1, tokens), generator=gen).to(device)
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    scored = (labels != -100).reshape(-1)
    extra = dict(
        old=-5.0 + 0.1 * torch.randn(tokens, generator=gen), ref=-5.0 + 0.1 * torch.randn(tokens, generator=gen),
        advantages=torch.randn(tokens, generator=gen),
    )
    extra = {k: v.to(device) for k, v in extra.items()}
    return model, input_ids, labels, scored, extra


def hf_path(model, input_ids, labels, with_entropy: bool):
    """TRL-style: full logits, tempered, selective log-softmax (+ entropy from the logits)."""
    logits = model(input_ids=input_ids).logits.float() / TEMPERATURE
    index = labels.clamp_min(0).unsqueeze(-1)
    logps = (logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)).reshape(-1)
    if not with_entropy:
        return logps, None
    probs = torch.softmax(logits, dim=-1)
    entropy = (torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)).reshape(-1)
    return logps, entropy


def hf_loss(logps, entropy, scored, x):
    ratio = torch.exp(logps - x["old"])
    pg = torch.maximum(-x["advantages"] * ratio, -x["advantages"] * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = x["ref"] - logps
    kl = (torch.exp(d) - d - 1).clamp(-10, 10)
    per_token = pg + KL_COEF * kl - ENTROPY_COEF * entropy
    return torch.where(scored, per_token, 0.0).sum() / scored.sum()


def step_fn(impl: str, workload: str, model, input_ids, labels, scored, x):
    cu_seqlens = torch.tensor([0, input_ids.shape[1]], device=input_ids.device)

    def step():
        model.zero_grad(set_to_none=True)
        if workload == "fwd":
            with torch.no_grad():
                if impl == "dsr_fast":
                    return hf_logprobs(model, input_ids, labels, temperature=TEMPERATURE)[0]
                return hf_path(model, input_ids, labels, with_entropy=False)[0]
        if impl == "dsr_fast":
            logps, entropy = hf_logprobs(model, input_ids, labels, temperature=TEMPERATURE, return_entropy=True)
            loss, _ = grpo_loss(
                logps.reshape(-1), x["old"], x["advantages"], cu_seqlens, ref_logprobs=x["ref"],
                entropy=entropy.reshape(-1), loss_mask=scored, clip_low=CLIP, clip_high=CLIP, kl_coef=KL_COEF,
                entropy_coef=ENTROPY_COEF,
            )
        else:
            logps, entropy = hf_path(model, input_ids, labels, with_entropy=True)
            loss = hf_loss(logps, entropy, scored, x)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("workload", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["dsr_fast", "hf"])
def test_hf_dropin(benchmark, impl, workload, real_sizes, device):
    model, input_ids, labels, scored, x = make_setup(real_sizes, device)
    step = step_fn(impl, workload, model, input_ids, labels, scored, x)
    cuda = device.type == "cuda"

    def timed():
        step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        timed()  # Triton JIT, outside both measurements
    # On CPU the measured call doubles as the warm-up: a step takes seconds there.
    peak = peak_extra_bytes(timed, device)
    benchmark.group = f"hf drop-in {workload}, T={input_ids.shape[1]}, V={VOCAB}"
    benchmark.pedantic(timed, rounds=10 if cuda else 2, iterations=1, warmup_rounds=0)
    tokens = input_ids.shape[1]
    logits_bytes = tokens * VOCAB * 4
    benchmark.extra_info.update(
        tokens=tokens, hidden=model.config.hidden_size, vocab=VOCAB,
        tokens_per_s=tokens / benchmark.stats.stats.median,
        peak_extra_MB=None if peak is None else peak / 2**20,
        fp32_logits_MB=logits_bytes / 2**20,
    )
