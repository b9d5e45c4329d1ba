"""Which sequences run: admission under the KV budget, growth block by block, preemption.

Every request (one sample of one prompt) is a Sequence. Waiting sequences are admitted, oldest
first, while a row (the `max_seqs` ceiling) and blocks remain. The first sample of a prompt is
prefilled; a later sample whose prompt is held by a running sibling forks from it: it references
the sibling's full prompt blocks and copies only the partial last one. Before each decode step a
sequence at a block boundary takes one more block; when none is free the youngest running
sequence is preempted: its blocks are released and it goes back to the front of the queue, to be
prefilled again from its prompt and the tokens it had (recompute). Sampling is counter-based, so
this changes no result.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .blocks import BlockPool, blocks_for


@dataclass(eq=False)
class Sequence:
    request: int  # index of the request in its generate call (prompt-major)
    prompt: int  # index of its prompt
    tokens: list[int]  # prompt + sampled tokens; the last one is not in the cache yet
    prompt_len: int
    seed: int
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # block table: token i lives in blocks[i // block_size]
    num_cached: int = 0  # tokens whose K/V are in the pool
    row: int = -1  # row of the block table while running
    order: int = -1  # admission counter: the largest is the youngest

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Scheduler:
    def __init__(self, pool: BlockPool, max_seqs: int, max_blocks_per_seq: int, max_prefill_tokens: int):
        self.pool, self.block_size = pool, pool.block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        # host copy of every row's block table; the runner sends the rows it decodes
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32)
        self._holder: dict[int, Sequence] = {}  # prompt -> a running sequence whose blocks hold it
        self._admitted = 0
        self.preemptions = 0
        self.peak_running = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, forkable: set[int]) -> tuple[list[Sequence], list[tuple[Sequence, Sequence]]]:
        """Start waiting sequences while rows and blocks last: (to prefill, [(fork, its source)]).

        forkable: prompts whose last-position logits the engine still has (a fork samples its
        first token from them); a prompt prefilled in this same call is forkable too."""
        fresh, forks, tokens = [], [], 0
        prefilled_here: set[int] = set()
        while self.waiting and self._free_rows:
            seq = self.waiting[0]
            source = self._holder.get(seq.prompt)
            if source is not None and seq.num_generated == 0 and (seq.prompt in forkable or seq.prompt in prefilled_here):
                full = seq.prompt_len // self.block_size
                partial = seq.prompt_len % self.block_size != 0
                if partial and self.pool.num_free == 0:
                    break
                self.pool.share(source.blocks[:full])
                seq.blocks = source.blocks[:full] + (self.pool.allocate(1) if partial else [])
                forks.append((seq, source))
            else:
                n = len(seq.tokens)
                need = blocks_for(n, self.block_size)
                if (fresh and tokens + n > self.max_prefill_tokens) or need > self.pool.num_free:
                    break
                seq.blocks = self.pool.allocate(need)
                fresh.append(seq)
                tokens += n
                if seq.num_generated == 0:
                    prefilled_here.add(seq.prompt)
            seq.num_cached = len(seq.tokens) if seq.num_generated else seq.prompt_len
            self.waiting.popleft()
            self._start(seq)
        return fresh, forks

    def grow(self) -> None:
        """Room for one more token in every running sequence, preempting the youngest when the
        pool is dry (possibly the sequence itself, when it is the youngest)."""
        i = 0
        while i < len(self.running):  # oldest first
            seq = self.running[i]
            if seq.num_cached == len(seq.blocks) * self.block_size:
                while self.pool.num_free == 0 and self.running[-1] is not seq:
                    self.preempt(self.running[-1])
                if self.pool.num_free == 0:  # seq is the youngest
                    self.preempt(seq)
                    return
                (block,) = self.pool.allocate(1)
                self.block_table[seq.row, len(seq.blocks)] = block
                seq.blocks.append(block)
            i += 1

    def preempt(self, seq: Sequence) -> None:
        self._stop(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self._stop(seq)

    def _start(self, seq: Sequence) -> None:
        seq.row = self._free_rows.pop()
        seq.order = self._admitted
        self._admitted += 1
        self.block_table[seq.row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        self.running.append(seq)
        self._holder.setdefault(seq.prompt, seq)
        self.peak_running = max(self.peak_running, len(self.running))

    def _stop(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        self.running.remove(seq)
        self._free_rows.append(seq.row)
        seq.row = -1
        if self._holder.get(seq.prompt) is seq:
            del self._holder[seq.prompt]
            sibling = next((s for s in self.running if s.prompt == seq.prompt), None)
            if sibling is not None:
                self._holder[seq.prompt] = sibling
