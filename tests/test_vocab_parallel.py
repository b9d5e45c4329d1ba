"""vocab_parallel_logprobs on 2 gloo processes (CPU) vs the single-process results on the full head.

Every case runs in one spawn of two ranks (process start-up dominates the cost): each rank holds
its rows of the weight, runs forward and backward with a random upstream gradient, and saves its
outputs; the parent compares them with the float64 reference_logprobs on the whole weight and with
fused_logprobs. Cases cover uneven shards, labels all in one shard, ignore_index, temperature,
entropy on and off, chunking, bf16 and the no-grad path; a label outside every shard must raise.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dsr_fast.kernels import fused_logprobs, vocab_parallel_logprobs
from dsr_fast.kernels.logprobs import reference_logprobs

WORLD = 2


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    hidden: int
    shards: tuple[int, int]  # rows of the head on rank 0 and rank 1
    temperature: float = 1.0
    entropy: bool = True
    labels: str = "anywhere"  # "anywhere" | "shard0" (rank 1 never holds a label)
    ignored: float = 0.2  # fraction of positions labelled ignore_index
    dtype: torch.dtype = torch.float32
    chunk_size: int | None = None
    grad: bool = True


CASES = [
    Case("even", 29, 16, (40, 40), temperature=0.6),
    Case("uneven", 33, 24, (13, 58), temperature=1.5),
    Case("labels_in_shard0", 17, 8, (50, 7), labels="shard0"),
    Case("logprobs_only_chunked", 41, 16, (30, 35), entropy=False, chunk_size=6),
    Case("all_ignored_but_one", 9, 8, (11, 12), ignored=0.9),
    Case("bf16", 25, 32, (37, 26), temperature=0.6, dtype=torch.bfloat16),
    Case("no_grad", 19, 16, (21, 22), grad=False),
]


def make_case(case: Case):
    """Full hidden [T, H], weight [V, H], labels [T], upstream grads: identical on every rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))  # hash() differs per process
    vocab = sum(case.shards)
    hidden = torch.randn(case.tokens, case.hidden, generator=gen)
    weight = torch.randn(vocab, case.hidden, generator=gen) / case.hidden**0.25  # logits ~ N(0, 4)
    high = case.shards[0] if case.labels == "shard0" else vocab
    labels = torch.randint(0, high, (case.tokens,), generator=gen)
    ignored = torch.rand(case.tokens, generator=gen) < case.ignored
    ignored[0] = False  # at least one scored token in every case
    labels[ignored] = -100
    g_lp = torch.rand(case.tokens, generator=gen) * 2 - 1
    g_h = torch.rand(case.tokens, generator=gen) - 0.5
    return hidden.to(case.dtype), weight.to(case.dtype), labels, g_lp, g_h


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    results = {}
    try:
        for case in CASES:
            hidden, weight, labels, g_lp, g_h = make_case(case)
            start = sum(case.shards[:rank])
            shard = weight[start : start + case.shards[rank]].clone().requires_grad_(case.grad)
            hidden = hidden.clone().requires_grad_(case.grad)
            lp, ent = vocab_parallel_logprobs(
                hidden, shard, labels, vocab_start=start, temperature=case.temperature,
                return_entropy=case.entropy, chunk_size=case.chunk_size,
            )
            if case.grad:
                objective = (lp * g_lp).sum() + ((ent * g_h).sum() if case.entropy else 0.0)
                objective.backward()
            results[case.name] = dict(
                logprobs=lp.detach(), entropy=None if ent is None else ent.detach(),
                grad_hidden=hidden.grad, grad_shard=shard.grad, requires_grad=lp.requires_grad,
            )
        # A label in no shard: both ranks must raise, not return a wrong logprob.
        hidden, weight, labels, _, _ = make_case(CASES[0])
        labels = labels.clone()
        labels[3] = sum(CASES[0].shards)
        start = sum(CASES[0].shards[:rank])
        try:
            vocab_parallel_logprobs(hidden, weight[start : start + CASES[0].shards[rank]], labels, vocab_start=start)
            results["out_of_range_error"] = None
        except ValueError as error:
            results["out_of_range_error"] = str(error)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(case: Case):
    """fp64 logprobs, entropy and grads of hidden and weight from the full [T, V] logits."""
    hidden, weight, labels, g_lp, g_h = make_case(case)
    hidden64 = hidden.double().requires_grad_()
    weight64 = weight.double().requires_grad_()
    lp, ent = reference_logprobs(hidden64, weight64, labels, temperature=case.temperature)
    objective = (lp * g_lp.double()).sum() + ((ent * g_h.double()).sum() if case.entropy else 0.0)
    objective.backward()
    return lp.detach(), ent.detach(), hidden64.grad, weight64.grad


def tolerance(case: Case) -> dict:
    # fp32: a few ulps of the logits' magnitude. bf16: the inputs are the same bf16 values on both
    # sides and all math is fp32, so only the gradients' final rounding to bf16 differs.
    return dict(rtol=1e-5, atol=1e-5) if case.dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(rank_results, case):
    ref_lp, ref_ent, ref_dh, ref_dw = reference(case)
    tol = tolerance(case)
    for rank, results in enumerate(rank_results):
        got = results[case.name]
        torch.testing.assert_close(got["logprobs"].double(), ref_lp, **tol, msg=f"rank {rank} logprobs")
        if case.entropy:
            torch.testing.assert_close(got["entropy"].double(), ref_ent, **tol, msg=f"rank {rank} entropy")
        else:
            assert got["entropy"] is None
        assert got["requires_grad"] == case.grad
        if not case.grad:
            assert got["grad_hidden"] is None and got["grad_shard"] is None
            continue
        assert got["grad_hidden"].dtype == got["grad_shard"].dtype == case.dtype
        # Every rank gets the full hidden gradient (already summed over the group).
        torch.testing.assert_close(got["grad_hidden"].double(), ref_dh, **tol, msg=f"rank {rank} grad hidden")
        start = sum(case.shards[:rank])
        torch.testing.assert_close(
            got["grad_shard"].double(), ref_dw[start : start + case.shards[rank]], **tol, msg=f"rank {rank} grad shard"
        )
    # Identical on both ranks, bit for bit: every rank combines the same all-reduced statistics.
    assert torch.equal(rank_results[0][case.name]["logprobs"], rank_results[1][case.name]["logprobs"])


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == torch.float32], ids=lambda c: c.name)
def test_agrees_with_fused_logprobs(rank_results, case):
    """The sharded and the single-device fused head agree to fp32 rounding."""
    hidden, weight, labels, _, _ = make_case(case)
    lp, ent = fused_logprobs(
        hidden, weight, labels, temperature=case.temperature, return_entropy=case.entropy, backend="torch"
    )
    torch.testing.assert_close(rank_results[0][case.name]["logprobs"], lp, rtol=1e-5, atol=1e-6)
    if case.entropy:
        torch.testing.assert_close(rank_results[0][case.name]["entropy"], ent, rtol=1e-5, atol=1e-6)


def test_ignored_positions_are_zero_with_no_gradient(rank_results):
    case = CASES[4]
    _, _, labels, _, _ = make_case(case)
    ignored = labels == -100
    assert ignored.any()
    for results in rank_results:
        got = results[case.name]
        assert (got["logprobs"][ignored] == 0).all() and (got["entropy"][ignored] == 0).all()
        assert (got["grad_hidden"][ignored] == 0).all()


def test_label_outside_every_shard_raises_on_all_ranks(rank_results):
    for results in rank_results:
        assert results["out_of_range_error"] is not None
        assert "exactly 1" in results["out_of_range_error"]
