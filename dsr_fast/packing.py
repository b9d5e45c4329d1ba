"""Packed variable-length batches and the attention that runs on them.

A packed batch is B sequences laid end to end with no padding:

    input_ids    [T]     token ids of all sequences, concatenated
    position_ids [T]     0..L_i-1 within each sequence
    cu_seqlens   [B+1]   int32 offsets: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    max_seqlen   int     longest sequence (varlen kernels size their grids with it)

Labels are shifted within each sequence only: the hidden state at token t predicts token t+1 of
the same sequence, and the last token of every sequence predicts nothing (ignore_index).

`varlen_attention` is the single entry point the model calls for attention over a packed batch;
its backend is chosen per call from what the machine has (flash-attn, torch's varlen_attn, or an
exact per-sequence SDPA loop) and can be forced.

`plan_microbatches` splits a batch of sequences across data-parallel ranks and into micro-batches
under a hard token cap, with the same number of micro-batches on every rank (FSDP's collectives
need every rank to run the same number of forward/backward passes) and the per-rank cost
balanced under a cost model that counts attention's quadratic term.
"""

from __future__ import annotations

import heapq
import inspect
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

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

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
# DSR_FAST_ATTENTION=flash_attn|torch_varlen|sdpa forces one backend everywhere (default: auto)
_FORCED_BACKEND = os.environ.get("DSR_FAST_ATTENTION", "auto")


def varlen_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1] int32, on q's device
    max_seqlen: int,  # a Python int: reading it from a device tensor would sync
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:  # [T, Hq, D]
    """Attention within each packed sequence (never across), GQA by head grouping."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads not a multiple of {k.shape[1]} kv heads")
    name = select_backend(q, backend if backend != "auto" else _FORCED_BACKEND)
    if name == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal)
    if name == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal)
    return _sdpa_per_sequence(q, k, v, cu_seqlens, causal)


def available_backends(q: torch.Tensor) -> list[str]:
    """The backends that can run on q's device and dtype, fastest first."""
    names = []
    fused_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)  # both are FA2: CUDA, half only
    if fused_ok and _flash_attn_func() is not None:
        names.append("flash_attn")
    if fused_ok and _torch_varlen_func() is not None:
        names.append("torch_varlen")
    names.append("sdpa")
    return names


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    if backend == "auto":
        return available_backends(q)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if backend not in available_backends(q):
        raise RuntimeError(f"attention backend {backend!r} cannot run on {q.device} {q.dtype} here")
    return backend


@lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=None)
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal):
    # flash-attn handles GQA natively and aligns the causal mask bottom-right (equal q/k lengths here)
    return _flash_attn_func()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)


def torch_varlen_kwargs(
    fn: Callable, causal: bool, gqa: bool, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[dict, bool]:
    """Keyword arguments for this torch's varlen_attn, and whether K/V must be repeated for GQA.

    The signature moved every release: 2.10 takes is_causal; 2.11 replaced it by window_size
    ((-1, 0) = causal); 2.13 added enable_gqa. Probed by inspection, once per function. Without
    enable_gqa, repeating K/V costs Hq/Hkv times the K/V activations saved for backward (≈4 GB
    at 24K tokens × 28 layers for Qwen2-1.5B's 12:2 heads), although the FA2 kernel underneath
    handles grouped heads itself: so whether this torch passes unrepeated K/V through correctly
    is probed by running it once (per device and dtype), and K/V are repeated only if not.
    """
    kwargs, repeat_kv = _torch_varlen_kwargs(fn, causal, gqa, device, dtype)  # positional: one cache key
    return dict(kwargs), repeat_kv


@lru_cache(maxsize=None)
def _torch_varlen_kwargs(fn: Callable, causal: bool, gqa: bool, device: str, dtype: torch.dtype) -> tuple[dict, bool]:
    params = inspect.signature(fn).parameters
    kwargs = {}
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        elif "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            raise RuntimeError(f"torch varlen_attn{inspect.signature(fn)}: no way to ask for causal attention")
    repeat_kv = False
    if gqa:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat_kv = not _runs_unrepeated_gqa(fn, tuple(kwargs.items()), device, dtype)
    return kwargs, repeat_kv


def _runs_unrepeated_gqa(fn: Callable, kwargs: tuple, device: str, dtype: torch.dtype) -> bool:
    """Does fn(q [T, 4, D], k/v [T, 2, D], ...) give, forward and backward, what it gives with
    K/V repeated to 4 heads (query head h reading kv head h // 2)? An error, or any other head
    pairing, means no. Two sequences, so the varlen bookkeeping is exercised as well."""
    gen = torch.Generator().manual_seed(0)
    lens, d = (3, 6), 64
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)

    def make(heads):
        return torch.randn(sum(lens), heads, d, generator=gen).to(device=device, dtype=dtype)

    q, k, v, grad_out = make(4), make(2), make(2), make(4)
    results = []
    try:
        with torch.enable_grad():
            for repeat in (False, True):
                qi, ki, vi = (x.clone().requires_grad_() for x in (q, k, v))
                kr, vr = (ki.repeat_interleave(2, dim=1), vi.repeat_interleave(2, dim=1)) if repeat else (ki, vi)
                out = fn(qi, kr, vr, cu, cu, max(lens), max(lens), **dict(kwargs))
                out.backward(grad_out)
                results.append([out.detach(), qi.grad, ki.grad, vi.grad])
    except Exception:  # e.g. "Hq != Hkv without enable_gqa": repeat instead
        return False
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return all(
        a is not None and b is not None and a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
        for a, b in zip(*results)
    )


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal):
    fn = _torch_varlen_func()
    kwargs, repeat_kv = torch_varlen_kwargs(fn, causal, q.shape[1] != k.shape[1], str(q.device), q.dtype)
    if repeat_kv:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _sdpa_per_sequence(q, k, v, cu_seqlens, causal):
    # Exact reference: one SDPA call per sequence. .tolist() is a host sync, once per call.
    # split (not slicing) so that backward concatenates the pieces once instead of adding
    # one zero-padded full-size gradient per sequence.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if min(lengths) == max(lengths):  # equal lengths (e.g. a padded batch): one batched call
        B, L = len(lengths), lengths[0]
        qs, ks, vs = (x.view(B, L, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))  # [1, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


