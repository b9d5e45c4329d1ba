"""Activation recomputation: every per-layer plan gives the plain model's gradients (float64), and
recompute.py's byte and FLOP counts match what autograd saves and what backward runs."""

import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from dsr_fast import model as model_module
from dsr_fast.kernels.logprobs import reference_logprobs
from dsr_fast.memory import peak_cpu_bytes
from dsr_fast.model import Qwen2, Qwen2Config, rope_cos_sin
from dsr_fast.packing import pack, varlen_attention
from dsr_fast.recompute import (
    activation_bytes,
    layer_flops,
    plan_recompute,
    recompute_flops,
    saved_bytes_per_token,
)

CFG = dict(vocab_size=61, hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
           num_key_value_heads=2)
LENGTHS = (13, 5, 22)


def float64_head(hidden, weight, labels, *, temperature=1.0, return_entropy=False):
    """The fused logprob kernel's contract on float64 logits (the kernel takes fp32/bf16 only)."""
    logprobs, entropy = reference_logprobs(hidden, weight, labels, temperature=temperature)
    return logprobs, entropy if return_entropy else None


@pytest.fixture(autouse=True)
def _float64_head(monkeypatch):
    monkeypatch.setattr(model_module, "fused_logprobs", float64_head)


def tiny(dtype=torch.float64, seed=0) -> Qwen2:
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(**CFG)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so attention is not flat
            p.normal_(0, 0.3)
    return model


def batch_and_labels(seed=1):
    g = torch.Generator().manual_seed(seed)
    batch = pack([torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS])
    return batch, batch.labels.clone()


def loss_and_grads(model, plan, batch, labels):
    """A loss through logprobs and entropy with a random upstream weight per token; every grad."""
    model.zero_grad(set_to_none=True)
    model.set_recompute(plan)
    logp, entropy = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, labels=labels,
                          temperature=0.6, return_entropy=True)
    w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=logp.dtype)
    loss = (w * logp).sum() + 0.1 * entropy.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("plan", ["full", "selective", ["selective", "none", "full"], ["full", "selective", "selective"]])
def test_every_plan_gives_the_plain_gradient_in_float64(plan):
    model = tiny()
    batch, labels = batch_and_labels()
    want_loss, want = loss_and_grads(model, "none", batch, labels)  # plain autograd: nothing recomputed
    got_loss, got = loss_and_grads(model, plan, batch, labels)
    assert model.recompute_plan == ([plan] * 3 if isinstance(plan, str) else plan)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14, msg=n)


def test_selective_and_full_recomputation_give_identical_gradients():
    model = tiny()
    batch, labels = batch_and_labels(seed=3)
    _, full = loss_and_grads(model, "full", batch, labels)
    _, selective = loss_and_grads(model, "selective", batch, labels)
    for n in full:
        torch.testing.assert_close(selective[n], full[n], rtol=1e-13, atol=1e-15, msg=n)


def test_bad_plans_are_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="one of none, selective, full per layer"):
        model.set_recompute("some")
    with pytest.raises(ValueError, match="3 layers"):
        model.set_recompute(["full", "full"])
    with pytest.raises(ValueError, match="auto"):
        plan_recompute(model.config, "everything", 10, 1e9, 4)


def test_gradient_checkpointing_flag_is_full_recomputation():
    model = tiny()
    model.gradient_checkpointing = True
    assert model.recompute_plan == ["full"] * 3 and model.gradient_checkpointing
    model.gradient_checkpointing = False
    assert model.recompute_plan == ["none"] * 3


# -----------------------------------------------------------------------------
# bytes and FLOPs


