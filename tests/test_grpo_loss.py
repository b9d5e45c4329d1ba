"""grpo_loss against the float64 reference, DeepScaleR's loss written out, and worked examples.

Every behavioural test runs on both backends: "torch", and "triton" (the kernels on the GPU when
there is one, else under the Triton interpreter on CPU tensors; tests/conftest.py sets
TRITON_INTERPRET). Triton-only tests follow: multi-block batches with small blocks, determinism,
normaliser sources, ahead-of-time compilation for sm_80/sm_90 with no register spills, and (GPU
only) no host sync and CUDA-graph capture.

Tolerance: the loss is an fp32 computation of O(1) per-token terms; we allow 1e-5 relative to
max(|reference|, 1) for values and 1e-5 relative to the largest reference entry for gradients.
"""

from __future__ import annotations

import functools
import importlib
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from dsr_fast.kernels import grpo_loss
from dsr_fast.kernels.grpo_loss import AGG_MODES, KL_TYPES, reference_grpo_loss

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU image has no hypothesis; gpu_check runs this file there natively
    given = None

# the module, not the function dsr_fast.kernels re-exports under the same name
grpo_module = importlib.import_module("dsr_fast.kernels.grpo_loss")

RTOL = 1e-5

CUDA = torch.cuda.is_available()
TRITON_RUNS = grpo_module.HAS_TRITON and (CUDA or grpo_module.triton_is_interpreted())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton with CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
# Where each backend's inputs live: the Triton kernels run on the GPU when there is one.
BACKEND_DEVICE = {"torch": torch.device("cpu"), "triton": torch.device("cuda" if CUDA else "cpu")}


def loss_fn(backend: str):
    """grpo_loss on `backend`, taking CPU tensors and returning CPU results (moved if needed)."""
    device = BACKEND_DEVICE[backend]

    def fn(*args, **kwargs):
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        loss, metrics = grpo_loss(*map(move, args), **{k: move(v) for k, v in kwargs.items()}, backend=backend)
        return loss, metrics

    return fn


def _warm_up_cpu_math() -> None:
    # Observed with torch 2.13 CPU (MKL VML statically linked), 2 OpenMP threads: in maybe 1 of 10
    # fresh processes the first torch.exp call returns, for the half of the tensor run on the
    # worker thread, values with ~1e-4 relative error; every later call is exact to 1 ulp.
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(-30.0, 30.0, 1 << 16, dtype=dtype)
        x.exp(), x.abs().add(1.0).log()


_warm_up_cpu_math()


def make_batch(lengths: list[int], seed: int, mask_prob: float = 0.8) -> dict[str, torch.Tensor]:
    """A packed batch with wide ratio spread (both clip sides hit), k3 clamps hit, A = 0 tokens.

    The second sequence (if any) is fully masked out; lengths may contain 0 and 1.
    """
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    logprobs = -3.0 * torch.rand(num_tokens, generator=gen)
    old = logprobs + 0.3 * torch.randn(num_tokens, generator=gen)
    ref = logprobs + 0.5 * torch.randn(num_tokens, generator=gen)
    if num_tokens >= 3:
        ref[0], ref[1], ref[2] = logprobs[0] + 4.0, logprobs[1] - 25.0, logprobs[2] + 30.0
    advantages = torch.randn(num_tokens, generator=gen)
    advantages[torch.rand(num_tokens, generator=gen) < 0.1] = 0.0
    entropy = 3.0 * torch.rand(num_tokens, generator=gen)
    loss_mask = torch.rand(num_tokens, generator=gen) < mask_prob
    if len(lengths) > 1:
        loss_mask[cu_seqlens[1] : cu_seqlens[2]] = False
    return dict(
        logprobs=logprobs, old_logprobs=old, advantages=advantages, cu_seqlens=cu_seqlens,
        ref_logprobs=ref, entropy=entropy, loss_mask=loss_mask,
    )


def run_with_grads(fn, batch: dict[str, torch.Tensor], upstream: float, dtype=torch.float32, device=None, **options):
    """(loss, metrics, d logprobs, d entropy) of fn (grpo_loss or the reference) at upstream·loss.

    With `device`, the leaves live there (CUDA for the Triton backend on a GPU); results come back
    to the CPU.
    """
    device = device or torch.device("cpu")
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in batch.items()}
    logprobs = inputs.pop("logprobs").clone().requires_grad_()
    entropy = inputs.pop("entropy").clone().requires_grad_()
    loss, metrics = fn(
        logprobs, inputs.pop("old_logprobs"), inputs.pop("advantages"), inputs.pop("cu_seqlens"),
        entropy=entropy, **inputs, **options,
    )
    (loss * upstream).backward()
    grad_entropy = entropy.grad if entropy.grad is not None else torch.zeros_like(entropy)
    cpu = lambda x: x.cpu()  # noqa: E731
    return cpu(loss.detach()), {k: cpu(v) for k, v in metrics.items()}, cpu(logprobs.grad), cpu(grad_entropy)


