"""fused_logprobs against the float64 reference with materialised logits.

Tolerances:
- fp32: error ≤ 1e-5 relative to the largest reference value of the tensor, plus a logit-rounding
  term. An fp32 logit z carries an absolute rounding error up to ε₃₂|z|/2 that no fp32
  implementation can remove (and its GEMM's accumulation error over H, see logit_scale); it moves logp and H by that much and every p_j (hence every gradient
  entry) by that much relatively. So outputs get an extra 2ε₃₂·max|z| absolute and gradients an
  extra 2ε₃₂·max|z| relative. It matters only in the large-magnitude "peaked" case (|z| ≈ 330:
  4e-5 extra); elsewhere |z| ≲ 20 adds ≤ 5e-6.
- fp32 gradient GEMMs: dh = dz·W sums V products and dW = dzᵀ·h sums T. An fp32 sum of K terms
  carries a rounding error that grows with K and with the terms' own size, not the result's
  (cancellation): the probabilistic bound (Higham) is λ·√K·u·(|dz|·|W|) elementwise, u = 2⁻²⁴.
  λ = 4 covers the BLAS (MKL's GEMM reaches ≈2 at V = 151,936 on the CI machine, whatever its
  thread count) and is far below what a wrong term would cost (one dropped vocabulary tile
  moves dh by ~|dz|·|W|, √K/4 ≈ 100 times the bound at V = 151,936).
- bf16/fp16 inputs: the reference runs on the same rounded inputs, upcast exactly to float64.
  Upcasting is exact and products of two bf16/fp16 numbers are exact in fp32, so the outputs
  (fp32) keep the fp32 tolerance. Gradients are fp32 results rounded once to the input dtype,
  i.e. off by at most one unit roundoff u (2⁻⁸ bf16, 2⁻¹¹ fp16) relative, plus the fp32 error
  and, for fp16, its subnormal spacing.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from dsr_fast.kernels import fused_logprobs
from dsr_fast.kernels.logprobs import default_chunk_size, reference_logprobs
from dsr_fast.memory import peak_cpu_bytes

FP32_RTOL = 1e-5
FP32_EPS = torch.finfo(torch.float32).eps


def _warm_up_cpu_math() -> None:
    # Observed with torch 2.13 CPU (MKL VML statically linked), 2 OpenMP threads: in maybe 1 of 10
    # fresh processes the first torch.exp call returns, for the half of the tensor run on the
    # worker thread, values with ~1e-4 relative error; every later call is exact to 1 ulp. One
    # multi-threaded call per function and dtype before any test keeps the glitch out of results.
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(-30.0, 30.0, 1 << 16, dtype=dtype)
        x.exp(), x.abs().add(1.0).log()


_warm_up_cpu_math()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-30)
    return float((actual.double() - expected.double()).abs().max() / scale)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, atol: float = 0.0):
    err = (actual.double() - expected.double()).abs()
    bound = rtol * expected.double().abs().max() + atol
    worst = int(err.argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: max |err| {float(err.max()):.3e} > {float(bound):.3e} "
        f"(at flat index {worst}: got {float(actual.flatten()[worst])}, want {float(expected.flatten()[worst])})"
    )


def make_inputs(
    num_tokens: int, hidden_size: int, vocab_size: int, kind: str, seed: int, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], weight [V, H], labels [T] with a few ignore_index (-100) positions.

    kind: "random" (logits ~ N(0, 4)), "flat" (|logits| ~ 1e-3: p ≈ 1/V), "peaked" (every logit
    in about [−330, −170] with a spread of tens: all-negative, large magnitude, near-one-hot —
    the case a 0 max-identity gets wrong, verl #2656).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5
    if kind == "random":
        weight *= 2.0
    elif kind == "flat":
        weight *= 1e-3
    elif kind == "peaked":
        weight *= 15.0
        # A constant feature shifts every logit by −150 (exact in every dtype). The large factor
        # sits in hidden, not in the shared weight column: there, dh[:, 0] = −150·Σ_j dx_j would
        # be a sum of ±150-sized terms that cancel to 0, unresolvable in fp32 by any kernel.
        hidden[:, 0] = 150.0
        weight[:, 0] = -1.0
    else:
        raise AssertionError(kind)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    labels[:: max(num_tokens // 3, 2)] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h, ignore_index=-100):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logprobs, entropy = reference_logprobs(h64, w64, labels, temperature=temperature, ignore_index=ignore_index)
    upstream = 0.0
    if g_lp is not None:
        upstream = upstream + (logprobs * g_lp.double()).sum()
    if g_h is not None:
        upstream = upstream + (entropy * g_h.double()).sum()
    upstream.backward()
    return logprobs.detach(), entropy.detach(), h64.grad, w64.grad


def fused_with_grads(hidden, weight, labels, temperature, g_lp, g_h, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = fused_logprobs(
        hidden, weight, labels, temperature=temperature, return_entropy=g_h is not None, **kwargs
    )
    upstream = 0.0
    if g_lp is not None:
        upstream = upstream + (logprobs * g_lp).sum()
    if g_h is not None:
        upstream = upstream + (entropy * g_h).sum()
    upstream.backward()
    return logprobs.detach(), None if entropy is None else entropy.detach(), hidden.grad, weight.grad


def upstream_grads(num_tokens: int, which: str, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    g_lp = torch.empty(num_tokens).uniform_(-1, 1, generator=gen)
    g_h = torch.empty(num_tokens).uniform_(-0.5, 0.5, generator=gen)
    return (None if which == "entropy" else g_lp), (None if which == "logprob" else g_h)


def logit_scale(hidden, weight, temperature) -> float:
    """max|z|/τ, plus the logits' GEMM accumulation error over H, λ√H·u·(|h|·|W|ᵀ)/τ (see
    gemm_rounding), in units of ε: `2ε·logit_scale` bounds what an fp32 logit's error moves. The
    accumulation term dominates when large terms cancel, as the peaked case's −150 offset does."""
    h, w = hidden.double(), weight.double()
    accumulation = GEMM_LAMBDA * h.shape[-1] ** 0.5 * (FP32_EPS / 2) * float((h.abs() @ w.abs().T).max())
    return (float((h @ w.T).abs().max()) + accumulation / FP32_EPS) / temperature


