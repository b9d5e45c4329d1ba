"""The Triton path of fused_logprobs: under the interpreter on CPU (CI), natively on a GPU.

Same oracle and fp32 tolerance as test_logprobs.py (float64 reference on materialised logits).
bf16/fp16 gradients get a wider envelope than the torch path's, because the Triton backward
rounds dx = ∂L/∂logits to the input dtype before its two GEMMs (as verl's and Liger's fused
backwards do, so that the GEMMs run on tensor cores): see assert_within_low_precision_envelope.

Interpreter runs cost ~0.1 ms per Triton op, so shapes stay at T·V ≈ 40k, except one
V = 151,936 case run with wider interpreter tiles.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

pytest.importorskip("triton")

import dsr_fast.kernels.logprobs as L  # noqa: E402
from dsr_fast.kernels import fused_logprobs  # noqa: E402
from test_logprobs import (  # noqa: E402
    FP32_EPS,
    FP32_RTOL,
    assert_close_rel,
    assert_matches_reference,
    fused_with_grads,
    logit_scale,
    make_inputs,
    reference_with_grads,
    upstream_grads,
)
from triton_testing import compile_jobs_for_gpu, patch_interpreter_bf16_dot  # noqa: E402

INTERPRETED = not torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
if INTERPRETED:
    patch_interpreter_bf16_dot()


def to_device(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def triton_with_grads(hidden, weight, labels, temperature, g_lp, g_h, **kwargs):
    """fused_with_grads through the Triton backend, results back on the CPU."""
    args = to_device(hidden, weight, labels)
    results = fused_with_grads(*args, temperature, *to_device(g_lp, g_h), backend="triton", **kwargs)
    return tuple(None if r is None else r.cpu() for r in results)


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


# ---------------------------------------------------------------------------------------------
# fp32 against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["both", "logprob", "entropy"])
@pytest.mark.parametrize("kind", ["random", "peaked", "flat"])
@pytest.mark.parametrize("temperature", [0.6, 1.5])
def test_fp32_matches_reference(temperature, kind, upstream):
    """T = 37 and V = 1,001 are multiples of no tile: ragged token tiles, vocab tiles, forward
    splits and backward slabs (the interpreter tiles split V into 4 splits and 4 slabs)."""
    seed = seed_of("triton", temperature, kind, upstream)
    hidden, weight, labels = make_inputs(37, 64, 1001, kind, seed)
    g_lp, g_h = upstream_grads(37, upstream, seed)
    got = triton_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    want = reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.float32
    assert (got[1] is None) == (g_h is None)
    assert_matches_reference(got, want, hidden, weight, temperature, labels, g_lp, g_h)


@pytest.mark.parametrize(
    "hidden_size, temperature, kind",
    [(1536, 0.6, "peaked"), (1536, 1.5, "random"), (72, 0.6, "random"), (37, 1.5, "flat")],
)
def test_fp32_hidden_sizes(hidden_size, temperature, kind):
    """H = 1536 (the real model: 24 K-steps per tile); 72 and 37 are no multiple of BLOCK_K
    (masked K loop), and 37 also leaves rows unaligned (no ALIGNED hints)."""
    seed = seed_of("hidden", hidden_size, temperature, kind)
    hidden, weight, labels = make_inputs(21, hidden_size, 515, kind, seed)
    g_lp, g_h = upstream_grads(21, "both", seed)
    got = triton_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    want = reference_with_grads(hidden, weight, labels, temperature, g_lp, g_h)
    assert_matches_reference(got, want, hidden, weight, temperature, labels, g_lp, g_h)


def test_peaked_rows_have_finite_outputs():
    """All logits ≈ −250/τ: a 0 max identity (verl #2656) gives garbage; −∞ gives logp ≈ 0 at the argmax."""
    hidden, weight, _ = make_inputs(37, 64, 1001, "peaked", seed=3)
    z = hidden.double() @ weight.double().T / 0.6
    assert float(z.max()) < -100
    lp, ent = fused_logprobs(*to_device(hidden, weight, z.argmax(dim=1)), temperature=0.6,
                             return_entropy=True, backend="triton")
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert float(lp.min()) > -1.0 and float(lp.max()) <= 0.0


def test_full_vocab(monkeypatch):
    """V = 151,936 (R1-Distill-Qwen) at T = 3 and the recipe's τ = 0.6, through every kernel.
    Interpreter tiles 16×2048 keep it to ~150 programs; each launch costs the interpreter ~0.5 s
    of setup, so 2 backward slabs (one boundary, one ragged slab) rather than 4. Temperatures
    and the production tiles are covered at small V."""
    wide = L.LogprobsKernelConfig(
        forward=L.TileConfig(16, 2048, 32, 4, 1), split_cols=16384,
        grad_logits=L.TileConfig(16, 2048, 32, 4, 1), grad_hidden=L.TileConfig(16, 32, 2048, 4, 1),
        grad_weight=L.TileConfig(2048, 32, 16, 4, 1), group=2, num_slabs=2, max_workspace_bytes=2**20,
    )
    if INTERPRETED:
        monkeypatch.setattr(L, "_INTERPRETER", wide)
    hidden, weight, labels = make_inputs(3, 32, 151_936, "random", seed=7)
    labels[0] = 151_935  # the last column, in the last (ragged) slab
    g_lp, g_h = upstream_grads(3, "both", seed=7)
    got = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    want = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    assert_matches_reference(got, want, hidden, weight, 0.6, labels, g_lp, g_h)


@pytest.mark.skipif(not INTERPRETED, reason="a GPU uses its own generation's tiles")
@pytest.mark.parametrize("config_name", ["_SM90", "_SM80", "_SM90_TF32", "_SM80_TF32", "_FP32_FMA"])
def test_production_tiles_under_interpreter(monkeypatch, config_name):
    """Every GPU config (128-wide, EVEN_K, 8 slabs at V = 1,001) computes the same thing."""
    monkeypatch.setattr(L, "_INTERPRETER", getattr(L, config_name))
    hidden, weight, labels = make_inputs(37, 128, 1001, "random", seed=47)
    g_lp, g_h = upstream_grads(37, "both", seed=47)
    got = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    want = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    assert_matches_reference(got, want, hidden, weight, 0.6, labels, g_lp, g_h)


def test_ignored_positions_give_zero_and_no_gradient():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=5)
    # ignore_index 3 is also a vocabulary id: rows labelled 3 are ignored, not gathered.
    labels = torch.where((torch.arange(37) % 4 == 1) | (labels == -100), 3, labels)
    ignored = labels == 3
    g_lp = torch.where(ignored, float("nan"), torch.ones(37))
    g_h = torch.where(ignored, float("nan"), torch.ones(37))
    lp, ent, dh, dw = triton_with_grads(hidden, weight, labels, 1.0, g_lp, g_h, ignore_index=3)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (dh[ignored] == 0).all()
    want = reference_with_grads(
        hidden, weight, labels, 1.0, torch.where(ignored, 0.0, g_lp), torch.where(ignored, 0.0, g_h), ignore_index=3
    )
    assert_matches_reference((lp, ent, dh, dw), want, hidden, weight, 1.0, labels,
                             torch.where(ignored, 0.0, g_lp), torch.where(ignored, 0.0, g_h), ignore_index=3)