def run_backend(backend: str, batch, upstream, dtype=torch.float32, **options):
    """run_with_grads of grpo_loss on `backend`, with the inputs on that backend's device."""
    fn = functools.partial(grpo_loss, backend=backend)
    return run_with_grads(fn, batch, upstream, dtype=dtype, device=BACKEND_DEVICE[backend], **options)


def assert_matches_reference(batch, upstream=0.73, backend="torch", **options):
    loss, metrics, d_logp, d_ent = run_backend(backend, batch, upstream, **options)
    ref_loss, ref_metrics, ref_d_logp, ref_d_ent = run_with_grads(
        reference_grpo_loss, batch, upstream, dtype=torch.float64, **options
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - float(ref_loss)) <= RTOL * max(abs(float(ref_loss)), 1.0), (float(loss), float(ref_loss))
    for name, got, want in (("d logprobs", d_logp, ref_d_logp), ("d entropy", d_ent, ref_d_ent)):
        assert got.dtype == torch.float32
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-12)
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= RTOL * scale + 1e-12, f"{name}: max err {err:.3e} vs scale {scale:.3e}"
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert abs(float(value) - float(ref_metrics[name])) <= RTOL * max(abs(float(ref_metrics[name])), 1.0), name


LENGTHS = [5, 4, 1, 0, 9, 3, 1, 12, 7]