GEMM_LAMBDA = 4.0


def logits_grad64(hidden, weight, labels, temperature, g_lp, g_h, ignore_index=-100):
    """dL/dz for z = h·Wᵀ (the 1/τ included), float64 [T, V]: what the gradient GEMMs multiply."""
    z = (hidden.double() @ weight.double().T).requires_grad_()
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != ignore_index
    upstream = 0.0
    if g_lp is not None:
        target = log_probs.gather(1, torch.where(valid, labels, 0).long()[:, None]).squeeze(1)
        upstream = upstream + (torch.where(valid, target, 0.0) * g_lp.double()).sum()
    if g_h is not None:
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        upstream = upstream + (torch.where(valid, entropy, 0.0) * g_h.double()).sum()
    (dz,) = torch.autograd.grad(upstream, z)
    return dz


def gemm_rounding(hidden, weight, labels, temperature, g_lp, g_h, ignore_index=-100):
    """Elementwise fp32 accumulation bounds (for dh, for dW): λ·√K·u·(|a|·|b|), see the docstring."""
    dz = logits_grad64(hidden, weight, labels, temperature, g_lp, g_h, ignore_index).abs()
    u = FP32_EPS / 2
    num_tokens, vocab_size = dz.shape
    dh = GEMM_LAMBDA * vocab_size**0.5 * u * (dz @ weight.double().abs())
    dw = GEMM_LAMBDA * num_tokens**0.5 * u * (dz.T @ hidden.double().abs())
    return dh, dw


def assert_close_gemm(actual, expected, rtol: float, gemm_bound: torch.Tensor, what: str):
    """|actual − expected| ≤ rtol·max|expected| + the GEMM's own accumulation bound, elementwise."""
    err = (actual.double() - expected.double()).abs()
    bound = rtol * expected.double().abs().max() + gemm_bound
    worst = int((err - bound).argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: |err| {float(err.flatten()[worst]):.3e} > bound {float(bound.flatten()[worst]):.3e} "
        f"(at flat index {worst}: got {float(actual.flatten()[worst])}, want {float(expected.flatten()[worst])})"
    )


