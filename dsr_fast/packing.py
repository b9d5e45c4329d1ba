"""Packed variable-length batches and the attention that runs on them.

A packed batch is B sequences laid end to end with no padding:

    input_ids    [T]     token ids of all sequences, concatenated
    position_ids [T]     0..L_i-1 within each sequence
    cu_seqlens   [B+1]   int32 offsets: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    max_seqlen   int     longest sequence (varlen kernels size their grids with it)

Labels are shifted within each sequence only: the hidden state at token t predicts token t+1 of
the same sequence, and the last token of every sequence predicts nothing (ignore_index).

`varlen_attention` is the single entry point the model calls for attention over a packed batch.
This version has the exact per-sequence SDPA reference backend; faster backends (flash-attn,
torch's varlen_attn) plug in behind the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    labels: torch.Tensor  # [T] int64, next token within the sequence, IGNORE_INDEX at each end

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.cu_seqlens.to(device),
            self.max_seqlen,
            self.labels.to(device),
        )


def pack(sequences: Sequence[Sequence[int]]) -> PackedBatch:
    """Concatenate token sequences into one packed batch (no padding)."""
    if len(sequences) == 0:
        raise ValueError("pack: got no sequences")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"pack: sequence {lengths.index(0)} is empty")
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lens, 0)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    position_ids = torch.arange(input_ids.numel()) - starts
    labels = torch.roll(input_ids, -1)
    labels[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return PackedBatch(input_ids, position_ids, cu_seqlens, max(lengths), labels)


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split a per-token tensor [T, ...] back into one tensor per sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(values, lengths))


def sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] index of the sequence each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


# -----------------------------------------------------------------------------
# attention over a packed batch


def varlen_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1]
    max_seqlen: int,
    causal: bool = True,
) -> torch.Tensor:  # [T, Hq, D]
    """Attention within each packed sequence (never across), GQA by head grouping."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads not a multiple of {k.shape[1]} kv heads")
    return _sdpa_per_sequence(q, k, v, cu_seqlens, causal)


def _sdpa_per_sequence(q, k, v, cu_seqlens, causal):
    # Exact reference: one SDPA call per sequence. .tolist() is a host sync, once per call.
    # split (not slicing) so that backward concatenates the pieces once instead of adding
    # one zero-padded full-size gradient per sequence.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))  # [1, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


# -----------------------------------------------------------------------------
# micro-batches


def plan_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most max_tokens tokens each.

    First-fit decreasing: long sequences are placed first, each into the first micro-batch with
    room. A sequence longer than max_tokens is an error (it could never fit).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, over the micro-batch budget max_tokens={max_tokens}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]