VARIANTS = {
    "plain": dict(entropy_coef=0.01),
    "clip_higher": dict(clip_low=0.2, clip_high=0.28, entropy_coef=0.01),
    "dual_clip": dict(dual_clip=1.3, entropy_coef=0.01),  # low c so that ρ > c actually happens
    "gspo": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "no_entropy": dict(entropy_coef=0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_reference(agg, kl_type, variant, backend):
    batch = make_batch(LENGTHS, seed=len(agg) * 31 + len(variant))
    assert_matches_reference(
        batch, upstream=-1.7, backend=backend, agg=agg, kl_type=kl_type, kl_coef=0.05, **VARIANTS[variant]
    )


if given is not None:

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(
        lengths=st.lists(st.integers(0, 12), min_size=1, max_size=7),
        seed=st.integers(0, 2**16),
        mask_prob=st.sampled_from([0.0, 0.5, 1.0]),
        agg=st.sampled_from(AGG_MODES),
        kl_type=st.sampled_from(KL_TYPES),
        kl_coef=st.sampled_from([0.0, 0.001, 0.3]),
        entropy_coef=st.sampled_from([0.0, 0.001, -0.02]),
        ratio_level=st.sampled_from(["token", "sequence"]),
        dual_clip=st.sampled_from([None, 1.3, 3.0]),
        clip_high=st.sampled_from([0.2, 0.28]),
        upstream=st.floats(-3.0, 3.0).filter(lambda g: abs(g) > 1e-3),
    )
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_random_batches_match_reference(
        backend, lengths, seed, mask_prob, agg, kl_type, kl_coef, entropy_coef, ratio_level, dual_clip, clip_high, upstream
    ):
        batch = make_batch(lengths, seed, mask_prob)
        assert_matches_reference(
            batch, upstream, backend=backend, agg=agg, kl_type=kl_type, kl_coef=kl_coef, entropy_coef=entropy_coef,
            ratio_level=ratio_level, dual_clip=dual_clip, clip_high=clip_high,
        )
else:

    @pytest.mark.skip(reason="needs hypothesis (not installed)")
    def test_random_batches_match_reference():
        pass


# ---------------------------------------------------------------------------------------------
# DeepScaleR's loss, from recipe.md §1.3, written out here
# ---------------------------------------------------------------------------------------------


def deepscaler_loss(logp, old, adv, ref, entropy, mask):
    """pg − 0.001·mean(H) + 0.001·mean(k3), masked token-means over the micro-batch (float64)."""
    m = mask.double()

    def masked_mean(x):
        return (x * m).sum() / m.sum()

    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    k3 = torch.clamp(torch.exp(ref - logp) - (ref - logp) - 1, -10, 10)
    return masked_mean(pg) - 0.001 * masked_mean(entropy) + 0.001 * masked_mean(k3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepscaler_loss_reproduced_exactly(backend):
    batch = make_batch(LENGTHS, seed=2025)
    # GRPO advantages are per sequence, broadcast to tokens.
    per_seq = torch.tensor([1.2, -0.7, 0.0, 0.4, -1.5, 0.9, 0.3, -0.2, 0.8])
    batch["advantages"] = torch.repeat_interleave(per_seq, torch.tensor(LENGTHS))
    upstream = 1.0

    logp64 = batch["logprobs"].double().requires_grad_()
    ent64 = batch["entropy"].double().requires_grad_()
    want = deepscaler_loss(
        logp64, batch["old_logprobs"].double(), batch["advantages"].double(),
        batch["ref_logprobs"].double(), ent64, batch["loss_mask"],
    )
    want.backward()
    want = want.detach()

    loss, _, d_logp, d_ent = run_backend(
        backend, batch, upstream, kl_coef=0.001, kl_type="k3", entropy_coef=0.001,
        clip_low=0.2, clip_high=0.2, agg="token-mean",
    )
    assert abs(float(loss) - float(want)) <= RTOL * max(abs(float(want)), 1.0)
    torch.testing.assert_close(d_logp.double(), logp64.grad, rtol=RTOL, atol=RTOL * float(logp64.grad.abs().max()))
    torch.testing.assert_close(d_ent.double(), ent64.grad, rtol=RTOL, atol=1e-12)
    # The batch exercises both clip sides and the k3 clamp.
    ratio = torch.exp(batch["logprobs"] - batch["old_logprobs"])
    valid = batch["loss_mask"]
    assert bool(((ratio > 1.2) & valid).any()) and bool(((ratio < 0.8) & valid).any())


# ---------------------------------------------------------------------------------------------
# Global normalisers: micro-batches add up to the full batch
# ---------------------------------------------------------------------------------------------


def slice_batch(batch: dict[str, torch.Tensor], first_seq: int, end_seq: int) -> dict[str, torch.Tensor]:
    cu = batch["cu_seqlens"]
    start, end = int(cu[first_seq]), int(cu[end_seq])
    sliced = {k: v[start:end] for k, v in batch.items() if k != "cu_seqlens"}
    sliced["cu_seqlens"] = cu[first_seq : end_seq + 1] - start
    return sliced


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_sum_to_full_batch(agg, ratio_level, backend):
    batch = make_batch(LENGTHS, seed=77)
    options = dict(agg=agg, ratio_level=ratio_level, kl_coef=0.01, entropy_coef=0.003, dual_clip=3.0)
    full_loss, _, full_d_logp, full_d_ent = run_backend(backend, batch, 1.0, **options)

    valid = batch["loss_mask"]
    counts = torch.stack([valid[a:b].sum() for a, b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])])
    global_options = dict(
        num_global_tokens=valid.sum(),  # a 0-dim tensor, as after an all-reduce
        num_global_seqs=int((counts > 0).sum()),
        norm_len=int(counts.max()),
    )
    parts = [run_backend(backend, slice_batch(batch, a, b), 1.0, **options, **global_options)
             for a, b in ((0, 3), (3, 4), (4, 9))]
    summed = sum(float(p[0]) for p in parts)
    assert abs(summed - float(full_loss)) <= RTOL * max(abs(float(full_loss)), 1.0)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), full_d_logp, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.cat([p[3] for p in parts]), full_d_ent, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_worked_example(backend):
    """Four tokens, ratios e^{±0.3}, e^{∓0.4}; numbers written out by hand."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    old = torch.tensor([-1.3, -0.6, -0.6, -1.3])  # ρ = e^{0.3} ≈ 1.3499, e^{-0.4} ≈ 0.6703
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    entropy = torch.tensor([0.5, 1.0, 1.5, 2.0])
    ref = torch.tensor([-1.0, -1.1, -0.9, -1.0])
    cu = torch.tensor([0, 2, 4])
    loss, metrics = loss_fn(backend)(logp, old, adv, cu, entropy=entropy, ref_logprobs=ref, dual_clip=1.3, kl_type="k1")
    up, down = math.exp(0.3), math.exp(-0.4)
    # token 0: A>0, ρ>1.2 → clipped high, pg = −1.2
    # token 1: A<0, ρ<0.8 → clipped low,  pg = 0.8
    # token 2: A>0, ρ<0.8 → not clipped (unclipped branch is the max), pg = −ρ
    # token 3: A<0, ρ>1.2 → not clipped by ε, but ρ > c = 1.3 → dual-clipped, pg = 1.3
    expected = {
        "clip_frac_low": 0.25,
        "clip_frac_high": 0.25,
        "clip_frac_dual": 0.25,
        "approx_kl": (-0.3 + 0.4 + 0.4 - 0.3) / 4,
        "ratio_mean": (2 * up + 2 * down) / 4,
        "pg_loss": (-1.2 + 0.8 - down + 1.3) / 4,
        "entropy_mean": 1.25,
        "kl_mean": (0.0 + 0.1 - 0.1 + 0.0) / 4,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert abs(float(metrics[name]) - value) < 1e-6, name
    assert abs(float(loss) - expected["pg_loss"]) < 1e-6  # kl_coef = entropy_coef = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_are_masked_token_means(backend):
    batch = make_batch(LENGTHS, seed=5)
    _, metrics = loss_fn(backend)(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["cu_seqlens"],
        ref_logprobs=batch["ref_logprobs"], entropy=batch["entropy"], loss_mask=batch["loss_mask"],
        clip_low=0.2, clip_high=0.28,
    )
    m = batch["loss_mask"]
    logp, old, adv = (batch[k][m].double() for k in ("logprobs", "old_logprobs", "advantages"))
    ratio = torch.exp(logp - old)
    d = batch["ref_logprobs"][m].double() - logp
    by_hand = {
        "clip_frac_low": ((adv < 0) & (ratio < 0.8)).double().mean(),
        "clip_frac_high": ((adv > 0) & (ratio > 1.28)).double().mean(),
        "approx_kl": (old - logp).mean(),
        "ratio_mean": ratio.mean(),
        "pg_loss": torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)).mean(),
        "entropy_mean": batch["entropy"][m].double().mean(),
        "kl_mean": (torch.exp(d) - d - 1).clamp(max=10).mean(),
    }
    assert set(metrics) == set(by_hand)
    for name, value in by_hand.items():
        assert abs(float(metrics[name]) - float(value)) <= 1e-6 * max(1.0, abs(float(value))), name
    assert float(by_hand["clip_frac_low"]) > 0 and float(by_hand["clip_frac_high"]) > 0


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_mask_gives_zero_loss_and_zero_grads(agg, ratio_level, backend):
    batch = make_batch([4, 1, 0, 6], seed=9)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    # Garbage at masked-out positions must not leak into the loss or the gradients.
    batch["old_logprobs"][0] = float("nan")
    batch["ref_logprobs"][1] = float("inf")
    loss, metrics, d_logp, d_ent = run_backend(
        backend, batch, 1.0, agg=agg, ratio_level=ratio_level, kl_coef=0.1, entropy_coef=0.01
    )
    assert float(loss) == 0.0
    assert torch.equal(d_logp, torch.zeros_like(d_logp)) and torch.equal(d_ent, torch.zeros_like(d_ent))
    assert all(float(v) == 0.0 or math.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["clip_frac_low"]) == 0.0 and float(metrics["pg_loss"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = BACKEND_DEVICE[backend]
    empty = torch.zeros(0, device=device).requires_grad_()
    loss, metrics = grpo_loss(
        empty, empty.detach(), empty.detach(), torch.tensor([0], device=device), agg="seq-mean-token-sum-norm",
        backend=backend,
    )
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    loss.backward()
    assert empty.grad is not None and empty.grad.shape == (0,)
    # sequences that are all empty: T = 0 with B = 3
    loss, _ = grpo_loss(empty, empty.detach(), empty.detach(), torch.zeros(4, dtype=torch.int32, device=device),
                        agg="seq-mean-token-mean", ratio_level="sequence", backend=backend)
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_logprobs_and_entropy_only(backend):
    batch = {k: v.to(BACKEND_DEVICE[backend]) for k, v in make_batch(LENGTHS, seed=13).items()}
    names = ("logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy")
    leaves = {k: batch[k].clone().requires_grad_() for k in names}
    loss, _ = loss_fn(backend)(
        leaves["logprobs"], leaves["old_logprobs"], leaves["advantages"], batch["cu_seqlens"],
        ref_logprobs=leaves["ref_logprobs"], entropy=leaves["entropy"], loss_mask=batch["loss_mask"],
        kl_coef=0.1, entropy_coef=0.01,
    )
    loss.backward()
    assert leaves["logprobs"].grad is not None and leaves["entropy"].grad is not None
    assert all(leaves[k].grad is None for k in ("old_logprobs", "advantages", "ref_logprobs"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path_equals_grad_path(backend):
    batch = make_batch(LENGTHS, seed=17)
    options = dict(agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01, ratio_level="sequence")
    with_grad, with_grad_metrics, _, _ = run_backend(backend, batch, 1.0, **options)
    inputs = dict(batch)
    with torch.no_grad():
        loss, metrics = loss_fn(backend)(
            inputs.pop("logprobs").requires_grad_(), inputs.pop("old_logprobs"), inputs.pop("advantages"),
            inputs.pop("cu_seqlens"), **inputs, **options,
        )
    assert loss.grad_fn is None and torch.equal(loss.cpu(), with_grad)
    assert all(torch.equal(metrics[k].cpu(), with_grad_metrics[k]) for k in metrics)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_as_float_and_int32_cu_seqlens(backend):
    batch = make_batch(LENGTHS, seed=19)
    fn = loss_fn(backend)
    as_bool, _ = fn(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["cu_seqlens"],
                    loss_mask=batch["loss_mask"], agg="seq-mean-token-mean")
    as_float, _ = fn(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["cu_seqlens"].int(),
                     loss_mask=batch["loss_mask"].float(), agg="seq-mean-token-mean")
    as_int, _ = fn(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["cu_seqlens"],
                   loss_mask=batch["loss_mask"].int(), agg="seq-mean-token-mean")
    assert torch.equal(as_bool, as_float) and torch.equal(as_bool, as_int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logprobs_get_bf16_grads(backend):
    batch = make_batch(LENGTHS, seed=23)
    loss, _, d_logp, d_ent = run_backend(backend, batch, 1.0, dtype=torch.bfloat16, entropy_coef=0.01)
    assert loss.dtype == torch.float32 and d_logp.dtype == torch.bfloat16 and d_ent.dtype == torch.bfloat16
    # the same numbers as the fp32 path on the bf16-rounded inputs, up to the final bf16 rounding
    rounded = {k: (v.bfloat16().float() if v.is_floating_point() else v) for k, v in batch.items()}
    want_loss, _, want_d_logp, want_d_ent = run_backend(backend, rounded, 1.0, entropy_coef=0.01)
    assert abs(float(loss) - float(want_loss)) <= RTOL * max(1.0, abs(float(want_loss)))
    # The interpreter's fp32 → bf16 cast truncates (triton/runtime/interpreter.py cast_impl passes
    # no rounding mode); the GPU's rounds to nearest even. So: exact, or within one bf16 ulp there.
    rtol = 2.0**-7 if backend == "triton" and not CUDA else 0.0
    torch.testing.assert_close(d_logp.float(), want_d_logp.bfloat16().float(), rtol=rtol, atol=0)
    torch.testing.assert_close(d_ent.float(), want_d_ent.bfloat16().float(), rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_million_tokens(backend, monkeypatch):
    """T = 10M in 1,000 sequences: vectorised, no per-sequence loop; closed-form check.

    Under the interpreter (numpy, ~0.1 µs per token per op) only the token-mean kernel with huge
    blocks fits the time budget; elsewhere GSPO with seq-mean-token-mean (segment pass + search).
    """
    interpreted = backend == "triton" and not CUDA
    if interpreted:
        monkeypatch.setattr(grpo_module, "BLOCK_TOKENS", 1 << 18)
    device = BACKEND_DEVICE[backend]
    num_seqs, seq_len = 1_000, 10_000
    per_seq = torch.where(torch.arange(num_seqs, device=device) % 3 == 0, -1.0, 0.5)
    advantages = per_seq.repeat_interleave(seq_len)
    logprobs = torch.full((num_seqs * seq_len,), -0.5, requires_grad=True, device=device)
    cu_seqlens = torch.arange(0, num_seqs * seq_len + 1, seq_len, dtype=torch.int32, device=device)
    options = dict(agg="token-mean") if interpreted else dict(agg="seq-mean-token-mean", ratio_level="sequence")
    loss, metrics = grpo_loss(logprobs, logprobs.detach(), advantages, cu_seqlens, backend=backend, **options)
    loss.backward()
    # ρ = 1 everywhere, so ℓ_t = −A and the loss is −mean_i A_i (all n_i equal);
    # ∂/∂logp_t = −A_t / (n_i · S) = −A_t / T.
    assert abs(float(loss.detach()) + float(per_seq.mean())) < 1e-6
    torch.testing.assert_close(logprobs.grad, -advantages / (seq_len * num_seqs))
    assert float(metrics["ratio_mean"]) == 1.0


# ---------------------------------------------------------------------------------------------
# Triton path: block boundaries, determinism, normaliser sources, AOT compilation, no host sync
# ---------------------------------------------------------------------------------------------


def random_lengths(num_seqs: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_len + 1, (num_seqs,), generator=gen).tolist()


@needs_triton
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_triton_small_blocks_many_sequences(agg, ratio_level, monkeypatch):
    """Sequences straddle token blocks, sequence loops take several steps, and the finalize walks
    many rows of partials and many counts: small blocks make every loop iterate at a small T."""
    monkeypatch.setattr(grpo_module, "BLOCK_TOKENS", 64)
    monkeypatch.setattr(grpo_module, "BLOCK_SEGMENT", 16)
    monkeypatch.setattr(grpo_module, "BLOCK_FINALIZE", 8)
    lengths = random_lengths(50, 40, seed=len(agg)) + [1, 0, 90]  # ~1,100 tokens, ~18 blocks
    batch = make_batch(lengths, seed=3, mask_prob=0.7)
    options = dict(agg=agg, ratio_level=ratio_level, kl_type="k3", kl_coef=0.02, entropy_coef=0.005, dual_clip=3.0)
    if ratio_level == "sequence":
        options.update(clip_low=3e-4, clip_high=4e-4)
    assert_matches_reference(batch, upstream=0.9, backend="triton", **options)


@needs_triton
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_triton_is_deterministic(ratio_level):
    """No float atomics: two runs give the same bits (loss, metrics, gradients)."""
    batch = make_batch(random_lengths(60, 60, seed=8), seed=4)
    options = dict(agg="seq-mean-token-mean", ratio_level=ratio_level, kl_coef=0.01, entropy_coef=0.001)
    first, second = (run_backend("triton", batch, 0.5, **options) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


@needs_triton
@pytest.mark.parametrize("agg", AGG_MODES)
def test_triton_normaliser_sources_agree(agg):
    """A normaliser given as a number, a CPU tensor or a device tensor gives the same loss and grads."""
    batch = make_batch(LENGTHS, seed=31)
    device = BACKEND_DEVICE["triton"]
    results = [
        run_backend("triton", batch, 1.0, agg=agg, num_global_tokens=tokens, num_global_seqs=seqs, norm_len=13)
        for tokens, seqs in (
            (57, 11),
            (57.0, 11.0),
            (torch.tensor(57), torch.tensor([11])),
            (torch.tensor(57, device=device), torch.tensor(11.0, device=device)),
        )
    ]
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[2], results[0][2])
    ref_loss = run_with_grads(
        reference_grpo_loss, batch, 1.0, dtype=torch.float64, agg=agg, num_global_tokens=57, num_global_seqs=11,
        norm_len=13,
    )[0]
    assert abs(float(results[0][0]) - float(ref_loss)) <= RTOL * max(1.0, abs(float(ref_loss)))


def test_backend_selection(monkeypatch):
    assert grpo_module.select_backend("auto", torch.device("cpu")) == "torch"
    assert grpo_module.select_backend("torch", torch.device("cpu")) == "torch"
    if grpo_module.HAS_TRITON:
        assert grpo_module.select_backend("auto", torch.device("cuda")) == "triton"
        monkeypatch.setattr(grpo_module, "triton_is_interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            grpo_module.select_backend("triton", torch.device("cpu"))


@needs_cuda
@needs_triton
def test_triton_no_host_sync_and_cuda_graph():
    """The whole fwd+bwd runs with sync debug mode "error" and replays from a CUDA graph."""
    batch = {k: v.cuda() for k, v in make_batch(random_lengths(64, 300, seed=2), seed=6).items()}
    logprobs = batch.pop("logprobs").requires_grad_()
    entropy = batch.pop("entropy").requires_grad_()
    options = dict(kl_coef=0.001, entropy_coef=0.001, num_global_tokens=batch["loss_mask"].sum())

    def step():
        logprobs.grad = entropy.grad = None
        loss, metrics = grpo_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], batch["cu_seqlens"],
            ref_logprobs=batch["ref_logprobs"], entropy=entropy, loss_mask=batch["loss_mask"], **options,
        )
        loss.backward()
        return loss, metrics

    torch.cuda.set_sync_debug_mode("error")
    try:
        eager_loss, eager_metrics = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager_grads = logprobs.grad.clone(), entropy.grad.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture (compiles kernels, fills the allocator pools)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    logprobs.grad = entropy.grad = None
    with torch.cuda.graph(graph):
        graph_loss, graph_metrics = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_loss, eager_loss)
    assert all(torch.equal(graph_metrics[k], eager_metrics[k]) for k in eager_metrics)
    assert torch.equal(logprobs.grad, eager_grads[0]) and torch.equal(entropy.grad, eager_grads[1])


# Every kernel in the configurations production launches (DeepScaleR: fp32 logprobs/entropy from
# fused_logprobs, bool mask read as bytes, int32 cu_seqlens, token-mean with an int token count,
# k3 + entropy, grads), plus the heaviest variant of the others (GSPO + seq-mean-token-mean +
# dual clip, bf16 inputs, segment pass with log-ratios).
_FP32 = "*fp32"
_FWD_SIGNATURE = dict(
    logp_ptr=_FP32, old_ptr=_FP32, adv_ptr=_FP32, ref_ptr=_FP32, ent_ptr=_FP32, mask_ptr="*u8",
    cu_seqlens_ptr="*i32", seq_counts_ptr="*i32", grad_logp_ptr=_FP32, grad_ent_ptr=_FP32, partials_ptr=_FP32,
    num_tokens="i32", num_seqs="i32", search_steps="i32",
    clip_lower="fp32", clip_upper="fp32", dual_clip="fp32", kl_coef="fp32", entropy_coef="fp32",
)
_FWD_CONSTEXPRS = dict(KL_TYPE=3, HAS_ENTROPY=True, HAS_MASK=True, DUAL_CLIP=False, SEQ_WEIGHTS=False,
                       COMPUTE_GRADS=True, BLOCK=grpo_module.BLOCK_TOKENS)
_GSPO_SIGNATURE = {
    **{k: ("*bf16" if k in ("logp_ptr", "old_ptr", "ref_ptr", "ent_ptr") else v)
       for k, v in _FWD_SIGNATURE.items() if k != "grad_logp_ptr"},
    "seq_log_ratio_ptr": _FP32, "grad_logp_ptr": _FP32,
}
_GSPO_SIGNATURE = {k: _GSPO_SIGNATURE[k] for k in [*list(_FWD_SIGNATURE)[:8], "seq_log_ratio_ptr", *list(_FWD_SIGNATURE)[8:]]}
AOT_CONFIGS = {
    "loss (DeepScaleR)": ("_grpo_loss_fwd_kernel", _FWD_SIGNATURE, _FWD_CONSTEXPRS),
    "finalize (token-mean, int N)": (
        "_grpo_loss_finalize_kernel",
        dict(partials_ptr=_FP32, seq_counts_ptr="*i32", global_tokens_ptr=_FP32, global_seqs_ptr=_FP32,
             loss_ptr=_FP32, grad_scale_ptr=_FP32, metrics_ptr=_FP32, num_blocks="i32", num_counted_seqs="i32",
             global_tokens="fp32", global_seqs="fp32", norm_len="fp32"),
        dict(AGG=0, TOKENS_SOURCE=grpo_module._SOURCE_VALUE, SEQS_SOURCE=grpo_module._SOURCE_LOCAL,
             BLOCK=grpo_module.BLOCK_FINALIZE),
    ),
    "backward (fp32 grads)": (
        "_grpo_loss_bwd_kernel",
        dict(grad_logp_ptr=_FP32, grad_ent_ptr=_FP32, grad_scale_ptr=_FP32, grad_loss_ptr=_FP32,
             d_logp_ptr=_FP32, d_ent_ptr=_FP32, num_tokens="i32"),
        dict(LOGP_GRAD=True, ENTROPY_GRAD=True, BLOCK=grpo_module.BLOCK_TOKENS),
    ),
    "GSPO loss (bf16, seq-mean-token-mean, dual clip)": (
        "_gspo_loss_fwd_kernel", _GSPO_SIGNATURE, dict(_FWD_CONSTEXPRS, DUAL_CLIP=True, SEQ_WEIGHTS=True),
    ),
    "segment stats (GSPO)": (
        "_segment_stats_kernel",
        dict(logp_ptr=_FP32, old_ptr=_FP32, mask_ptr="*u8", cu_seqlens_ptr="*i32", seq_counts_ptr="*i32",
             seq_log_ratio_ptr=_FP32),
        dict(HAS_MASK=True, LOG_RATIO=True, BLOCK=grpo_module.BLOCK_SEGMENT),
    ),
}


# Production kernels on both targets; the others on sm_90 only (its register use ran higher), to
# keep the suite's time down.
AOT_CAPABILITIES = {name: (80, 90) for name in list(AOT_CONFIGS)[:3]} | {name: (90,) for name in list(AOT_CONFIGS)[3:]}


@pytest.fixture(scope="module")
def compiled_kernels():
    """All AOT compilations at once, two at a time (each is a ~5 s child process)."""
    triton_testing = pytest.importorskip("triton_testing")
    jobs = {
        (name, capability): (kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs, capability)
        for name, (kernel, signature, constexprs) in AOT_CONFIGS.items()
        for capability in AOT_CAPABILITIES[name]
    }

    def compile_one(job):
        kernel, signature, constexprs, capability = job
        return triton_testing.compile_for_gpu(
            "dsr_fast.kernels.grpo_loss", kernel, signature, constexprs, capability, num_warps=grpo_module.NUM_WARPS
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(compile_one, jobs.values())))


@pytest.mark.aot
@pytest.mark.skipif(not grpo_module.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("config, capability", [(c, cap) for c in AOT_CONFIGS for cap in AOT_CAPABILITIES[c]])
def test_aot_compiles_without_spills(compiled_kernels, config, capability):
    kernel = compiled_kernels[(config, capability)]
    assert kernel.num_warps == grpo_module.NUM_WARPS
    assert kernel.spilled_bytes == 0 and kernel.stack == 0, (config, capability, kernel.registers)
    # ≤ 128 registers keeps ≥ 4 blocks of 4 warps per SM: plenty of loads in flight for a
    # bandwidth-bound kernel. Small shared memory: only the block reductions use it.
    assert kernel.registers <= 128 and kernel.shared_bytes <= 1024, (kernel.registers, kernel.shared_bytes)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

_T = torch.zeros(4)
_CU = torch.tensor([0, 4])


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((_T, _T, _T, _CU), {"agg": "seq-mean"}, r"agg must be one of \('token-mean', 'seq-mean-token-mean'"),
        ((_T, _T, _T, _CU), {"kl_type": "low_var_kl"}, r"kl_type must be one of \('k1', 'k2', 'k3'\)"),
        ((_T, _T, _T, _CU), {"ratio_level": "seq"}, r"ratio_level must be one of \('token', 'sequence'\)"),
        ((_T, _T, _T, _CU), {"kl_coef": 0.001}, r"kl_coef=0.001 needs ref_logprobs"),
        ((_T, _T, _T, _CU), {"entropy_coef": 0.001}, r"entropy_coef=0.001 needs entropy"),
        ((_T, _T, _T, _CU), {"dual_clip": 1.0}, r"dual_clip must be None or > 1, got 1.0"),
        ((_T, _T, _T, _CU), {"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ((_T, _T, _T, _CU), {"clip_high": -0.1}, r"clip_high must be >= 0"),
        ((_T, _T, _T, _CU), {"norm_len": 0}, r"norm_len must be None or an int >= 1"),
        ((_T, _T, _T, _CU), {"num_global_tokens": -1}, r"num_global_tokens must be >= 0"),
        ((_T, _T[:3], _T, _CU), {}, r"old_logprobs must have shape \[T\] = \(4,\) like logprobs, got \(3,\)"),
        ((_T, _T, _T, _CU), {"loss_mask": torch.ones(5)}, r"loss_mask must have shape \[T\]"),
        ((_T[None], _T, _T, _CU), {}, r"logprobs must be a 1-D float tensor \[T\], got shape \(1, 4\)"),
        ((_T, _T, _T, _CU.float()), {}, r"cu_seqlens must be a 1-D int32/int64 tensor"),
        ((_T, _T, _T, torch.tensor([0, 3])), {}, r"cu_seqlens must be non-decreasing from 0 to T=4, got \[0, 3\]"),
        ((_T, _T, _T, torch.tensor([0, 3, 2, 4])), {}, r"non-decreasing"),
        ((_T, _T, _T, _CU), {"backend": "cuda"}, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ],
)
def test_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo_loss(*args, **kwargs)