def assert_matches_reference(got, want, hidden, weight, temperature, labels, g_lp, g_h, ignore_index=-100):
    """(logprobs, entropy or None, grad hidden, grad weight) within the fp32 tolerance above."""
    rounding = 2 * FP32_EPS * logit_scale(hidden, weight, temperature)
    lp, ent, dh, dw = got
    ref_lp, ref_ent, ref_dh, ref_dw = want
    assert_close_rel(lp, ref_lp, FP32_RTOL, "logprobs", atol=rounding)
    if ent is not None:
        assert_close_rel(ent, ref_ent, FP32_RTOL, "entropy", atol=rounding)
    gemm_dh, gemm_dw = gemm_rounding(hidden, weight, labels, temperature, g_lp, g_h, ignore_index)
    assert_close_gemm(dh, ref_dh, FP32_RTOL + rounding, gemm_dh, "grad hidden")
    assert_close_gemm(dw, ref_dw, FP32_RTOL + rounding, gemm_dw, "grad weight")


# ---------------------------------------------------------------------------------------------
# fp32 values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["both", "logprob", "entropy"])
@pytest.mark.parametrize("kind", ["random", "peaked", "flat"])
@pytest.mark.parametrize("temperature", [0.6, 1.5])
@pytest.mark.parametrize("hidden_size", [64, 256])
def test_fp32_matches_reference(hidden_size, temperature, kind, upstream):
    seed = zlib.crc32(repr((hidden_size, temperature, kind, upstream)).encode())  # stable across runs
    hidden, weight, labels = make_inputs(37, hidden_size, 1001, kind, seed)
    g_lp, g_h = upstream_grads(37, upstream, seed)
    # chunk_size 8 does not divide T = 37: a ragged last chunk.
    lp, ent, dh, dw = fused_with_grads(hidden, weight, labels, temperature, g_lp, g_h, chunk_size=8)
    ref_lp, ref_ent, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h)

    assert lp.dtype == torch.float32 and lp.shape == (37,)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert_matches_reference((lp, ent, dh, dw), (ref_lp, ref_ent, ref_dh, ref_dw), hidden, weight, temperature, labels, g_lp, g_h)


@pytest.mark.parametrize("temperature, kind", [(0.6, "peaked"), (1.5, "random")])
def test_fp32_real_hidden_size(temperature, kind):
    """H = 1536 (R1-Distill-Qwen-1.5B): long dot products in every logit and gradient entry."""
    seed = zlib.crc32(repr(("H1536", temperature, kind)).encode())
    hidden, weight, labels = make_inputs(37, 1536, 1001, kind, seed)
    g_lp, g_h = upstream_grads(37, "both", seed)
    got = fused_with_grads(hidden, weight, labels, temperature, g_lp, g_h, chunk_size=8)
    want = reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    assert_matches_reference(got, want, hidden, weight, temperature, labels, g_lp, g_h)


@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("temperature", [0.6, 1.5])
def test_full_vocab(kind, temperature):
    """V = 151,936 (R1-Distill-Qwen), T = 4: chunks span the whole real vocabulary."""
    hidden, weight, labels = make_inputs(4, 32, 151_936, kind, seed=7)
    g_lp, g_h = upstream_grads(4, "both", seed=7)
    lp, ent, dh, dw = fused_with_grads(hidden, weight, labels, temperature, g_lp, g_h, chunk_size=3)
    ref_lp, ref_ent, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    assert_matches_reference((lp, ent, dh, dw), (ref_lp, ref_ent, ref_dh, ref_dw), hidden, weight, temperature, labels, g_lp, g_h)


def test_peaked_case_is_finite_and_near_one_hot():
    """The all-negative case must give finite values (a 0 max identity gives −inf or garbage)."""
    hidden, weight, labels = make_inputs(37, 64, 1001, "peaked", seed=3)
    z = hidden.double() @ weight.double().T / 0.6
    assert float(z.max()) < -100  # exp(z) underflows fp32: only a real max shift works
    lp, ent = fused_logprobs(hidden, weight, labels, temperature=0.6, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    # Labels equal to the argmax get logp ≈ 0.
    argmax_labels = z.argmax(dim=1)
    lp_top, _ = fused_logprobs(hidden, weight, argmax_labels, temperature=0.6)
    assert float(lp_top.min()) > -1.0


def test_logprob_only_path_matches_entropy_path():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=11)
    g_lp, _ = upstream_grads(37, "logprob", seed=11)
    lp, ent, dh, dw = fused_with_grads(hidden, weight, labels, 0.6, g_lp, None, chunk_size=8)
    assert ent is None
    ref_lp, _, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, g_lp, None)
    assert_matches_reference((lp, None, dh, dw), (ref_lp, None, ref_dh, ref_dw), hidden, weight, 0.6, labels, g_lp, None)


