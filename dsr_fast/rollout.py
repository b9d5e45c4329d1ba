"""Rollout: batched sampling with a static KV cache, and weight sync from the trainer.

The built-in engine keeps its own copy of the policy (in the inference dtype). Per call it
prefills every distinct prompt once (packed, no padding), copies the prompt's cache row to the
other samples of its group, then decodes one token per row per step until every row has hit a
stop token or max_tokens.

Sampling is inverse-CDF with one uniform number per (request seed, position), drawn from a
counter-based hash instead of a stateful generator: the same request with the same seed gives the
same tokens whatever else is in the batch, and there is no generator state to carry into a
CUDA graph. Returned logprobs are log softmax(logits / temperature) of the sampled token (before
top-p truncation): the quantity the trainer recomputes, so the two can be compared directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .model import KVCache, Qwen2, Qwen2Config
from .packing import pack


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


# -----------------------------------------------------------------------------
# the engine


class BuiltinEngine:
    """Generation with our own Qwen2 and a static KV cache."""

    def __init__(self, config: Qwen2Config, *, dtype=torch.float32, device="cpu", max_batch: int = 256):
        with torch.device("meta"):
            model = Qwen2(config)
        self.model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
        if config.tie_word_embeddings:
            self.model.lm_head.weight = self.model.embed_tokens.weight
        self.dtype, self.device, self.max_batch = dtype, torch.device(device), max_batch

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's weights into ours in place; assert every parameter is written and no
        storage moved (a later CUDA graph holds these pointers)."""
        ours = self.model.state_dict()
        theirs = model.state_dict()
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"sync_weights: parameter names differ: {sorted(ours.keys() ^ theirs.keys())[:5]}")
        pointers = {name: t.data_ptr() for name, t in ours.items()}
        for name, dst in ours.items():
            src = theirs[name]
            if src.shape != dst.shape:
                raise RuntimeError(f"sync_weights: {name} has shape {tuple(src.shape)}, engine has {tuple(dst.shape)}")
            dst.copy_(src)
        moved = [n for n, t in self.model.state_dict().items() if t.data_ptr() != pointers[n]]
        assert not moved, f"sync_weights moved parameter storage: {moved[:5]}"

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int = 1,
        sampling: SamplingParams = SamplingParams(),
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """n samples for each prompt: result[i][j] is sample j of prompt i.

        seeds: one per request (len(prompt_ids) * n, prompt-major); default derived from
        sampling.seed and the request index.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        limit = self.model.config.max_position_embeddings
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sampling.max_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {sampling.max_tokens} > model limit {limit}")
        num_requests = len(prompt_ids) * n
        if seeds is None:
            all_seeds = request_seeds(sampling.seed, num_requests)
        elif len(seeds) != num_requests:
            raise ValueError(f"seeds: need one per request ({num_requests}), got {len(seeds)}")
        else:
            all_seeds = torch.tensor(list(seeds), dtype=torch.long)
        prompts_per_chunk = max(1, self.max_batch // n)
        results = []
        for start in range(0, len(prompt_ids), prompts_per_chunk):
            chunk = prompt_ids[start : start + prompts_per_chunk]
            chunk_seeds = all_seeds[start * n : (start + len(chunk)) * n]
            results.extend(self._generate_chunk(chunk, n, sampling, chunk_seeds))
        return results

    def _generate_chunk(self, prompts, n, sampling: SamplingParams, seeds) -> list[list[Completion]]:
        model, device = self.model, self.device
        P, rows, max_new = len(prompts), len(prompts) * n, sampling.max_tokens
        prompt_lens = torch.tensor([len(p) for p in prompts])
        cache = KVCache(model.config, rows, int(prompt_lens.max()) + max_new, self.dtype, device)

        # prefill each prompt once, into the first row of its group, then copy to the others
        batch = pack(prompts).to(device)
        first_row = torch.arange(P, device=device) * n
        cache_rows = torch.repeat_interleave(first_row, prompt_lens.to(device))
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, cache, cache_rows)
        if n > 1:
            group_rows = torch.arange(rows, device=device)
            cache.copy_rows(src=group_rows // n * n, dst=group_rows)
        last = hidden[batch.cu_seqlens[1:].long() - 1]  # [P, H]
        logits = model.logits(last).float().repeat_interleave(n, 0)  # [rows, V]

        seeds, positions = seeds.to(device), prompt_lens.to(device).repeat_interleave(n)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        tokens = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(max_new):
            tok, lp = sample(logits, sampling, seeds, positions)
            tokens[:, step], logprobs[:, step] = tok, lp
            lengths += (~done).long()
            done |= torch.isin(tok, stop_ids)
            if step == max_new - 1 or bool(done.all()):  # host sync once per step
                break
            logits = model.logits(model.decode(tok, positions, cache)).float()
            positions = positions + 1

        stopped = done.tolist()
        tokens, logprobs, lengths = tokens.tolist(), logprobs.tolist(), lengths.tolist()
        out = []
        for p in range(P):
            group = []
            for r in range(p * n, (p + 1) * n):
                L = lengths[r]
                group.append(Completion(tokens[r][:L], logprobs[r][:L], "stop" if stopped[r] else "length"))
            out.append(group)
        return out
