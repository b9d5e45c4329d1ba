"""BuiltinEngine: generation with our own Qwen2 over a paged KV cache.

Per generate call: requests (one per sample of each prompt) queue in the scheduler; each loop
step either admits what fits and prefills it (a prompt once, its other samples forking its
blocks), or decodes one token for every running sequence. Finished sequences release their
blocks at once, so the next waiting request starts as soon as there is room. The host learns
the sampled tokens every step (one sync): block growth, stops and admissions need them.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from ..model import Qwen2, Qwen2Config
from .blocks import BlockPool, blocks_for
from .budget import pool_blocks
from .runner import ModelRunner
from .sampling import Completion, SamplingParams, check_requests, request_seeds, sample
from .scheduler import Scheduler, Sequence
from .weights import build_fused_copy, copy_weights_in_place


class BuiltinEngine:
    """Rollout engine: paged KV cache under a memory budget, continuous batching with
    preemption by recompute, shared prompt blocks, CUDA graphs per batch bucket.

    max_batch: ceiling on concurrent sequences; the KV budget decides how many actually run.
    kv_cache_tokens: exact pool size in tokens; else kv_cache_memory, the share of free device
      memory the pool takes at allocation (CPU: 256 MiB), see budget.py.
    model: share this module's weights (trainer and engine in one process, same dtype: no copy,
      sync_weights is then a no-op). Otherwise the engine keeps its own copy (fused q/k/v and
      gate/up), written in place by sync_weights.
    stats: a dict refreshed by each generate call (peak_kv_tokens, kv_capacity_tokens,
      block_size, preemptions, decode_steps, ...).
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
        kv_cache_tokens: int | None = None,
        kv_cache_memory: float = 0.85,
        block_size: int = 16,
        max_prefill_tokens: int = 16384,
        attention: str = "auto",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        if model is not None:
            self.model, self.fused, self.shares_weights = model, None, True
        else:
            self.model, self.fused = build_fused_copy(config, dtype, self.device)
            self.shares_weights = False
        self.dtype = next(self.model.parameters()).dtype
        self.max_batch, self.block_size, self.max_prefill_tokens = max_batch, block_size, max_prefill_tokens
        self.kv_cache_tokens, self.kv_cache_memory = kv_cache_tokens, kv_cache_memory
        self.cuda_graph, self.attention = cuda_graph, attention
        self.runner: ModelRunner | None = None
        self._was_awake = False
        self.stats: dict = {}

    # ---- weights and memory

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's weights into ours in place (no storage moves: graphs keep working)."""
        if self.shares_weights:
            assert model is self.model, "this engine shares another module's weights"
            return
        copy_weights_in_place(self.model, model)

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            blocks = pool_blocks(self.model.config, self.dtype, self.device, self.block_size,
                                 self.kv_cache_tokens, self.kv_cache_memory)
            self.runner = ModelRunner(self.model, self.fused, num_blocks=blocks, block_size=self.block_size,
                                      max_seqs=self.max_batch, device=self.device, cuda_graph=self.cuda_graph,
                                      attention=self.attention)
            self._was_awake = True
        return self.runner

    def sleep(self) -> None:
        """Free the KV pool (and the graphs that point into it) while the trainer needs memory."""
        self.runner = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Allocate the pool again (sized from the memory free now) before the next rollout."""
        if self._was_awake:
            self._runner()

    def close(self) -> None:
        self.sleep()
        self._was_awake = False

    # ---- generation

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Seq[Seq[int]],
        n: int = 1,
        sampling: SamplingParams = SamplingParams(),
        seeds: Seq[int] | None = None,
    ) -> list[list[Completion]]:
        """n samples for each prompt: result[i][j] is sample j of prompt i.

        seeds: one per request (len(prompt_ids) * n, prompt-major); default derived from
        sampling.seed and the request index. A request's tokens depend only on its prompt, its
        seed and the weights: not on the batch, the KV budget or preemptions.
        """
        num_requests = check_requests(prompt_ids, n, sampling, seeds, self.model.config.max_position_embeddings, "model")
        seeds = request_seeds(sampling.seed, num_requests).tolist() if seeds is None else [int(s) for s in seeds]
        if num_requests == 0:
            return []
        runner = self._runner()
        pool = BlockPool(runner.num_blocks, self.block_size)
        capacity = pool.capacity_blocks * self.block_size
        for i, p in enumerate(prompt_ids):
            # the worst case of one sequence is the whole pool; checked before any work is done
            if blocks_for(len(p) + sampling.max_tokens, self.block_size) > pool.capacity_blocks:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {sampling.max_tokens} cannot fit in the "
                                 f"KV pool ({capacity} tokens); raise kv_cache_tokens / kv_cache_memory")
        sched = Scheduler(pool, self.max_batch, runner.max_blocks_per_seq, self.max_prefill_tokens)
        for r in range(num_requests):
            p = r // n
            sched.add(Sequence(r, p, list(prompt_ids[p]), len(prompt_ids[p]), seeds[r]))
        run = _Run(runner, sched, sampling, n, len(prompt_ids))
        results = run.loop()
        self.stats = {
            "peak_kv_tokens": pool.peak_used * self.block_size,
            "kv_capacity_tokens": capacity,
            "block_size": self.block_size,
            "preemptions": sched.preemptions,
            "decode_steps": run.decode_steps,
            "prefill_steps": run.prefill_steps,
            "prefill_tokens": run.prefill_tokens,
            "peak_running": sched.peak_running,
            "generated_tokens": run.generated,
            "kv_pool_bytes": runner.pool_bytes,
        }
        return results


class _Run:
    """The loop of one generate call."""

    def __init__(self, runner: ModelRunner, sched: Scheduler, sampling: SamplingParams, n: int, num_prompts: int):
        self.runner, self.sched, self.sampling, self.n = runner, sched, sampling, n
        self.stops = set(sampling.stop_token_ids)
        self.results: list[list[Completion | None]] = [[None] * n for _ in range(num_prompts)]
        # a prompt's last-position logits, kept while some sample of it has not started: a later
        # sample forks the prompt's blocks and samples its first token from them
        self.prompt_logits: dict[int, torch.Tensor] = {}
        self.unstarted = [n] * num_prompts
        self.decode_steps = self.prefill_steps = self.prefill_tokens = self.generated = 0

    def loop(self) -> list[list[Completion]]:
        sched, runner = self.sched, self.runner
        while sched.has_work():
            fresh, forks = sched.admit(set(self.prompt_logits))
            if fresh or forks:
                batch, logits = self.prefill(fresh, forks)
            else:
                sched.grow()
                batch = list(sched.running)
                if not batch:  # the only sequence was preempted; it is readmitted next
                    continue
                logits = runner.decode(batch, sched.block_table)
                for seq in batch:
                    seq.num_cached += 1
                self.decode_steps += 1
            self.sample(batch, logits)
        return self.results

    def prefill(self, fresh: list[Sequence], forks: list[tuple[Sequence, Sequence]]):
        logits = []
        if fresh:
            logits = list(self.runner.prefill(fresh))
            for seq, row in zip(fresh, logits):
                if seq.num_generated == 0:
                    self.prompt_logits[seq.prompt] = row
            self.prefill_steps += 1
            self.prefill_tokens += sum(len(s.tokens) for s in fresh)
        partial = [(src, seq) for seq, src in forks if seq.prompt_len % self.runner.block_size]
        if partial:
            last = lambda s: s.blocks[s.prompt_len // self.runner.block_size]  # noqa: E731
            self.runner.copy_blocks([last(src) for src, _ in partial], [last(seq) for _, seq in partial])
        batch = fresh + [seq for seq, _ in forks]
        logits += [self.prompt_logits[seq.prompt] for seq, _ in forks]
        for seq in batch:
            if seq.num_generated == 0:
                self.unstarted[seq.prompt] -= 1
                if self.unstarted[seq.prompt] == 0:
                    self.prompt_logits.pop(seq.prompt, None)
        return batch, torch.stack(logits)

    def sample(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        seeds = torch.tensor([s.seed for s in batch], dtype=torch.long)
        positions = torch.tensor([s.num_cached for s in batch], dtype=torch.long)
        tokens, logprobs = sample(logits, self.sampling, seeds, positions)
        # the one host sync of a step: what was sampled decides stops, growth and admission
        out = torch.stack([tokens.double(), logprobs.double()]).tolist()
        for seq, token, logprob in zip(batch, out[0], out[1]):
            token = int(token)
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            self.generated += 1
            stopped = token in self.stops
            if stopped or seq.num_generated >= self.sampling.max_tokens:
                self.sched.finish(seq)
                self.results[seq.prompt][seq.request % self.n] = Completion(
                    seq.tokens[seq.prompt_len :], seq.logprobs, "stop" if stopped else "length")