# -----------------------------------------------------------------------------
# micro-batch planning


@dataclass(frozen=True)
class CostModel:
    """Relative cost of one sequence of L tokens: linear·L + quadratic·L².

    The linear term is the per-token work of the projections and MLP (and lm_head), the quadratic
    one causal attention's score and value products. Only the ratio matters.
    """

    linear: float
    quadratic: float = 1.0

    def __call__(self, length: int) -> float:
        return self.linear * length + self.quadratic * length * length

    @classmethod
    def for_qwen2(cls, cfg) -> "CostModel":
        """FLOPs of a Qwen2 forward: 2·(params touched per token) per token, and per causal pair
        2·2·Hq·D per layer (QKᵀ and PV), halved by the mask."""
        h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * cfg.intermediate_size
        linear = 2 * (cfg.num_hidden_layers * per_layer + h * cfg.vocab_size)
        quadratic = cfg.num_hidden_layers * 2 * hq * d
        return cls(linear / quadratic, 1.0)


# Qwen2-1.5B: ~36K·L + L² (linear layers and lm_head vs causal attention, per the formula above)
QWEN2_1_5B_COST = CostModel(36_000.0)


@dataclass
class MicrobatchPlan:
    """microbatches[rank][i] = indices (into the planned list) of the sequences in micro-batch i.

    Every rank has the same number of micro-batches; within a rank they are ordered by cost,
    largest first, so the i-th step costs about the same on every rank. A micro-batch is empty
    only when its rank has fewer sequences than the common count (the trainer then runs a dummy
    step so that collectives stay matched).
    """

    microbatches: list[list[list[int]]]
    lengths: list[int]
    max_tokens: int
    costs: list[float] = field(repr=False)

    @property
    def world_size(self) -> int:
        return len(self.microbatches)

    @property
    def num_microbatches(self) -> int:
        return len(self.microbatches[0])

    def rank(self, r: int) -> list[list[int]]:
        return self.microbatches[r]

    def restore(self, values: Sequence[Sequence[Sequence]]) -> list:
        """values[rank][i][j] belongs to sequence microbatches[rank][i][j]: back to input order."""
        out = [None] * len(self.lengths)
        for plan_rank, vals_rank in zip(self.microbatches, values):
            for mb, vals in zip(plan_rank, vals_rank):
                for i, v in zip(mb, vals):
                    out[i] = v
        return out

    def stats(self) -> dict:
        tokens = [[sum(self.lengths[i] for i in mb) for mb in rank] for rank in self.microbatches]
        cost = [[sum(self.costs[i] for i in mb) for mb in rank] for rank in self.microbatches]
        rank_cost = [sum(c) for c in cost]
        mean_cost = sum(rank_cost) / len(rank_cost)
        # the ranks wait for each other at every step: what each step costs is its slowest rank
        step_cost = sum(max(c[i] for c in cost) for i in range(self.num_microbatches))
        total = sum(self.lengths)
        return {
            "num_microbatches": self.num_microbatches,
            "min_possible": math.ceil(total / (self.world_size * self.max_tokens)),
            "fill": total / (self.world_size * self.num_microbatches * self.max_tokens),
            "rank_tokens_min": min(sum(t) for t in tokens),
            "rank_tokens_max": max(sum(t) for t in tokens),
            "rank_cost_imbalance": max(rank_cost) / mean_cost - 1 if mean_cost else 0.0,
            "step_cost_overhead": step_cost * self.world_size / sum(rank_cost) - 1 if mean_cost else 0.0,
        }


