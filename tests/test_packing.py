"""Packed batches, varlen attention backends, and the micro-batch planner."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr_fast import packing
from dsr_fast.model import Qwen2Config
from dsr_fast.packing import (
    IGNORE_INDEX,
    CostModel,
    available_backends,
    karmarkar_karp,
    pack,
    plan_microbatches,
    sequence_ids,
    torch_varlen_kwargs,
    unpack,
    varlen_attention,
)

# -----------------------------------------------------------------------------
# packed batches


def test_pack_layout_and_labels_stay_within_sequences():
    seqs = [[5, 6, 7], [8], [9, 10]]
    b = pack(seqs)
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3
    assert b.labels.tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX, 10, IGNORE_INDEX]
    assert sequence_ids(b.cu_seqlens).tolist() == [0, 0, 0, 1, 2, 2]
    assert [t.tolist() for t in unpack(b.input_ids, b.cu_seqlens)] == seqs


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="no sequences"):
        pack([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack([[1], []])


# -----------------------------------------------------------------------------
# attention


def dense_reference(q, k, v, lens):
    """Attention over the whole packed batch with a block-diagonal causal mask, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T, Hq, D = q.shape
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(T)
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    group = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, kk) / D**0.5
    return torch.einsum("hts,shd->thd", F.softmax(scores.masked_fill(~mask, float("-inf")), -1), vv)


def random_qkv(lens, hq=4, hkv=2, d=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def test_sdpa_backend_equals_dense_reference_with_gradients():
    lens = [4, 1, 6, 3]
    q, k, v, cu = random_qkv(lens)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = varlen_attention(q, k, v, cu, max(lens), backend="sdpa")
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(qd, kd, vd, lens)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (qd, kd, vd))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_every_backend_available_here_equals_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [37, 1, 130, 64]
    q, k, v, cu = random_qkv(lens, hq=6, hkv=2, d=64, dtype=dtype, device=device)
    ref = dense_reference(q.cpu(), k.cpu(), v.cpu(), lens)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name in available_backends(q):
        out = varlen_attention(q, k, v, cu, max(lens), backend=name)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    "signature, expect_kwargs, expect_repeat",
    [
        # torch 2.10
        ("q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None", {"is_causal": True}, True),
        # torch 2.11 (the GPU machine)
        ("q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)",
         {"window_size": (-1, 0)}, True),
        # torch 2.13 / 2.14
        ("q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), "
         "enable_gqa=False, seqused_k=None, block_table=None, num_splits=None",
         {"window_size": (-1, 0), "enable_gqa": True}, False),
    ],
)
def test_torch_varlen_adapter_follows_each_signature(monkeypatch, signature, expect_kwargs, expect_repeat):
    """Run the adapter against a stand-in with each release's signature that computes attention
    with the same semantics (causal via is_causal or window (-1, 0); GQA only if asked)."""
    calls = []
    namespace = {}
    exec(f"def fake({signature}): return impl(q, k, v, cu_q, max_q, locals())", {"impl": None}, namespace)
    fake = namespace["fake"]

    def impl(q, k, v, cu, max_q, args):
        calls.append(args)
        causal = args.get("is_causal", False) or args.get("window_size") == (-1, 0)
        if q.shape[1] != k.shape[1] and not args.get("enable_gqa", False):
            raise RuntimeError("Hq != Hkv without enable_gqa")
        return packing._sdpa_per_sequence(q, k, v, cu, causal)

    fake.__globals__["impl"] = impl
    monkeypatch.setattr(packing, "_torch_varlen_func", lambda: fake)
    kwargs, repeat = torch_varlen_kwargs(fake, causal=True, gqa=True)
    assert kwargs == expect_kwargs and repeat == expect_repeat
    calls.clear()  # the GQA probe's own calls (signatures without enable_gqa)
    lens = [5, 9]
    q, k, v, cu = random_qkv(lens, hq=4, hkv=1)
    out = packing._torch_varlen(q, k, v, cu, max(lens), causal=True)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens), rtol=1e-5, atol=1e-6)
    assert calls and calls[0]["k"].shape[1] == (4 if expect_repeat else 1)


def _fake_varlen_2_11(impl):
    """A stand-in with torch 2.11's signature (no enable_gqa) whose GQA behaviour is `impl`."""
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        calls.append(k.shape[1])
        return impl(q, k, v, cu_q, window_size == (-1, 0))

    return fake, calls


