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
from .distributed import full_tensor
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


class BuiltinEngine:
    """Generation with our own Qwen2: static KV cache, continuous batching, optional CUDA graph.

    Every request (a prompt's sample) takes a cache row ("slot"); when a request finishes, its
    slot is refilled with the next waiting one, so long responses do not hold short ones back.
    Newly admitted prompts are prefilled together (packed, no padding), once per distinct prompt,
    and copied to the rows of the prompt's other samples. Decode runs one token for every slot
    per step with unchanging shapes; on CUDA that step is captured in a CUDA graph.

    model: share this module's weights (trainer and engine in one process, same dtype: no copy,
    sync_weights is then a no-op). Otherwise the engine keeps its own copy, written in place by
    sync_weights.
    """

    def __init__(
        self,
        config: Qwen2Config,
        *,
        dtype=torch.float32,
        device="cpu",
        max_batch: int = 256,
        model: Qwen2 | None = None,
        cuda_graph: bool = True,
        sync_every: int | None = None,
    ):
        self.device = torch.device(device)
        if model is not None:
            self.model, self.shares_weights = model, True
        else:
            with torch.device("meta"):
                own = Qwen2(config)
            self.model = own.to_empty(device=self.device).to(dtype).eval().requires_grad_(False)
            if config.tie_word_embeddings:
                self.model.lm_head.weight = self.model.embed_tokens.weight
            self.shares_weights = False
        self.dtype = next(self.model.parameters()).dtype
        self.max_batch = max_batch
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        # Finished rows are found by a host sync; on a GPU only every few steps (the rows that
        # finished in between decode a few wasted tokens), on a CPU every step.
        self.sync_every = sync_every or (8 if self.device.type == "cuda" else 1)
        self._cache: KVCache | None = None
        self._graph: _DecodeGraph | None = None
        self._last_shape: tuple[int, int] | None = None

    # ---- weights and memory

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's weights into ours in place; assert every parameter is written and no
        storage moved (a captured CUDA graph holds these pointers)."""
        if self.shares_weights:
            assert model is self.model, "this engine shares another module's weights"
            return
        ours = self.model.state_dict()
        theirs = model.state_dict()
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"sync_weights: parameter names differ: {sorted(ours.keys() ^ theirs.keys())[:5]}")
        pointers = {name: t.data_ptr() for name, t in ours.items()}
        for name, dst in ours.items():
            src = theirs[name]
            src = full_tensor(src)  # an FSDP2 shard is gathered (every rank syncs in the same order)
            if src.shape != dst.shape:
                raise RuntimeError(f"sync_weights: {name} has shape {tuple(src.shape)}, engine has {tuple(dst.shape)}")
            dst.copy_(src)
        moved = [n for n, t in self.model.state_dict().items() if t.data_ptr() != pointers[n]]
        assert not moved, f"sync_weights moved parameter storage: {moved[:5]}"

    def sleep(self) -> None:
        """Free the KV cache (and the graph that points into it) while the trainer needs memory."""
        self._graph = self._cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Allocate the cache of the last generate call again, before the next rollout."""
        if self._cache is None and self._last_shape is not None:
            self._cache_for(*self._last_shape)

    def close(self) -> None:
        self.sleep()

    def _cache_for(self, rows: int, max_len: int) -> KVCache:
        c = self._cache
        if c is None or c.rows != rows or c.max_len < max_len:
            self._graph = self._cache = None  # the old graph points into the old cache
            self._cache = KVCache(self.model.config, rows, max_len, self.dtype, self.device)
        self._last_shape = (rows, self._cache.max_len)
        return self._cache

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [rows, V] fp32 of one decode step over every cache row.

        length bounds every position + 1. Eager decode attends over that much of the cache; the
        CUDA graph over all of it (its shapes are fixed at capture)."""
        if self.cuda_graph:
            if self._graph is None:
                self._graph = _DecodeGraph(self.model, self._cache, tokens, positions)
            return self._graph.run(tokens, positions)
        length = min(self._cache.max_len, -(-length // 16) * 16)  # few distinct shapes
        return self.model.logits(self.model.decode(tokens, positions, self._cache, length)).float()

    # ---- generation

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
        sampling.seed and the request index. A request's tokens depend only on its prompt, its
        seed and the weights, not on what else is in the batch.
        """
        num_requests = check_requests(prompt_ids, n, sampling, seeds, self.model.config.max_position_embeddings, "model")
        seeds = request_seeds(sampling.seed, num_requests) if seeds is None else torch.tensor(list(seeds), dtype=torch.long)
        if num_requests == 0:
            return []
        rows = min(self.max_batch, num_requests)
        # room for the longest prompt, max_tokens, and the steps a finished row runs on before
        # the next sync; rounded up so that calls of similar size reuse the cache (and graph)
        need = max(len(p) for p in prompt_ids) + sampling.max_tokens + self.sync_every
        run = _Run(self, prompt_ids, n, sampling, seeds, rows, -(-need // 64) * 64)
        return run.loop()


class _Run:
    """The state of one generate call: which request sits in which slot, and the device buffers."""

    def __init__(self, engine: BuiltinEngine, prompts, n, sampling: SamplingParams, seeds, rows: int, max_len: int):
        self.engine, self.prompts, self.n, self.sampling = engine, prompts, n, sampling
        self.cache = engine._cache_for(rows, max_len)
        rows, dev = self.cache.rows, engine.device
        self.seeds_by_request = seeds
        self.pending = list(range(len(prompts) * n))[::-1]  # pop() takes the next request
        self.slot_request = [-1] * rows
        self.started = [(0, 0)] * rows  # per slot: (prompt length, step admitted)
        self.step = 0
        self.results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=dev)
        width = sampling.max_tokens + engine.sync_every
        self.out_tokens = torch.zeros(rows, width, dtype=torch.long, device=dev)
        self.out_logprobs = torch.zeros(rows, width, dtype=torch.float32, device=dev)
        self.count = torch.zeros(rows, dtype=torch.long, device=dev)
        self.live = torch.zeros(rows, dtype=torch.bool, device=dev)  # admitted and not finished
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(rows, dtype=torch.long, device=dev)
        self.logits = torch.zeros(rows, engine.model.config.vocab_size, dtype=torch.float32, device=dev)

    def loop(self) -> list[list[Completion]]:
        self.admit()
        while True:
            tokens, logprobs = sample(self.logits, self.sampling, self.seeds, self.positions)
            live = self.live
            index = self.count.clamp(max=self.out_tokens.shape[1] - 1)[:, None]
            self.out_tokens.scatter_(1, index, torch.where(live, tokens, self.out_tokens.gather(1, index)[:, 0])[:, None])
            self.out_logprobs.scatter_(1, index, torch.where(live, logprobs, self.out_logprobs.gather(1, index)[:, 0])[:, None])
            self.count += live.long()
            finished = live & (torch.isin(tokens, self.stop_ids) | (self.count >= self.sampling.max_tokens))
            self.live = live & ~finished
            self.logits = self.engine._decode(tokens, self.positions, self.length_bound(self.step))
            self.positions = self.positions + self.live.long()  # rows not generating stay put
            self.step += 1
            # with nothing waiting, sync every step so that the call returns promptly
            if self.step % self.engine.sync_every == 0 or not self.pending:
                self.collect_finished()
                if not self.pending and all(r < 0 for r in self.slot_request):
                    return self.results
                self.admit()

    def length_bound(self, step: int) -> int:
        """max(position) + 1 over the occupied rows, from host-side bookkeeping (no sync): a row
        admitted at step a with a prompt of L tokens is at most at position L + (step - a).
        Free rows decode garbage that nobody reads, so they need no bound."""
        occupied = [start + step - admitted for (start, admitted), r in zip(self.started, self.slot_request) if r >= 0]
        return max(occupied, default=0) + 1

    def collect_finished(self) -> None:
        """Turn finished rows into Completions and free their slots (one host sync)."""
        live = self.live.tolist()
        done = [s for s, r in enumerate(self.slot_request) if r >= 0 and not live[s]]
        if not done:
            return
        counts = self.count[done].tolist()
        tokens = self.out_tokens[done].tolist()
        logprobs = self.out_logprobs[done].tolist()
        stops = set(self.sampling.stop_token_ids)
        for s, c, toks, lps in zip(done, counts, tokens, logprobs):
            r = self.slot_request[s]
            reason = "stop" if toks[c - 1] in stops else "length"
            self.results[r // self.n][r % self.n] = Completion(toks[:c], lps[:c], reason)
            self.slot_request[s] = -1

    def admit(self) -> None:
        """Fill free slots with waiting requests: one packed prefill for their distinct prompts."""
        free = [s for s, r in enumerate(self.slot_request) if r < 0]
        if not free or not self.pending:
            return
        taken = [(s, self.pending.pop()) for s in free[: len(self.pending)]]
        first_slot: dict[int, int] = {}  # prompt index -> the slot its prefill is written to
        for s, r in taken:
            self.slot_request[s] = r
            self.started[s] = (len(self.prompts[r // self.n]), self.step)
            first_slot.setdefault(r // self.n, s)
        prompts = list(first_slot)
        dev, model, cache = self.engine.device, self.engine.model, self.cache
        lens = torch.tensor([len(self.prompts[p]) for p in prompts])
        batch = pack([self.prompts[p] for p in prompts]).to(dev)
        cache_rows = torch.repeat_interleave(torch.tensor(list(first_slot.values()), device=dev), lens.to(dev))
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, cache, cache_rows)
        prompt_logits = model.logits(hidden[batch.cu_seqlens[1:].long() - 1]).float()  # [distinct prompts, V]

        slots = torch.tensor([s for s, _ in taken], device=dev)
        src = torch.tensor([first_slot[r // self.n] for _, r in taken], device=dev)
        which = torch.tensor([prompts.index(r // self.n) for _, r in taken], device=dev)
        copies = slots != src
        if bool(copies.any()):  # other samples of a prompt start from its prefilled row
            cache.copy_rows(src=src[copies], dst=slots[copies])
        self.logits[slots] = prompt_logits[which]
        self.positions[slots] = lens.to(dev)[which]
        self.count[slots] = 0
        self.live[slots] = True
        self.seeds[slots] = self.seeds_by_request[[r for _, r in taken]].to(dev)


class _DecodeGraph:
    """One decode step (model + lm_head) captured in a CUDA graph over static input buffers.

    Replays reuse the same memory for inputs, cache and logits; weights are read through their
    (unchanging) storage, so in-place weight syncs are seen by the next replay.
    """

    def __init__(self, model: Qwen2, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor):
        self.tokens, self.positions = tokens.clone(), positions.clone()
        step = lambda: model.logits(model.decode(self.tokens, self.positions, cache)).float()  # noqa: E731
        # warm up on a side stream (allocations and lazy init must happen outside the capture);
        # the warm-up writes K/V only at the current positions, which the real step rewrites
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
