"""Supervised fine-tuning on (prompt, response) token pairs: the warm-start before RL.

Packed batches, loss = mean negative logprob of the response tokens (prompt tokens are context
only), computed by the model's fused head so the [T, V] logits are never built.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .packing import IGNORE_INDEX, pack


def response_labels(prompt_lens: Sequence[int], batch) -> torch.Tensor:
    """Labels that count only response tokens: the prompt's own next tokens become IGNORE_INDEX."""
    labels = batch.labels.clone()
    starts = batch.cu_seqlens[:-1].long()
    for start, plen in zip(starts.tolist(), prompt_lens):
        labels[start : start + plen - 1] = IGNORE_INDEX  # positions before the last prompt token
    return labels


def supervised_finetune(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    device="cpu",
) -> list[float]:
    """AdamW with linear warm-up then cosine decay; returns the loss of every step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="warm-start", leave=False):
        chosen = rng.sample(examples, min(batch_size, len(examples)))
        batch = pack([p + r for p, r in chosen]).to(device)
        labels = response_labels([len(p) for p, _ in chosen], batch)
        logprobs, _ = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, labels=labels)
        loss = -logprobs.sum() / (labels != IGNORE_INDEX).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