def test_ignored_positions_give_zero_and_no_gradient():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=5)
    labels = torch.where((torch.arange(37) % 4 == 1) | (labels == -100), -1, labels)
    ignored = labels == -1
    # NaN upstream gradients at ignored positions must not leak into hidden or weight.
    g_lp = torch.where(ignored, float("nan"), torch.ones(37))
    g_h = torch.where(ignored, float("nan"), torch.ones(37))
    lp, ent, dh, dw = fused_with_grads(hidden, weight, labels, 1.0, g_lp, g_h, ignore_index=-1, chunk_size=5)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (dh[ignored] == 0).all()
    assert torch.isfinite(dw).all()
    ref_lp, ref_ent, ref_dh, ref_dw = reference_with_grads(
        hidden, weight, labels, 1.0, torch.where(ignored, 0.0, g_lp), torch.where(ignored, 0.0, g_h), ignore_index=-1
    )
    assert_close_rel(dw, ref_dw, FP32_RTOL, "grad weight")
    assert_close_rel(dh, ref_dh, FP32_RTOL, "grad hidden")


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, kind):
    hidden, weight, labels = make_inputs(37, 64, 1001, kind, seed=17, dtype=dtype)
    g_lp, g_h = upstream_grads(37, "both", seed=17)
    lp, ent, dh, dw = fused_with_grads(hidden, weight, labels, 0.6, g_lp, g_h, chunk_size=16)
    # The reference sees exactly the rounded inputs (bf16/fp16 → float64 is exact).
    ref_lp, ref_ent, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)

    assert lp.dtype == ent.dtype == torch.float32
    assert dh.dtype == dw.dtype == dtype
    rounding = 2 * FP32_EPS * logit_scale(hidden, weight, 0.6)
    assert_close_rel(lp, ref_lp, FP32_RTOL, "logprobs", atol=rounding)
    assert_close_rel(ent, ref_ent, FP32_RTOL, "entropy", atol=rounding)
    unit_roundoff = torch.finfo(dtype).eps / 2  # 2⁻⁸ bf16, 2⁻¹¹ fp16
    subnormal_spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for name, got, want in (("grad hidden", dh, ref_dh), ("grad weight", dw, ref_dw)):
        fp32_err = (FP32_RTOL + rounding) * float(want.abs().max())
        # Rounding x = want + fp32_err to the input dtype moves it by ≤ u·|x| (or half the
        # subnormal spacing): |got − want| ≤ u·|want| + (1 + u)·fp32_err + spacing.
        bound = unit_roundoff * want.abs() + (1 + unit_roundoff) * fp32_err + subnormal_spacing
        err = (got.double() - want).abs()
        assert bool((err <= bound).all()), f"{name}: worst excess {float((err - bound).max()):.3e}"


# ---------------------------------------------------------------------------------------------
# Determinism, chunking, no-grad path
# ---------------------------------------------------------------------------------------------


def test_deterministic():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=23)
    g_lp, g_h = upstream_grads(37, "both", seed=23)
    first = fused_with_grads(hidden, weight, labels, 0.6, g_lp, g_h, chunk_size=8)
    second = fused_with_grads(hidden, weight, labels, 0.6, g_lp, g_h, chunk_size=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_chunk_size_does_not_change_results():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=29)
    g_lp, g_h = upstream_grads(37, "both", seed=29)
    baseline = fused_with_grads(hidden, weight, labels, 0.6, g_lp, g_h, chunk_size=37)
    assert default_chunk_size(1001) >= 37  # the default here is one chunk
    gemm_bounds = gemm_rounding(hidden, weight, labels, 0.6, g_lp, g_h)
    for chunk_size in (1, 6, 36, None):
        results = fused_with_grads(hidden, weight, labels, 0.6, g_lp, g_h, chunk_size=chunk_size)
        # Only the GEMM blocking (a chunk of 1 is a GEMV) and dW's summation order change: fp32
        # rounding, not 1e-5. Values sum H = 64 products; gradients sum V or T, so each of the two
        # runs may be off by its accumulation bound.
        for name, a, b in zip(("logprobs", "entropy"), results, baseline):
            assert max_rel_err(a, b) <= 1e-6, (chunk_size, name)
        for name, a, b, gemm in zip(("grad hidden", "grad weight"), results[2:], baseline[2:], gemm_bounds):
            assert_close_gemm(a, b, 1e-6, 2 * gemm, f"{name}, chunk_size {chunk_size}")