def plan_microbatches(
    lengths: Sequence[int],
    max_tokens: int,
    world_size: int = 1,
    cost: Callable[[int], float] = QWEN2_1_5B_COST,
) -> MicrobatchPlan:
    """Split sequences across `world_size` ranks and into micro-batches of <= max_tokens tokens.

    1. Ranks: Karmarkar–Karp largest differencing on the sequence costs, k = world_size.
    2. Count: best-fit decreasing gives each rank its fewest bins; the common count is the most
       any rank needs (every rank must run the same number of forward/backward passes).
    3. Each rank fills exactly that many bins, cost-balanced when possible, else its best-fit
       bins split (costliest first) up to the count.
    """
    if max_tokens < 1 or world_size < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and world_size ({world_size}) must be >= 1")
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, over the micro-batch budget max_tokens={max_tokens}")
    costs = [float(cost(n)) for n in lengths]
    ranks = karmarkar_karp(costs, world_size)
    fewest = [_best_fit(r, lengths, max_tokens) for r in ranks]
    count = max(len(bins) for bins in fewest)
    packed = []
    for items, bins in zip(ranks, fewest):
        # cost-balanced bins when they fit (steps then cost alike on every rank), else the
        # tightest packing split up to the common count
        balanced = _pack_balanced(items, lengths, costs, max_tokens, count)
        packed.append(balanced if balanced is not None else _split_to(bins, count, costs))
    for bins in packed:
        bins.sort(key=lambda mb: -sum(costs[i] for i in mb))
    return MicrobatchPlan(packed, lengths, max_tokens, costs)


def karmarkar_karp(costs: Sequence[float], k: int) -> list[list[int]]:
    """k-way partition of item indices with near-equal cost sums (largest differencing method).

    Every item starts as a k-set state (itself in one set); repeatedly the two states with the
    largest spread are merged, pairing one's largest set with the other's smallest.
    """
    heap, tiebreak = [], 0
    for i, c in enumerate(costs):
        sets = [(c, [i])] + [(0.0, []) for _ in range(k - 1)]
        heap.append((-c, tiebreak, sets))
        tiebreak += 1
    heapq.heapify(heap)
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)), key=lambda s: -s[0])
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], tiebreak, merged))
        tiebreak += 1
    return [sorted(items) for _, items in heap[0][2]]


def _best_fit(items: list[int], lengths, max_tokens) -> list[list[int]]:
    """Best-fit decreasing: each sequence, longest first, into the fullest bin it fits; a new bin
    when none has room. Within a bin or so of the fewest bins possible for length mixes like RL's."""
    bins, room = [], []  # room kept sorted ascending, with the bin index alongside
    for i in sorted(items, key=lambda i: -lengths[i]):
        j = _bisect_left(room, lengths[i])
        if j < len(room):
            free, b = room.pop(j)
            bins[b].append(i)
            _insort(room, (free - lengths[i], b))
        else:
            bins.append([i])
            _insort(room, (max_tokens - lengths[i], len(bins) - 1))
    return bins or [[]]


def _bisect_left(room, need):
    lo, hi = 0, len(room)
    while lo < hi:
        mid = (lo + hi) // 2
        if room[mid][0] < need:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _insort(room, item):
    room.insert(_bisect_left(room, item[0]), item)


def _pack_balanced(items: list[int], lengths, costs, max_tokens, count) -> list[list[int]] | None:
    """Longest first into the cheapest of `count` bins with room; None if some sequence fits nowhere."""
    bins = [[] for _ in range(count)]
    tokens, cost = [0] * count, [0.0] * count
    for i in sorted(items, key=lambda i: -lengths[i]):
        fits = [b for b in range(count) if tokens[b] + lengths[i] <= max_tokens]
        if not fits:
            return None
        b = min(fits, key=lambda b: (cost[b], tokens[b]))
        bins[b].append(i)
        tokens[b] += lengths[i]
        cost[b] += costs[i]
    return [sorted(b) for b in bins]


def _split_to(bins: list[list[int]], count: int, costs) -> list[list[int]]:
    """Split the costliest bins in two (never breaking the cap) until there are `count` bins;
    pad with empty bins only when there are fewer sequences than bins."""
    bins = [sorted(b) for b in bins if b]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        big = max(splittable, key=lambda b: sum(costs[i] for i in b))
        bins.remove(big)
        by_cost = sorted(big, key=lambda i: -costs[i])
        bins += [sorted(by_cost[0::2]), sorted(by_cost[1::2])]
    return bins