def test_only_one_input_requires_grad():
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=37)
    _, _, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, torch.ones(37), None)
    h, w, y = to_device(hidden, weight, labels)
    w = w.clone().requires_grad_()
    fused_logprobs(h, w, y, temperature=0.6, backend="triton")[0].sum().backward()  # stride-0 grad
    assert_close_rel(w.grad.cpu(), ref_dw, FP32_RTOL, "grad weight")
    h = h.clone().requires_grad_()
    fused_logprobs(h, w.detach(), y, temperature=0.6, backend="triton")[0].sum().backward()
    assert_close_rel(h.grad.cpu(), ref_dh, FP32_RTOL, "grad hidden")


def test_no_grad_path_equals_grad_path():
    hidden, weight, labels = to_device(*make_inputs(37, 64, 1001, "random", seed=31))
    kwargs = dict(temperature=0.6, return_entropy=True, backend="triton")
    with_grad = fused_logprobs(hidden.clone().requires_grad_(), weight, labels, **kwargs)
    assert with_grad[0].grad_fn is not None
    with torch.no_grad():
        no_grad = fused_logprobs(hidden.clone().requires_grad_(), weight, labels, **kwargs)
    assert all(t.grad_fn is None for t in no_grad)
    assert torch.equal(no_grad[0], with_grad[0].detach()) and torch.equal(no_grad[1], with_grad[1].detach())
    logprob_only, none = fused_logprobs(hidden, weight, labels, temperature=0.6, backend="triton")
    assert none is None and torch.equal(logprob_only, no_grad[0])