def test_default_chunk_size_bounds_the_logits_buffer():
    from dsr_fast.kernels.logprobs import CHUNK_BYTES

    chunk = default_chunk_size(151_936)
    assert 1 <= chunk and chunk * 151_936 * 4 <= CHUNK_BYTES
    assert default_chunk_size(10**12) == 1


def test_no_grad_path_equals_grad_path():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=31)
    with_grad = fused_logprobs(
        hidden.clone().requires_grad_(), weight, labels, temperature=0.6, return_entropy=True, chunk_size=8
    )
    assert with_grad[0].grad_fn is not None and with_grad[1].grad_fn is not None
    with torch.no_grad():
        no_grad = fused_logprobs(
            hidden.clone().requires_grad_(), weight, labels, temperature=0.6, return_entropy=True, chunk_size=8
        )
    plain = fused_logprobs(hidden, weight, labels, temperature=0.6, return_entropy=True, chunk_size=8)
    for outputs in (no_grad, plain):
        assert all(t.grad_fn is None and not t.requires_grad for t in outputs)
        assert torch.equal(outputs[0], with_grad[0].detach()) and torch.equal(outputs[1], with_grad[1].detach())


def test_only_weight_requires_grad():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=37)
    weight = weight.clone().requires_grad_()
    lp, _ = fused_logprobs(hidden, weight, labels, temperature=0.6)
    lp.sum().backward()
    _, _, _, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, torch.ones(37), None)
    assert_close_rel(weight.grad, ref_dw, FP32_RTOL, "grad weight")


def test_strided_hidden_and_empty_batch():
    hidden, weight, labels = make_inputs(37, 128, 1001, "random", seed=41)
    strided = hidden[:, ::2]  # non-contiguous view [37, 64]
    lp, _ = fused_logprobs(strided, weight[:, ::2].contiguous(), labels, chunk_size=8)
    ref_lp, _ = reference_logprobs(strided, weight[:, ::2], labels)
    assert_close_rel(lp, ref_lp, FP32_RTOL, "logprobs")
    empty_lp, empty_ent = fused_logprobs(
        hidden[:0].requires_grad_(), weight, labels[:0], return_entropy=True
    )
    assert empty_lp.shape == (0,) and empty_ent.shape == (0,)


def test_peak_cpu_bytes_sees_torch_allocations():
    def allocate():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 21)  # 8 MiB, both live
        del a
        c = torch.ones(1 << 19)  # 2 MiB, into a's freed space
        del b, c

    assert peak_cpu_bytes(allocate) == 12 * 2**20


def test_chunked_peak_memory_is_a_tenth_of_naive():
    """Goal: fwd+bwd at T = 4,096, H = 256, V = 151,936 peaks at ≤ 1/10 of the naive path's memory.

    Run at V/16 with the real size's chunk (220 tokens): every buffer that grows with V (the
    [T, V] logits and their grads, the [chunk, V] chunks, the weight's gradient) is then exactly
    1/16 of its real size, so the ratio is the real one at 1/16 of the work and memory. The full
    size is measured by bench/test_bench_logprobs.py (peak_extra_MB).
    """
    num_tokens, hidden_size, vocab_size = 4096, 256, 151_936 // 16
    chunk = default_chunk_size(151_936)
    hidden, weight, labels = make_inputs(num_tokens, hidden_size, vocab_size, "random", seed=59)
    hidden.requires_grad_()
    weight.requires_grad_()
    g_lp, g_h = upstream_grads(num_tokens, "both", seed=59)

    def naive():
        log_probs = torch.log_softmax((hidden @ weight.T) / 0.6, dim=-1)
        valid = labels != -100
        lp = torch.where(valid, log_probs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1), 0.0)
        ent = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()

    def chunked():
        lp, ent = fused_logprobs(hidden, weight, labels, temperature=0.6, return_entropy=True, chunk_size=chunk)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()

    chunked_peak = peak_cpu_bytes(chunked)
    hidden.grad = weight.grad = None
    naive_peak = peak_cpu_bytes(naive)
    print(f"peak extra memory: chunked {chunked_peak / 2**20:.1f} MiB, naive {naive_peak / 2**20:.1f} MiB "
          f"(1/{naive_peak / chunked_peak:.1f}); ×16 for V = 151,936")
    assert chunked_peak * 10 <= naive_peak
    # What the chunked path holds at once: ~3 [chunk, V] fp32 buffers (logits, probabilities, a
    # temporary: see CHUNK_BYTES), the fp32 weight gradient and its output, O(T·H) for the rest.
    assert chunked_peak <= 3 * chunk * vocab_size * 4 + 2 * vocab_size * hidden_size * 4 + 4 * num_tokens * hidden_size * 4


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

