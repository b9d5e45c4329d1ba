"""CUDA graphs of the decode step, one per batch-size bucket (1, 2, 4, ..., max_seqs).

A live batch of b sequences runs the graph of the smallest bucket >= b; rows b..bucket-1 are
padding: length 0 (the attention reads nothing) and block table row 0 (their K/V land in the
pool's null block). Inputs (tokens, lengths, block tables) live in static buffers that every
graph reads, so one graph serves every length and every table; weights are read through their
storage, so in-place weight syncs reach the next replay. All buckets are captured together on
first use, largest first, in one memory pool; a new pool (wake after sleep) means new graphs.

`capture=False` runs the same padded step eagerly: the CPU tests check the bucketing and
padding through it.
"""

from __future__ import annotations

from typing import Callable

import torch

# step(input_ids [b] int64, seq_lens [b] int32, block_table [b, W] int32) -> logits [b, V] fp32
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def batch_buckets(max_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_seqs]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} sequences exceeds the largest bucket {buckets[-1]}")


class DecodeGraphs:
    def __init__(self, step: StepFn, max_seqs: int, max_blocks_per_seq: int, device: torch.device, capture: bool = True):
        self.step, self.capture = step, capture
        self.buckets = batch_buckets(max_seqs)
        self.input_ids = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _inputs(self, b: int):
        return self.input_ids[:b], self.seq_lens[:b], self.block_table[:b]

    def _capture_all(self) -> None:
        # the buffers are all padding now (length 0, null block): warm-up and capture write
        # only into the null block
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # lazy init, Triton compiles and allocator warm-up outside any capture
            for b in reversed(self.buckets):
                self.step(*self._inputs(b))
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self.step(*self._inputs(b))
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] of one decode step for n live rows; block_table [n, W] may be narrower
        than the static table (columns past a row's length are never read)."""
        n, width = block_table.shape
        b = bucket_for(n, self.buckets)
        if self.capture and not self.graphs:
            self._capture_all()  # before the inputs land: capture must see padding only
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_table[:n, :width].copy_(block_table, non_blocking=True)
        self.input_ids[n:b].zero_()
        self.seq_lens[n:b].zero_()
        self.block_table[n:b, 0].zero_()
        if not self.capture:
            return self.step(*self._inputs(b))[:n]
        self.graphs[b].replay()
        return self.logits[b][:n]