def saved_by_one_layer(block, x, cos, sin, attend, mode) -> int:
    """Bytes of the distinct storages autograd saves for one layer's backward (not its weights)."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()} | {t.untyped_storage().data_ptr() for t in (cos, sin)}
    seen = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    block.recompute = mode
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if mode == "full":
            checkpoint(block, x, cos, sin, attend, use_reentrant=False)
        else:
            block(x, cos, sin, attend)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_saved_bytes_estimate_matches_autograd(mode, dtype):
    model = tiny(dtype)
    cfg = model.config
    batch, _ = batch_and_labels()
    x = torch.randn(batch.num_tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(batch.position_ids, cfg.head_dim, cfg.rope_theta, dtype)

    def attend(q, k, v, layer):
        return varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)

    measured = saved_by_one_layer(model.layers[0], x, cos, sin, attend, mode) / batch.num_tokens
    estimate = saved_bytes_per_token(cfg, mode, dtype.itemsize)
    # the CPU attention (an SDPA call per sequence, then a concatenation) keeps one more copy of
    # the attention output than a varlen kernel, which saves its output once
    out_copy = cfg.num_attention_heads * cfg.head_dim * dtype.itemsize
    assert measured - estimate == (0 if mode == "full" else out_copy), (measured, estimate)


def test_recomputed_flops_match_what_backward_runs(monkeypatch):
    """Matmul FLOPs counted by FlopCounterMode, attention FLOPs per call of the attention core
    (CPU SDPA is not counted by FlopCounterMode): what a plan adds over storing everything is
    what recompute_flops says."""
    model = tiny(torch.float32)
    batch, labels = batch_and_labels()
    cfg = model.config
    attention_per_call = layer_flops(cfg, LENGTHS)["attention"]
    attention_calls = []

    def counting_attention(*args, **kwargs):
        attention_calls.append(1)
        return varlen_attention(*args, **kwargs)

    monkeypatch.setattr(model_module, "varlen_attention", counting_attention)

    def total_flops(plan):
        attention_calls.clear()
        with FlopCounterMode(display=False) as counter:
            loss_and_grads(model, plan, batch, labels)
        return counter.get_total_flops() + attention_per_call * len(attention_calls)

    plain = total_flops("none")
    for plan in ("full", "selective", ["none", "selective", "full"]):
        layers = [plan] * 3 if isinstance(plan, str) else plan
        assert total_flops(plan) - plain == recompute_flops(cfg, LENGTHS, layers), plan
    assert recompute_flops(cfg, LENGTHS, ["selective"] * 3) < recompute_flops(cfg, LENGTHS, ["full"] * 3)


def test_auto_plan_recomputes_least_within_the_budget():
    cfg = Qwen2Config(**CFG)
    lengths, s = [400, 600], 2
    tokens = sum(lengths)
    everything = activation_bytes(cfg, ["none"] * 3, tokens, s)
    assert plan_recompute(cfg, "auto", lengths, everything, s) == ["none"] * 3
    assert plan_recompute(cfg, "auto", lengths, 1.0, s) == ["full"] * 3  # nothing fits: the least memory
    all_selective = activation_bytes(cfg, ["selective"] * 3, tokens, s)
    assert plan_recompute(cfg, "auto", lengths, all_selective, s) == ["selective"] * 3
    assert plan_recompute(cfg, "selective", lengths, 1.0, s) == ["selective"] * 3  # a fixed mode ignores the budget
    # against every plan, by brute force: none fitting recomputes less
    modes = ("none", "selective", "full")
    for budget in (0.5 * (all_selective + everything), 1.1 * activation_bytes(cfg, ["full"] * 3, tokens, s), 0.9 * all_selective):
        got = plan_recompute(cfg, "auto", lengths, budget, s)
        assert activation_bytes(cfg, got, tokens, s) <= budget
        fitting = [list(p) for p in itertools.product(modes, repeat=3) if activation_bytes(cfg, p, tokens, s) <= budget]
        assert recompute_flops(cfg, lengths, got) == min(recompute_flops(cfg, lengths, p) for p in fitting), budget


def test_peak_memory_orders_full_below_selective_below_none():
    model = tiny(torch.float32)
    g = torch.Generator().manual_seed(4)
    batch = pack([torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in (200, 300)])

    def step(plan):
        def run():
            model.zero_grad(set_to_none=True)
            model.set_recompute(plan)
            h = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
            h.sum().backward()
        return run

    run_once = step("none")
    run_once()  # grads allocated once, outside the measurement
    peaks = {mode: peak_cpu_bytes(step(mode)) for mode in ("none", "selective", "full")}
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
