"""Sampling: request parameters, counter-based random numbers, inverse-CDF sampling.

Sampling is inverse-CDF with one uniform number per (request seed, position), drawn from a
counter-based hash instead of a stateful generator: the same request with the same seed gives the
same tokens whatever else is in the batch, whenever it is preempted and recomputed, and there is
no generator state to carry into a CUDA graph. Returned logprobs are log softmax(logits /
temperature) of the sampled token (before top-p truncation): the quantity the trainer
recomputes, so the two can be compared directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens, the stop token included when finish_reason == "stop"
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), one per token
    finish_reason: str  # "stop" | "length"


# -----------------------------------------------------------------------------
# sampling: small pure functions

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for 32-bit x, in int64 without overflow: multiply 16-bit halves
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32): good avalanche, a few int ops."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def request_seeds(base_seed: int, num_requests: int) -> torch.Tensor:
    """Independent per-request seeds derived from one base seed and the request index."""
    index = torch.arange(num_requests, dtype=torch.long)
    return hash32(hash32(torch.full_like(index, base_seed & _MASK32)) ^ hash32(index + (base_seed >> 32)))


def uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One U(0,1) float per row, a pure function of (seed, position)."""
    bits = hash32(hash32(seeds) ^ positions)
    return ((bits >> 8).double() + 0.5) / (1 << 24)  # 24 random bits, never exactly 0 or 1


def sample(logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor, positions: torch.Tensor):
    """logits [rows, V] fp32 -> (tokens [rows], logprobs [rows])."""
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
        return tokens, logprobs
    logp = torch.log_softmax(logits / sampling.temperature, -1)
    probs = logp.exp()
    order = None
    if sampling.top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    cdf = probs.double().cumsum(-1)
    u = uniform(seeds, positions).to(cdf.device) * cdf[:, -1]
    index = torch.searchsorted(cdf, u[:, None]).clamp_(max=logits.shape[-1] - 1)
    tokens = (order.gather(1, index) if order is not None else index)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def check_requests(prompt_ids, n: int, sampling: SamplingParams, seeds, limit: int, limit_name: str) -> int:
    """The number of requests of a generate call, after the checks every engine makes."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + sampling.max_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {sampling.max_tokens} > {limit_name} limit {limit}")
    num_requests = len(prompt_ids) * n
    if seeds is not None and len(seeds) != num_requests:
        raise ValueError(f"seeds: need one per request ({num_requests}), got {len(seeds)}")
    return num_requests