def test_strided_inputs_and_empty_batch():
    hidden, weight, labels = make_inputs(37, 128, 1001, "random", seed=41)
    strided_h, strided_w = hidden[:, ::2], weight[:, ::2]  # non-contiguous views [.., 64]
    lp, _ = fused_logprobs(*to_device(strided_h, strided_w, labels), backend="triton")
    ref_lp, _, _, _ = reference_with_grads(strided_h, strided_w, labels, 1.0, torch.ones(37), None)
    assert_close_rel(lp.cpu(), ref_lp, FP32_RTOL, "logprobs")
    h0 = hidden[:0].to(DEVICE).requires_grad_()
    w0 = weight.to(DEVICE).requires_grad_()
    lp0, ent0 = fused_logprobs(h0, w0, labels[:0].to(DEVICE), return_entropy=True, backend="triton")
    assert lp0.shape == ent0.shape == (0,)
    (lp0.sum() + ent0.sum()).backward()
    assert h0.grad.shape == (0, 128) and bool((w0.grad == 0).all())


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 inputs
# ---------------------------------------------------------------------------------------------


def reference_logit_grad(hidden, weight, labels, temperature, g_lp, g_h):
    """∂L/∂x for the raw logits x = h·Wᵀ, float64 [T, V] (the dx the Triton backward rounds)."""
    h64, w64 = hidden.double(), weight.double()
    logits = (h64 @ w64.T).requires_grad_()
    z = logits / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    valid = labels != -100
    logp = log_probs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    loss = (torch.where(valid, logp, 0.0) * g_lp.double()).sum() + (torch.where(valid, entropy, 0.0) * g_h.double()).sum()
    loss.backward()
    return logits.grad


def assert_within_low_precision_envelope(name, got, want, dx_abs, operand_abs, dtype, rel_fp32):
    """|got − want| ≤ u·|want| + (1 + u)·[(u + rel_fp32)·(|dx|·|B|) + s·Σ|B|] + s, elementwise.

    got = round(Σ round(dx)·B) with B the other (exact, low-precision) GEMM operand: rounding dx
    moves each entry by ≤ u·|dx| + s (s: the dtype's subnormal spacing; fp16 flushes dx below
    ~6e-8), so the sum by ≤ u·(|dx|·|B|) + s·Σ|B|; fp32 accumulation adds rel_fp32·(|dx|·|B|), and
    the final rounding u·|result| + s. With cancellation in the sum this exceeds one rounding of
    the exact result, which is all the torch path's (fp32 throughout) costs.
    u is the unit roundoff (2⁻⁸ bf16, 2⁻¹¹ fp16), except that the interpreter converts fp32 to
    bf16 by truncation (triton/runtime/interpreter.py, _convert_float without a rounding mode),
    which errs by up to 2u; GPUs round to nearest.
    """
    u = torch.finfo(dtype).eps / 2
    if INTERPRETED and dtype == torch.bfloat16:
        u *= 2
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    products = (u + rel_fp32) * (dx_abs @ operand_abs) + spacing * operand_abs.sum(0)
    bound = u * want.abs() + (1 + u) * products + spacing
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"{name}: worst excess {float((err - bound).max()):.3e}"