_H = torch.zeros(4, 8)
_W = torch.zeros(10, 8)
_Y = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "hidden, weight, labels, kwargs, message",
    [
        (_H[0], _W, _Y, {}, r"hidden must be 2-D \[T, H\], got shape \(8,\)"),
        (_H, _W[0], _Y, {}, r"weight must be 2-D \[V, H\], got shape \(8,\)"),
        (_H, _W, _Y[None], {}, r"labels must be 1-D \[T\], got shape \(1, 4\)"),
        (_H, torch.zeros(10, 7), _Y, {}, r"disagree on H: hidden \(4, 8\) vs weight \(10, 7\)"),
        (_H, _W, _Y[:3], {}, r"labels has 3 entries but hidden has T = 4"),
        (_H, _W, _Y.float(), {}, r"labels must be an integer tensor, got dtype torch.float32"),
        (_H, _W, torch.tensor([0, 10, 1, 2]), {}, r"labels\[1\] = 10"),
        (_H, _W, torch.tensor([0, -5, 1, 2]), {}, r"\[0, V=10\) or equal ignore_index=-100; labels\[1\] = -5"),
        (_H, _W, _Y, {"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        (_H, _W, _Y, {"temperature": -0.6}, r"temperature must be a finite number > 0"),
        (_H.double(), _W.double(), _Y, {}, r"hidden must be one of .* got torch.float64"),
        (_H, _W.bfloat16(), _Y, {}, r"share a dtype, got torch.float32 and torch.bfloat16"),
        (_H, _W, _Y, {"chunk_size": 0}, r"chunk_size must be >= 1, got 0"),
    ],
)
def test_errors(hidden, weight, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused_logprobs(hidden, weight, labels, **kwargs)


def test_int32_labels_accepted():
    hidden, weight, labels = make_inputs(8, 16, 50, "random", seed=43)
    lp64, _ = fused_logprobs(hidden, weight, labels)
    lp32, _ = fused_logprobs(hidden, weight, labels.int())
    assert torch.equal(lp64, lp32)


# ---------------------------------------------------------------------------------------------
# FSDP2: the lm_head weight as a sharded parameter (2 processes, gloo, CPU)
# ---------------------------------------------------------------------------------------------

_FSDP_T, _FSDP_H, _FSDP_V, _FSDP_TEMPERATURE = 24, 16, 301, 0.6
# How the head weight reaches fused_logprobs:
#   inside  - in the root module's forward (dsr_fast.distributed.shard's layout): FSDP2 has
#             all-gathered it, fused_logprobs sees a plain tensor;
#   after   - the train.py pattern: model(...) returns hidden states, and the caller passes
#             model.lm_head.weight; the root keeps its parameters unsharded after forward;
#   dtensor - the head is its own FSDP2 unit whose forward never runs, so the weight is still a
#             sharded DTensor: fused_logprobs all-gathers it and reduce-scatters its gradient.
_FSDP_LAYOUTS = ("inside", "after", "dtensor")


class _TinyLM(torch.nn.Module):
    def __init__(self, proj: torch.Tensor, head: torch.Tensor, layout: str):
        super().__init__()
        self.proj = torch.nn.Linear(_FSDP_H, _FSDP_H, bias=False)
        self.lm_head = torch.nn.Linear(_FSDP_H, _FSDP_V, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(proj)
            self.lm_head.weight.copy_(head)
        self.layout = layout

    def forward(self, x, labels):
        hidden = self.proj(x)
        if self.layout != "inside":
            return hidden
        return fused_logprobs(
            hidden, self.lm_head.weight, labels, temperature=_FSDP_TEMPERATURE, return_entropy=True
        )


def _fsdp_inputs():
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(_FSDP_T, _FSDP_H, generator=gen)
    proj = torch.eye(_FSDP_H) + 0.3 * torch.randn(_FSDP_H, _FSDP_H, generator=gen)
    head = 2.0 * torch.randn(_FSDP_V, _FSDP_H, generator=gen) / _FSDP_H**0.5
    labels = torch.randint(0, _FSDP_V, (_FSDP_T,), generator=gen)
    labels[::5] = -100
    g_lp, g_h = upstream_grads(_FSDP_T, "both", seed=99)
    return x, proj, head, labels, g_lp, g_h


def _fsdp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """One data-parallel rank: its half of the tokens through each layout; rank 0 saves the
    gathered gradients of both weights and the local outputs of every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        x, proj, head, labels, g_lp, g_h = _fsdp_inputs()
        rows = slice(rank * _FSDP_T // world_size, (rank + 1) * _FSDP_T // world_size)
        results = {}
        for layout in _FSDP_LAYOUTS:
            model = _TinyLM(proj, head, layout)
            fully_shard(model.proj, mesh=mesh)
            if layout == "dtensor":
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if layout == "inside":
                lp, ent = model(x[rows], labels[rows])
            else:
                hidden = model(x[rows], labels[rows])
                weight = model.lm_head.weight
                results[f"{layout} weight is a DTensor"] = isinstance(weight, DTensor)
                lp, ent = fused_logprobs(
                    hidden, weight, labels[rows], temperature=_FSDP_TEMPERATURE, return_entropy=True
                )
            ((lp * g_lp[rows]).sum() + (ent * g_h[rows]).sum()).backward()
            # FSDP2 leaves each rank the mean gradient's shard; gather the full tensors.
            for name, param in (("proj", model.proj.weight), ("head", model.lm_head.weight)):
                results[f"{layout} {name}"] = param.grad.full_tensor()
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (lp.detach(), ent.detach()))
            results[f"{layout} outputs"] = gathered
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_head_weight(tmp_path):
    """Two gloo ranks on CPU, fully_shard from torch.distributed.fsdp: gradients of the head and
    of the layer below it equal the float64 single-process gradients of the mean per-rank loss."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without distributed gloo support")
    world_size = 2
    out_file = tmp_path / "grads.pt"
    mp.spawn(_fsdp_worker, args=(world_size, str(tmp_path / "init"), str(out_file)), nprocs=world_size, join=True)
    results = torch.load(out_file)

    x, proj, head, labels, g_lp, g_h = _fsdp_inputs()
    p64 = proj.double().requires_grad_()
    w64 = head.double().requires_grad_()
    ref_lp, ref_ent = reference_logprobs(x.double() @ p64.T, w64, labels, temperature=_FSDP_TEMPERATURE)
    # each rank's loss sums its own tokens; FSDP2 averages the ranks' gradients
    ((ref_lp * g_lp.double()).sum() + (ref_ent * g_h.double()).sum()).div(world_size).backward()

    rounding = 2 * FP32_EPS * logit_scale(x @ proj.T, head, _FSDP_TEMPERATURE)
    # the two outside-forward layouts do reach fused_logprobs with a plain and a sharded weight
    assert not results["after weight is a DTensor"] and results["dtensor weight is a DTensor"]
    for layout in _FSDP_LAYOUTS:
        lp = torch.cat([lp for lp, _ in results[f"{layout} outputs"]])
        ent = torch.cat([ent for _, ent in results[f"{layout} outputs"]])
        assert_close_rel(lp, ref_lp.detach(), FP32_RTOL, f"{layout}: logprobs", atol=rounding)
        assert_close_rel(ent, ref_ent.detach(), FP32_RTOL, f"{layout}: entropy", atol=rounding)
        assert_close_rel(results[f"{layout} head"], w64.grad, FP32_RTOL + rounding, f"{layout}: grad head")
        assert_close_rel(results[f"{layout} proj"], p64.grad, FP32_RTOL + rounding, f"{layout}: grad proj")