@pytest.mark.parametrize("behaviour", ["native", "rejects", "wrong_pairing"])
def test_unrepeated_kv_when_this_torch_runs_gqa(monkeypatch, behaviour):
    """A varlen_attn without enable_gqa is probed once: if unrepeated K/V give the repeated
    result (forward and backward), K/V go in unrepeated (no Hq/Hkv-times saved activations);
    if the call raises or pairs heads differently, K/V are repeated and the result stays exact."""
    def native(q, k, v, cu, causal):
        return packing._sdpa_per_sequence(q, k, v, cu, causal)  # SDPA's enable_gqa: h reads h // group

    def rejects(q, k, v, cu, causal):
        if q.shape[1] != k.shape[1]:
            raise RuntimeError("Hq != Hkv")
        return native(q, k, v, cu, causal)

    def wrong_pairing(q, k, v, cu, causal):  # query head h reads kv head h % Hkv: silently wrong
        group = q.shape[1] // k.shape[1]
        return native(q, k.repeat(1, group, 1), v.repeat(1, group, 1), cu, causal)

    fake, calls = _fake_varlen_2_11({"native": native, "rejects": rejects, "wrong_pairing": wrong_pairing}[behaviour])
    monkeypatch.setattr(packing, "_torch_varlen_func", lambda: fake)
    lens = [5, 9]
    q, k, v, cu = random_qkv(lens, hq=4, hkv=2)
    for _ in range(2):
        out = packing._torch_varlen(q, k, v, cu, max(lens), causal=True)
        torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens), rtol=1e-5, atol=1e-6)
    probe_calls = 2 if behaviour != "rejects" else 1
    assert len(calls) == probe_calls + 2  # probed once, not per call
    assert calls[-1] == calls[-2] == (2 if behaviour == "native" else 4)


def test_backend_choice_is_checked():
    q = torch.zeros(3, 2, 8)
    assert available_backends(q) == ["sdpa"] or torch.cuda.is_available()
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        varlen_attention(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, backend="xformers")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        varlen_attention(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, backend="torch_varlen")


# -----------------------------------------------------------------------------
# micro-batch planning


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=60),
    cap=st.integers(100, 400),
    world_size=st.integers(1, 8),
)
def test_planner_properties(lengths, cap, world_size):
    plan = plan_microbatches(lengths, cap, world_size, cost=CostModel(50.0))
    assert plan.world_size == world_size
    counts = {len(rank) for rank in plan.microbatches}
    assert len(counts) == 1  # every rank runs the same number of micro-batches
    seen = [i for rank in plan.microbatches for mb in rank for i in mb]
    assert sorted(seen) == list(range(len(lengths)))  # every sequence exactly once
    assert all(sum(lengths[i] for i in mb) <= cap for rank in plan.microbatches for mb in rank)
    # empty micro-batches only where a rank has fewer sequences than the common count
    for rank in plan.microbatches:
        if any(not mb for mb in rank):
            assert sum(len(mb) for mb in rank) < plan.num_microbatches
    # order recoverable: per-sequence values routed through the plan come back in input order
    values = [[[f"seq{i}" for i in mb] for mb in rank] for rank in plan.microbatches]
    assert plan.restore(values) == [f"seq{i}" for i in range(len(lengths))]


def test_planner_rejects_a_sequence_over_the_cap():
    with pytest.raises(ValueError, match="sequence 2 has 9 tokens, over the micro-batch budget max_tokens=8"):
        plan_microbatches([1, 2, 9], max_tokens=8)


def test_karmarkar_karp_beats_greedy_on_a_known_case():
    # the classic example: LPT greedy gives 15/12 for [8,7,6,5,4]; an exact 2-way split is 15/15
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2)
    sums = sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts)
    assert sums in ([14, 16], [15, 15])
    assert sorted(i for p in parts for i in p) == list(range(5))


def deepscaler_like_lengths(prompts=128, samples=16, seed=0):
    """Response lengths of one RL step: per prompt a difficulty, per sample lognormal noise."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(prompts):
        centre = rng.lognormvariate(math.log(3500), 0.6)
        for _ in range(samples):
            lengths.append(int(min(24_576, max(200, rng.lognormvariate(math.log(centre), 0.5)))))
    return lengths


def padded_batches(lengths, batch_size):
    """Fixed-size micro-batches in arrival order, each padded to its longest sequence."""
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return len(batches), sum(lengths) / sum(len(b) * max(b) for b in batches)


@pytest.mark.parametrize("world_size", [1, 8, 32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepscaler_like_mix(world_size, seed):
    lengths = deepscaler_like_lengths(seed=seed)
    cap = 32_768
    plan = plan_microbatches(lengths, cap, world_size)
    s = plan.stats()
    total = sum(lengths)
    # packed micro-batches hold no padding: 100% of their tokens are real, and there are at most
    # one more per rank than the tokens need
    assert s["num_microbatches"] <= math.ceil(total / (world_size * cap)) + 1, s
    assert s["rank_cost_imbalance"] < 0.01 and s["step_cost_overhead"] < 0.05, s
    # the same sequences padded, 8 per micro-batch as a fixed-size trainer would (and that
    # already breaks the cap: 8 x 24,576 tokens): most of what the GPU would compute is padding
    n_padded, real_fraction = padded_batches(lengths, 8)
    print(f"world {world_size}: packed {s['num_microbatches']} micro-batches/rank at fill {s['fill']:.3f}, "
          f"cost imbalance {s['rank_cost_imbalance']:.4f}; padded x8: {n_padded} micro-batches, "
          f"{real_fraction:.1%} real tokens; padded to 24,576: {sum(lengths) / (24_576 * len(lengths)):.1%} real")
    assert real_fraction < 0.8


def test_cost_model_for_qwen2_1_5b_matches_the_reference_estimate():
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2)
    model = CostModel.for_qwen2(cfg)
    # ~3.09 GFLOP/token of linear work vs 28·2·1536 per causal pair: ≈36K·L + L²
    assert 34_000 < model.linear < 38_000 and model.quadratic == 1.0