@pytest.mark.parametrize("kind", ["random", "peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, kind):
    hidden, weight, labels = make_inputs(37, 64, 1001, kind, seed=17, dtype=dtype)
    g_lp, g_h = upstream_grads(37, "both", seed=17)
    lp, ent, dh, dw = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    ref_lp, ref_ent, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    assert lp.dtype == ent.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    # Products of two bf16/fp16 numbers are exact in fp32: the outputs keep the fp32 tolerance.
    rounding = 2 * FP32_EPS * logit_scale(hidden, weight, 0.6)
    assert_close_rel(lp, ref_lp, FP32_RTOL, "logprobs", atol=rounding)
    assert_close_rel(ent, ref_ent, FP32_RTOL, "entropy", atol=rounding)
    dx = reference_logit_grad(hidden, weight, labels, 0.6, g_lp, g_h).abs()
    rel_fp32 = FP32_RTOL + rounding
    assert_within_low_precision_envelope("grad hidden", dh, ref_dh, dx, weight.double().abs(), dtype, rel_fp32)
    assert_within_low_precision_envelope("grad weight", dw, ref_dw, dx.T, hidden.double().abs(), dtype, rel_fp32)


# ---------------------------------------------------------------------------------------------
# The backward GEMMs through cuBLAS (config.backward_gemm = "cublas")
# ---------------------------------------------------------------------------------------------


def _with_backward_gemm(monkeypatch, engine: str):
    """Point the config this device launches with at `engine` for the backward GEMMs."""
    if INTERPRETED:
        monkeypatch.setattr(L, "_INTERPRETER", dataclasses.replace(L._INTERPRETER, backward_gemm=engine))
    else:
        original = L.kernel_config.__wrapped__ if hasattr(L.kernel_config, "__wrapped__") else L.kernel_config

        def with_engine(device, dtype=torch.bfloat16):
            return dataclasses.replace(original(device, dtype), backward_gemm=engine)

        with_engine.__wrapped__ = original  # a second call patches the original, not a wrapper
        monkeypatch.setattr(L, "kernel_config", with_engine)


@pytest.mark.parametrize("upstream", ["both", "logprob"])
@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_cublas_backward_fp32_matches_reference(monkeypatch, kind, upstream):
    """Same dx kernel and slabs, GEMMs by torch.mm/addmm: the fp32 oracle and tolerance hold."""
    _with_backward_gemm(monkeypatch, "cublas")
    seed = seed_of("cublas", kind, upstream)
    hidden, weight, labels = make_inputs(37, 64, 1001, kind, seed)
    g_lp, g_h = upstream_grads(37, upstream, seed)
    got = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    want = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    assert_matches_reference(got, want, hidden, weight, 0.6, labels, g_lp, g_h)


def test_cublas_backward_bf16_within_envelope_and_next_to_triton(monkeypatch):
    """bf16: the cuBLAS GEMMs read the same rounded dx as the Triton ones and accumulate in fp32,
    so both stay inside the low-precision envelope, and agree with each other to a couple of
    bf16 ulps (they differ only in the fp32 summation order before the final rounding)."""
    dtype = torch.bfloat16
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=23, dtype=dtype)
    g_lp, g_h = upstream_grads(37, "both", seed=23)
    _with_backward_gemm(monkeypatch, "cublas")
    lp, ent, dh, dw = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    _with_backward_gemm(monkeypatch, "triton")
    _, _, dh_triton, dw_triton = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    _, _, ref_dh, ref_dw = reference_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    assert dh.dtype == dw.dtype == dtype
    rounding = 2 * FP32_EPS * logit_scale(hidden, weight, 0.6)
    dx = reference_logit_grad(hidden, weight, labels, 0.6, g_lp, g_h).abs()
    rel_fp32 = FP32_RTOL + rounding
    assert_within_low_precision_envelope("grad hidden", dh, ref_dh, dx, weight.double().abs(), dtype, rel_fp32)
    assert_within_low_precision_envelope("grad weight", dw, ref_dw, dx.T, hidden.double().abs(), dtype, rel_fp32)
    for name, a, b in (("grad hidden", dh, dh_triton), ("grad weight", dw, dw_triton)):
        ulp = 2 * torch.finfo(dtype).eps * b.double().abs() + torch.finfo(dtype).tiny
        assert bool(((a.double() - b.double()).abs() <= 2 * ulp).all()), name


def test_backward_gemm_table_drives_the_configs():
    """The 16-bit configs take their GEMM engine from BACKWARD_GEMMS (gpu_check fills it)."""
    assert L._SM90.backward_gemm == L.BACKWARD_GEMMS[9] and L._SM80.backward_gemm == L.BACKWARD_GEMMS[8]
    assert set(L.BACKWARD_GEMMS.values()) <= {"triton", "cublas"}
    hidden, weight, labels = to_device(*make_inputs(5, 64, 300, "random", seed=2))
    bad = dataclasses.replace(L._INTERPRETER, backward_gemm="cutlass")
    lp, ent, lse, zbar = L.logprobs_forward(hidden, weight, labels, 1.0, -100, True, 64, "triton", bad)
    with pytest.raises(ValueError, match="backward_gemm must be 'triton' or 'cublas', got 'cutlass'"):
        L.logprobs_backward(torch.ones_like(lp), None, hidden, weight, labels, lse, zbar, 1.0, -100, 64,
                            True, True, "triton", bad)


@pytest.mark.parametrize("config_name, num_sms", [("_SM90", 132), ("_SM80", 108), ("_SM90", 114)])
@pytest.mark.parametrize("num_tokens", [4096, 24576])
def test_dw_slabs_fill_whole_waves(config_name, num_sms, num_tokens):
    """Every full slab launches a whole number of dW waves (H100: 264 programs, not 228 = 1.73
    waves), the slab count stays near num_slabs, and the workspace stays under its budget."""
    config = getattr(L, config_name)
    h, v = 1536, 151_936
    cols = L.backward_slab_cols(num_tokens, v, 2, config, hidden_size=h, num_sms=num_sms)
    tile = config.grad_weight
    programs = cols // tile.block_m * -(-h // tile.block_n)
    wave = num_sms * config.grad_weight_programs_per_sm
    assert programs % wave == 0, (cols, programs, wave)
    assert cols % L._slab_align(config) == 0
    assert num_tokens * cols * 2 <= config.max_workspace_bytes
    assert config.num_slabs / 2 <= -(-v // cols) <= 2 * config.num_slabs
    # the old sizing (no SM count) is what this fixes on an H100
    if (config_name, num_sms) == ("_SM90", 132):
        old = L.backward_slab_cols(num_tokens, v, 2, config)
        assert (old // tile.block_m * (h // tile.block_n)) % wave != 0


# ---------------------------------------------------------------------------------------------
# Labels out of range: no host sync by default on a GPU, NaN instead
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_bad_labels_give_nan_not_garbage(backend):
    """With the host check off (the GPU default), a label outside [0, V) gives a NaN logprob on
    both paths; the other tokens are unaffected and ignored ones stay 0."""
    hidden, weight, labels = make_inputs(9, 64, 300, "random", seed=8)
    labels[0], labels[1], labels[2], labels[3] = 300, -5, -100, 299
    lp, ent = fused_logprobs(*to_device(hidden, weight, labels), return_entropy=True, backend=backend,
                             check_labels=False)
    lp, ent = lp.cpu(), ent.cpu()
    assert bool(lp[:2].isnan().all()) and lp[2] == 0 and ent[2] == 0
    good = torch.arange(9) >= 3
    ref_lp, _ = L.reference_logprobs(hidden, weight, torch.where(good, labels, -100))
    assert_close_rel(lp[good], ref_lp[good].float(), FP32_RTOL, "logprobs", atol=1e-5)
    with pytest.raises(ValueError, match=r"labels\[0\] = 300"):
        fused_logprobs(*to_device(hidden, weight, labels), backend=backend, check_labels=True)


def test_gpu_default_does_no_host_sync(monkeypatch):
    """On a non-CPU device fused_logprobs reads nothing back from the device, forward or backward:
    meta tensors have no data, so any host read (bool(), .item(), .tolist(), nonzero) raises.
    Bad labels pass unchecked there; DSR_FAST_CHECK_LABELS=1 turns the (syncing) check on."""
    hidden, weight, labels = make_inputs(9, 64, 300, "random", seed=9)
    labels[0] = 1000
    h = hidden.to("meta").requires_grad_()
    w = weight.to("meta").requires_grad_()
    lp, ent = fused_logprobs(h, w, labels.to("meta"), temperature=0.6, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    monkeypatch.setenv("DSR_FAST_CHECK_LABELS", "1")
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check would read data: impossible on meta
        fused_logprobs(h, w, labels.to("meta"), temperature=0.6)
    with pytest.raises(ValueError, match=r"labels\[0\] = 1000"):
        fused_logprobs(hidden, weight, labels)  # CPU tensors: checked by default, at no sync cost


@pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device (gpu_check runs this file natively)")
@pytest.mark.parametrize("engine", ["triton", "cublas"])
def test_cuda_fwd_bwd_has_no_host_sync(monkeypatch, engine):
    """On a GPU the whole fused_logprobs fwd+bwd runs under sync debug mode "error"."""
    _with_backward_gemm(monkeypatch, engine)
    hidden, weight, labels = to_device(*make_inputs(37, 64, 1001, "random", seed=12, dtype=torch.bfloat16))
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, ent = fused_logprobs(hidden, weight, labels, temperature=0.6, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(hidden.grad.float()).all() and torch.isfinite(weight.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Determinism and batch invariance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    hidden, weight, labels = make_inputs(37, 64, 1001, "random", seed=23, dtype=dtype)
    g_lp, g_h = upstream_grads(37, "both", seed=23)
    first = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    second = triton_with_grads(hidden, weight, labels, 0.6, g_lp, g_h)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_is_batch_invariant():
    """A token's logprob and entropy do not depend on the batch around it (bitwise): the vocab
    split is fixed per GPU generation and each row's dot products are independent of the others.
    Old/ref logprobs computed in a different micro-batching then match the policy's exactly."""
    hidden, weight, labels = to_device(*make_inputs(37, 64, 1001, "random", seed=53))
    full = fused_logprobs(hidden, weight, labels, return_entropy=True, backend="triton")
    part = fused_logprobs(hidden[5:21], weight, labels[5:21], return_entropy=True, backend="triton")
    assert torch.equal(part[0], full[0][5:21]) and torch.equal(part[1], full[1][5:21])


# ---------------------------------------------------------------------------------------------
# Backend choice, workspace bound
# ---------------------------------------------------------------------------------------------


def test_backend_choice():
    hidden, weight, labels = make_inputs(8, 16, 50, "random", seed=43)
    assert L.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert L.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        fused_logprobs(hidden, weight, labels, backend="cuda")
    # both backends agree to fp32 rounding
    a = fused_logprobs(hidden, weight, labels, return_entropy=True, backend="torch")
    b = fused_logprobs(*to_device(hidden, weight, labels), return_entropy=True, backend="triton")
    for x, y in zip(a, b):
        assert_close_rel(y.cpu(), x, 1e-6, "backends")


def test_config_choice(monkeypatch):
    """Tiles follow the GPU generation, and for fp32 inputs the dot precision torch asks for."""
    cuda = torch.device("cuda", 0)
    assert L.kernel_config(torch.device("cpu"), torch.bfloat16) is L._INTERPRETER
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a settings object: monkeypatch cannot undo it
    try:
        for capability, bf16, tf32 in (((9, 0), L._SM90, L._SM90_TF32), ((8, 0), L._SM80, L._SM80_TF32)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            assert L.kernel_config(cuda, torch.bfloat16) is bf16 and L.kernel_config(cuda, torch.float16) is bf16
            torch.backends.cuda.matmul.allow_tf32 = True
            assert L.kernel_config(cuda, torch.float32) is tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            assert L.kernel_config(cuda, torch.float32) is L._FP32_FMA
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


@pytest.mark.parametrize("num_tokens", [1, 8192, 24576, 10**6])
@pytest.mark.parametrize("config_name", ["_SM90", "_SM80", "_SM90_TF32", "_SM80_TF32", "_FP32_FMA"])
def test_workspace_is_bounded(config_name, num_tokens):
    config = getattr(L, config_name)
    cols = L.backward_slab_cols(num_tokens, 151_936, 2, config)
    assert cols % config.grad_logits.block_n == 0 and cols % config.grad_weight.block_m == 0
    assert cols % config.grad_hidden.block_k == 0
    # the [T, slab] bf16 dx workspace stays under the budget unless one tile column exceeds it
    assert num_tokens * cols * 2 <= max(config.max_workspace_bytes, num_tokens * 2 * L._slab_align(config))
    if num_tokens <= 24576:  # real sizes: ~V/32 columns, < 2% of the [T, V] fp32 logits
        assert cols <= 151_936 // 31 and num_tokens * cols * 2 <= 0.02 * num_tokens * 151_936 * 4


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation of the production kernels for sm_80 and sm_90
# ---------------------------------------------------------------------------------------------

_PRODUCTION_H = 1536  # R1-Distill-Qwen-1.5B
# Input variants the trainer launches: bf16 (fp16 compiles to the same tiles), and fp32 (the
# policy trains in fp32 on a GPU) with and without TF32.
_VARIANTS = {"bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"), "fp32": (torch.float32, "ieee")}
_POINTER_DTYPES = {  # pointer arguments whose dtype does not follow the inputs'
    "labels_ptr": "*i64", "partials_ptr": "*fp32", "lse_ptr": "*fp32", "mean_logit_ptr": "*fp32",
    "grad_logprobs_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "acc_ptr": "*fp32",
    "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32",
}
_FLOAT_ARGS = {"inv_temperature"}
# Triton's launcher turns integer arguments equal to 1 into constants; production tensors are
# contiguous, so their column strides are 1.
_UNIT_STRIDES = {"stride_hk", "stride_wk"}


def _production_kernels(capability: int, variant: str) -> dict:
    """kernel name → meta (constexprs + num_warps/num_stages) exactly as the launchers build
    them, with the config gpu_kernel_config picks for this GPU and input variant: H = 1536,
    entropy and both upstream grads on (the variants with the most live registers), and the
    middle-slab dh variant (reads and writes the fp32 sum)."""
    dtype, precision = _VARIANTS[variant]
    config = L.gpu_kernel_config(capability // 10, dtype, precision)
    h = _PRODUCTION_H
    return {
        "_logprobs_forward_kernel": L.forward_meta(config, h, True, True, precision),
        "_logprobs_combine_kernel": L.combine_meta(config, True),
        "_logprobs_backward_dx_kernel": L.grad_logits_meta(config, h, True, True, True, precision),
        "_logprobs_backward_dh_kernel": L.grad_hidden_meta(config, h, True, False, True, precision),
        "_logprobs_backward_dw_kernel": L.grad_weight_meta(config, h, True, precision),
    }


def _compile_request(kernel: str, capability: int, variant: str) -> dict:
    """compile_for_gpu's arguments for one production kernel, as the launcher would call it."""
    meta = dict(_production_kernels(capability, variant)[kernel])
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    operand = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[_VARIANTS[variant][0]]
    signature, constexprs = {}, dict(meta)
    for name in getattr(L, kernel).arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_DTYPES.get(name, operand)
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return dict(module="dsr_fast.kernels.logprobs", kernel=kernel, signature=signature, constexprs=constexprs,
                capability=capability, num_warps=num_warps, num_stages=num_stages)


# The combine kernel reads only fp32 partials and does not depend on the variant: compiled once.
_AOT_JOBS = [
    (kernel, capability, variant)
    for capability in (80, 90)
    for variant in _VARIANTS
    for kernel in _production_kernels(capability, variant)
    if variant == "bf16" or kernel != "_logprobs_combine_kernel"
]


@pytest.fixture(scope="module")
def compiled_kernels():
    """Every (kernel, target, variant), in two child processes side by side."""
    return compile_jobs_for_gpu(_AOT_JOBS, _compile_request)


@pytest.mark.slow
@pytest.mark.aot
@pytest.mark.parametrize("kernel, capability, variant", _AOT_JOBS)
def test_production_kernels_compile_without_spills(compiled_kernels, kernel, capability, variant):
    compiled = compiled_kernels[(kernel, capability, variant)]
    print(f"{kernel} sm_{capability} {variant}: {compiled.registers} registers, stack {compiled.stack} B, "
          f"shared {compiled.shared_bytes} B, HGMMA {compiled.count('HGMMA')}, HMMA {compiled.count('HMMA')}")
    assert compiled.spilled_bytes == 0
    # ptxas puts register spills in the stack frame (cuobjdump's STACK), not in LOCAL: these
    # kernels call no functions, so any stack means spills.
    assert compiled.stack == 0
    # the opt-in shared memory per block: 227 KB on H100/H200, 163 KB on A100
    assert compiled.shared_bytes <= (227 if capability == 90 else 163) * 1024
    meta = _production_kernels(capability, variant)[kernel]
    assert compiled.num_warps == meta["num_warps"]
    if kernel == "_logprobs_combine_kernel":
        return
    if variant == "fp32":
        # no tensor-core instruction takes fp32 operands: FMAs, and no mma at all
        assert compiled.count("HGMMA") == compiled.count("HMMA") == 0
    elif capability == 90:
        assert compiled.count("HGMMA") > 0  # wgmma, not the mma.sync fallback
        assert compiled.count("HMMA") == 0
    else:
        assert compiled.count("HMMA") > 0
    if kernel == "_logprobs_backward_dw_kernel":
        # backward_slab_cols sizes slabs in waves of num_sms × grad_weight_programs_per_sm dW
        # programs; with the occupancy this compiler really gives (registers, shared memory), a
        # slab at the real shape must still be a whole number of waves on an H100 / A100
        threads = compiled.num_warps * 32
        registers_per_warp = -(-compiled.registers * 32 // 256) * 256  # allocated in 256-register units
        per_sm = min(65536 // (registers_per_warp * compiled.num_warps),
                     (228 if capability == 90 else 164) * 1024 // max(1, compiled.shared_bytes + 1024),
                     2048 // threads)
        config = L.gpu_kernel_config(capability // 10, *_VARIANTS[variant])
        num_sms = 132 if capability == 90 else 108
        cols = L.backward_slab_cols(24576, 151_936, 2, config, hidden_size=_PRODUCTION_H, num_sms=num_sms)
        programs = cols // config.grad_weight.block_m * -(-_PRODUCTION_H // config.grad_weight.block_n)
        assert per_sm >= config.grad_weight_programs_per_sm
        assert programs % (num_sms * per_sm) == 0, (programs, per_sm, compiled.registers, compiled.shared_bytes)
