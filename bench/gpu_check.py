"""The one-shot GPU check: device ceilings, correctness against float64, and every GPU path timed.

    python bench/gpu_check.py --out runs/gpu_check            # one GPU, real sizes, ~10 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check  # CPU, tiny sizes, ~1.5 minutes
    python -m dsr_fast.cost --rates runs/gpu_check/gpu_check.json

A GPU run is rare, so it must return as much as it can: the device's own ceilings are measured
first (device-to-device copy GB/s, bf16 matmul TFLOP/s) so that every later figure is read as a
fraction of what this device does, not of a spec sheet (if that section fails, the spec sheet's
ceilings stand in, and every row using one says so); then each section checks its path against
a float64 reference at a small size and times it at real size (T = 24,576 tokens, Qwen2-1.5B
shapes: H = 1536, V = 151,936) against its naive baseline. The bf16 paths training runs (the
tensor-core tiles, the dW kernel's transposed operand, both backward GEMM engines) are checked
against float64 on a real-width slice (T = 512 × the full vocabulary), and the Triton test files
run natively at the end. Each section runs on its own: a failure (or an out-of-memory) is
recorded in the table and the JSON with its traceback, and the next section still runs.

It runs from a bare checkout on the GPU image (torch 2.11, triton 3.6, transformers 5.17, no
network, no pip install): dsr_fast.kernels resolves through dsr_fast/__init__.py, and the one
missing pure-Python dependency, pylatexenc (grading section only), is imported from the wheel
carried in bench/wheels/ when it is not installed.

Output: one table (figure, value, ceiling, fraction of ceiling, naive baseline, ratio) on stdout
and in DIR/table.md; DIR/gpu_check.json with the device, versions, every section's status,
rows and details, a "rates" block that `python -m dsr_fast.cost --rates` reads, and a "tables"
block with the lines to paste into the kernels' per-generation tables (BACKWARD_GEMMS).

--dry-run runs everything at tiny sizes on the CPU (Triton kernels under TRITON_INTERPRET=1),
so that this script cannot rot between GPU runs; a test runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--dry-run" in sys.argv or not torch.cuda.is_available():
    # must be set before the first @triton.jit definition is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import dsr_fast.kernels  # noqa: E402,F401  (a bare checkout finds it too: dsr_fast/__init__.py)

from dsr_fast import cost  # noqa: E402
from dsr_fast.kernels import logprobs as logprobs_module  # noqa: E402
from dsr_fast.kernels.grpo_loss import grpo_loss, reference_grpo_loss  # noqa: E402
from dsr_fast.kernels.logprobs import fused_logprobs, reference_logprobs  # noqa: E402
from dsr_fast.model import Qwen2, Qwen2Config  # noqa: E402
from dsr_fast.packing import available_backends, pack, varlen_attention  # noqa: E402
from dsr_fast.rollout import BuiltinEngine, SamplingParams  # noqa: E402

QWEN2_1_5B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Sizes:
    copy_bytes: int
    matmul_n: int
    tokens: int  # T of the logprob head, attention and the train step
    hidden: int
    vocab: int
    check_tokens: int  # T of the float64 checks (the reference materialises [T, V] in fp64)
    bf16_check_tokens: int  # T of the bf16 real-width check (full H and V)
    gemm_tokens: int  # T of the backward GEMM engine comparison (Triton vs cuBLAS)
    loss_tokens: tuple[int, int]  # T of the GRPO loss timing: per-call µs, then bandwidth (>= 64M)
    model: dict
    mean_seq: int  # mean packed sequence length of the train step and attention
    max_seq: int
    rollout_rows: tuple[int, ...]
    rollout_prompt: int
    rollout_new: int
    dtype: torch.dtype
    reps: int
    grading_responses: int
    triton_tests_s: int = 240  # wall-clock cap of the native Triton test run


REAL = Sizes(copy_bytes=1 << 30, matmul_n=8192, tokens=24_576, hidden=1536, vocab=151_936, check_tokens=512,
             bf16_check_tokens=512, gemm_tokens=24_576, loss_tokens=(24_576, 1 << 26), model=QWEN2_1_5B, mean_seq=3500, max_seq=8192, rollout_rows=(64, 256),
             rollout_prompt=64, rollout_new=128, dtype=torch.bfloat16, reps=5, grading_responses=400)
DRY = Sizes(copy_bytes=1 << 24, matmul_n=256, tokens=256, hidden=64, vocab=1000, check_tokens=32,
            bf16_check_tokens=24, gemm_tokens=32, loss_tokens=(256, 4096), model=TINY, mean_seq=40, max_seq=96, rollout_rows=(4, 8), rollout_prompt=8,
            rollout_new=8, dtype=torch.float32, reps=2, grading_responses=40)


# -----------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over reps, after warm-up (compilation, autotuning, caches)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replay_seconds(fn, device: torch.device, reps: int) -> tuple[float, str]:
    """Mean seconds per call of fn() replayed from a CUDA graph: the kernels' time, without the
    launches and autograd bookkeeping a Python call adds (which dominate small kernels). On CPU
    (dry run): plain calls."""
    if device.type != "cuda":
        return timed(fn, device, reps), "eager calls (no CUDA graphs on CPU)"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # compile, autotune and fill the allocator pool outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = max(10, reps * 4)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3 / calls, "CUDA graph replay"


SPEC_NOTE = " [spec-sheet ceiling: ceilings not measured]"


def ceiling(ctx, key: str) -> tuple[float, str]:
    """(ceiling, note suffix): this device's measured ceiling, or, when the ceilings section
    failed, the spec sheet's, with a note that every row using it carries."""
    measured = ctx.report["ceilings"].get(key)
    if measured:
        return measured, ""
    if ctx.spec is None:
        raise CheckFailed(f"no {key} ceiling: the ceilings section failed and {ctx.report['device']['name']!r} "
                          "has no spec sheet in dsr_fast.cost")
    ctx.report.setdefault("ceiling_sources", {})[key] = f"spec sheet ({ctx.spec.name})"
    return {"copy_GBps": ctx.spec.hbm_gbps, "matmul_bf16_TFLOPs": ctx.spec.bf16_tflops}[key], SPEC_NOTE


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak device memory fn() allocates above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def row(figure, value, unit, ceiling=None, baseline=None, higher_is_better=True, note=""):
    """One table row; fraction = value / ceiling, ratio = how many times better than the baseline."""
    fraction = value / ceiling if ceiling else None
    ratio = None
    if baseline:
        ratio = value / baseline if higher_is_better else baseline / value
    return dict(figure=figure, value=value, unit=unit, ceiling=ceiling, fraction=fraction, baseline=baseline,
                ratio=ratio, note=note)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| / max |ref|: one figure per tensor, insensitive to tiny reference entries."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class CheckFailed(AssertionError):
    pass


def check(name: str, error: float, tol: float, details: dict) -> None:
    details.setdefault("errors", {})[name] = error
    if not error <= tol:  # also catches NaN
        raise CheckFailed(f"{name}: error {error:.3g} > tolerance {tol:.3g}")


def packed_lengths(total: int, mean: int, cap: int, seed: int = 0) -> list[int]:
    """Lognormal sequence lengths (RL responses) summing exactly to total."""
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(int(min(cap, max(8, rng.lognormvariate(math.log(mean), 0.6)))))
    out[-1] -= sum(out) - total
    if out[-1] < 1:
        out.pop(-2)
        out[-1] = total - sum(out[:-1])
    return out


# -----------------------------------------------------------------------------
# sections: each returns (rows, details); raising records a failure


def section_ceilings(ctx):
    dev, sz = ctx.device, ctx.sizes
    n = sz.copy_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), dev, sz.reps + 5)
    copy_gbps = 2 * sz.copy_bytes / t / 1e9  # read + write
    a = torch.randn(sz.matmul_n, sz.matmul_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    t = timed(lambda: a @ b, dev, sz.reps + 5)
    tflops = 2 * sz.matmul_n**3 / t / 1e12
    ctx.report["ceilings"] = {"copy_GBps": copy_gbps, "matmul_bf16_TFLOPs": tflops}
    spec = ctx.spec
    return [
        row("device copy (read+write)", copy_gbps, "GB/s", spec.hbm_gbps if spec else None, note="vs spec sheet"),
        row(f"bf16 matmul {sz.matmul_n}^3", tflops, "TFLOP/s", spec.bf16_tflops if spec else None,
            note="vs spec sheet"),
    ], {"copy_bytes": sz.copy_bytes, "matmul_n": sz.matmul_n}


def naive_logprobs(hidden, weight, labels, temperature):
    """What a trainer without the fused head does: full logits, fp32 log-softmax, gather."""
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1, dtype=torch.float32)
    lp = logp.gather(1, labels[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def _check_logprobs(ctx, details, backends):
    dev, sz = ctx.device, ctx.sizes
    g = torch.Generator(device="cpu").manual_seed(0)
    T, H, V = sz.check_tokens, sz.hidden, sz.vocab
    hidden = (torch.randn(T, H, generator=g) * 0.5).to(dev)
    weight = (torch.randn(V, H, generator=g) * 0.05).to(dev)
    labels = torch.randint(0, V, (T,), generator=g).to(dev)
    labels[::7] = -100
    g_lp, g_h = torch.randn(T, generator=g).to(dev), torch.randn(T, generator=g).to(dev)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp_ref, ent_ref = reference_logprobs(h64, w64, labels, temperature=0.6)
    ((lp_ref * g_lp).sum() + (ent_ref * g_h).sum()).backward()
    for backend in backends:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = fused_logprobs(h, w, labels, temperature=0.6, return_entropy=True, backend=backend)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        for name, x, ref in (("logprobs", lp, lp_ref), ("entropy", ent, ent_ref), ("grad_hidden", h.grad, h64.grad),
                             ("grad_weight", w.grad, w64.grad)):
            check(f"{backend}/{name} fp32 vs fp64", rel_err(x, ref), 1e-4, details)


def section_logprobs(ctx):
    dev, sz = ctx.device, ctx.sizes
    details: dict = {}
    # the Triton kernels under the interpreter are too slow for anything but a tiny check
    _check_logprobs(ctx, details, ["auto", "triton"] if ctx.dry_run else ["auto"])
    matmul, spec_note = ceiling(ctx, "matmul_bf16_TFLOPs")
    T, H, V = sz.tokens, sz.hidden, sz.vocab
    hidden = (torch.randn(T, H, device=dev) * 0.5).to(sz.dtype).requires_grad_()
    weight = (torch.randn(V, H, device=dev) * 0.02).to(sz.dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev)
    g_lp, g_h = torch.randn(T, device=dev), torch.randn(T, device=dev)

    def fwd_bwd(fn):
        def run():
            hidden.grad = weight.grad = None
            lp, ent = fn()
            ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        return run

    fused = fwd_bwd(lambda: fused_logprobs(hidden, weight, labels, temperature=0.6, return_entropy=True))
    naive = fwd_bwd(lambda: naive_logprobs(hidden, weight, labels, 0.6))
    t_fused, t_naive = timed(fused, dev, sz.reps), timed(naive, dev, sz.reps)
    flops = 8 * T * H * V  # forward GEMM, recomputed in backward, dh and dW GEMMs
    rows = [row(f"logprobs fwd+bwd T={T:,} V={V:,}", flops / t_fused / 1e12, "TFLOP/s", matmul,
                baseline=flops / t_naive / 1e12, note="8·T·H·V; baseline: logits + log_softmax" + spec_note)]
    mem_fused, mem_naive = peak_extra_bytes(fused, dev), peak_extra_bytes(naive, dev)
    if mem_fused is not None:
        rows.append(row("logprobs fwd+bwd peak extra memory", mem_fused / 2**30, "GiB", baseline=mem_naive / 2**30,
                        higher_is_better=False, note="goal <= 2% of naive"))
    details.update(fused_s=t_fused, naive_s=t_naive, peak_fused=mem_fused, peak_naive=mem_naive)
    rows += _compare_backward_gemms(ctx, details, matmul, spec_note)
    return rows, details


def _compare_backward_gemms(ctx, details, matmul, spec_note):
    """The logprob backward with its two GEMMs by the Triton kernels and by cuBLAS, same dx kernel,
    same slabs, same inputs (bf16 on a GPU): the faster one is this generation's BACKWARD_GEMMS
    entry. Under the interpreter (dry run) both run at a tiny size, to exercise the code."""
    dev, sz = ctx.device, ctx.sizes
    T, H, V = sz.gemm_tokens, sz.hidden, sz.vocab
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hidden = (torch.randn(T, H, device=dev) * 0.5).to(dtype)
    weight = (torch.randn(V, H, device=dev) * 0.02).to(dtype)
    labels = torch.randint(0, V, (T,), device=dev)
    g_lp, g_h = torch.randn(T, device=dev), torch.randn(T, device=dev)
    base = logprobs_module.kernel_config(dev, dtype)
    _, _, lse, zbar = logprobs_module.logprobs_forward(hidden, weight, labels, 0.6, -100, True, 1, "triton", base)
    seconds, grads = {}, {}
    for engine in ("triton", "cublas"):
        config = dataclasses.replace(base, backward_gemm=engine)

        def backward(config=config):
            return logprobs_module.logprobs_backward(g_lp, g_h, hidden, weight, labels, lse, zbar, 0.6, -100, 1,
                                                     True, True, "triton", config)

        grads[engine] = backward()
        seconds[engine] = timed(backward, dev, sz.reps)
    # same dx, fp32 sums in different orders, one final rounding: a few ulps of the input dtype
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        check(f"backward GEMMs cublas vs triton: {name}", rel_err(grads["cublas"][i], grads["triton"][i]),
              4 * torch.finfo(dtype).eps, details)
    flops = 6 * T * H * V  # logits recomputed, dh, dW
    winner = min(seconds, key=seconds.get)
    major = torch.cuda.get_device_capability(dev)[0] if dev.type == "cuda" else None
    slab = logprobs_module.backward_slab_cols(
        T, V, hidden.element_size(), base, H,
        torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else None)
    details["backward_gemms"] = dict(seconds=seconds, winner=winner, tokens=T, dtype=str(dtype), slab_cols=slab,
                                     slabs=math.ceil(V / slab))
    if major is not None:
        line = (f'BACKWARD_GEMMS[{major}] = "{winner}"  # gpu_check {ctx.report["date"][:10]} '
                f'{ctx.report["device"]["name"]}: triton {seconds["triton"] * 1e3:.2f} ms, '
                f'cublas {seconds["cublas"] * 1e3:.2f} ms (T={T:,})')
        ctx.report.setdefault("tables", {})["BACKWARD_GEMMS"] = {str(major): winner, "line": line}
        print(line, flush=True)
    return [row(f"logprobs backward, {engine} GEMMs (T={T:,})", flops / t / 1e12, "TFLOP/s", matmul,
                baseline=flops / seconds["triton"] / 1e12,
                note=f"6·T·H·V; {math.ceil(V / slab)} slabs of {slab}; baseline: Triton GEMMs; winner {winner}"
                     + spec_note)
            for engine, t in seconds.items()]


def bf16_envelope(name, got, want, dx_abs, operand_abs, interpreted, details):
    """|got − want| ≤ u·|want| + (1 + u)·[(u + 1e-5)·(|dx|·|B|) + s·Σ|B|] + s, elementwise.

    Why: the kernels round dx = ∂L/∂logits to bf16 once (≤ u·|dx| each, u = 2⁻⁸ the bf16 unit
    roundoff; s the subnormal spacing), multiply it by B (the other GEMM operand, exact in bf16)
    with fp32 accumulation (≤ ~1e-5 relative to Σ|dx||B| at these lengths), and round the result
    to bf16 once (≤ u·|result|). With cancellation in the sum this exceeds one rounding of the
    exact result; an indexing or transpose bug errs by O(|want|) and cannot pass. The Triton
    interpreter converts to bf16 by truncation (≤ 2u): doubled there.
    """
    u = 2.0**-8 * (2 if interpreted else 1)
    s = torch.finfo(torch.bfloat16).smallest_normal * torch.finfo(torch.bfloat16).eps
    bound = u * want.abs() + (1 + u) * ((u + 1e-5) * (dx_abs @ operand_abs) + s * operand_abs.sum(0)) + s
    excess = float(((got.double() - want).abs() - bound).max())
    details.setdefault("errors", {})[name] = float((got.double() - want).abs().max() / want.abs().max())
    details.setdefault("envelope_excess", {})[name] = excess
    if not excess <= 0:
        raise CheckFailed(f"{name}: outside the bf16 envelope by {excess:.3g}")


def section_logprobs_bf16(ctx):
    """fused_logprobs fwd+bwd on bf16 inputs at full width (H, V real; T = 512 tokens) against
    float64 on the same bf16 values: the tensor-core tiles (mma on sm_80, wgmma on sm_90), the dW
    kernel's transposed dx operand and both backward GEMM engines. The dry run does the same at
    tiny sizes under the interpreter."""
    dev, sz = ctx.device, ctx.sizes
    details: dict = {}
    if dev.type != "cuda":
        _interpreter_bf16_dot()
    T, H, V, tau = sz.bf16_check_tokens, sz.hidden, sz.vocab, 0.6
    g = torch.Generator().manual_seed(2)
    # model-like scales: final-norm hidden states O(1), lm_head weights ~0.03: logits/τ of O(3)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
    weight = (torch.randn(V, H, generator=g) * 0.03).to(torch.bfloat16).to(dev)
    labels = torch.randint(0, V, (T,), generator=g).to(dev)
    labels[::7] = -100
    g_lp, g_h = torch.randn(T, generator=g).to(dev), (0.5 * torch.randn(T, generator=g)).to(dev)
    valid = labels != -100
    h64, w64 = hidden.double(), weight.double()
    logits = (h64 @ w64.T).requires_grad_()
    logp_all = torch.log_softmax(logits / tau, dim=-1)
    lp_ref = torch.where(valid, logp_all.gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    ent_ref = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    ((lp_ref * g_lp).sum() + (ent_ref * g_h).sum()).backward()
    dx = logits.grad
    dh_ref, dw_ref = dx @ w64, dx.T @ h64
    del logp_all
    z_max = float(logits.detach().abs().max()) / tau
    dx_abs = dx.abs()
    base = logprobs_module.kernel_config(dev, torch.bfloat16)
    for engine in ("triton", "cublas"):
        config = dataclasses.replace(base, backward_gemm=engine)
        lp, ent, lse, zbar = logprobs_module.logprobs_forward(hidden, weight, labels, tau, -100, True, 1, "triton",
                                                              config)
        dh, dw = logprobs_module.logprobs_backward(g_lp, g_h, hidden, weight, labels, lse, zbar, tau, -100, 1,
                                                   True, True, "triton", config)
        # Products of two bf16 numbers are exact in fp32, so the outputs carry only fp32 sum and
        # softmax rounding: a few fp32 ulps of the largest logit, plus 1e-5 relative.
        out_tol = 1e-5 + 8 * 2.0**-24 * z_max
        for name, x, ref in (("logprobs", lp, lp_ref), ("entropy", ent, ent_ref)):
            err = float((x.double() - ref.detach()).abs().max())
            check(f"{engine}/{name} bf16 vs fp64 (abs)", err, out_tol * max(1.0, float(ref.detach().abs().max())),
                  details)
        bf16_envelope(f"{engine}/grad_hidden bf16 vs fp64", dh, dh_ref, dx_abs, w64.abs(), dev.type != "cuda", details)
        bf16_envelope(f"{engine}/grad_weight bf16 vs fp64", dw, dw_ref, dx_abs.T, h64.abs(), dev.type != "cuda",
                      details)
    details.update(tokens=T, hidden=H, vocab=V, logit_scale=z_max)
    worst = max(v for k, v in details["errors"].items() if "grad" in k)
    return [row(f"bf16 fwd+bwd vs fp64, T={T} H={H:,} V={V:,}", worst, "max rel err", note=(
        "triton+cublas GEMMs; logprobs/entropy/dh/dW all within bf16 bounds"))], details


def _interpreter_bf16_dot():
    """The interpreter computes bf16 tl.dot on raw bits: the test helper reads them as numbers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_testing import patch_interpreter_bf16_dot

    patch_interpreter_bf16_dot()


def grpo_inputs(T, device, seq_len, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len] * (T // seq_len) + ([T % seq_len] if T % seq_len else [])
    logprobs = -3.0 * torch.rand(T, generator=g)
    x = dict(
        logprobs=logprobs,
        old_logprobs=logprobs + 0.1 * torch.randn(T, generator=g),
        advantages=torch.randn(len(lengths), generator=g).repeat_interleave(torch.tensor(lengths)),
        ref_logprobs=logprobs + 0.1 * torch.randn(T, generator=g),
        entropy=3.0 * torch.rand(T, generator=g),
        loss_mask=torch.rand(T, generator=g) < 0.9,
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
    )
    x = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in x.items()}
    return x


DEEPSCALER_LOSS = dict(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_type="k3", entropy_coef=0.001, agg="token-mean")


def naive_grpo_loss(x):
    """DeepScaleR's loss as eager torch ops (verl's core_algos): autograd does the backward."""
    lp, m = x["logprobs"], x["loss_mask"].float()
    ratio = torch.exp(lp - x["old_logprobs"])
    pg = torch.maximum(-x["advantages"] * ratio, -x["advantages"] * ratio.clamp(0.8, 1.2))
    d = x["ref_logprobs"] - lp
    kl = (torch.exp(d) - d - 1).clamp(-10, 10)
    n = m.sum()
    return ((pg * m).sum() + 0.001 * (kl * m).sum() - 0.001 * (x["entropy"] * m).sum()) / n


def _grpo_loss_vs_fp64(ctx, x):
    """(backend, loss, grad_logprobs, grad_entropy) for each backend, and the float64 reference's
    (loss, grad_logprobs, grad_entropy) on the same inputs."""
    ref_in = {k: (v.double().requires_grad_() if k in ("logprobs", "entropy") else
                  v.double() if v.is_floating_point() else v) for k, v in x.items()}
    ref_loss, _ = reference_grpo_loss(ref_in["logprobs"], ref_in["old_logprobs"], ref_in["advantages"],
                                      ref_in["cu_seqlens"], ref_logprobs=ref_in["ref_logprobs"],
                                      entropy=ref_in["entropy"], loss_mask=ref_in["loss_mask"], **DEEPSCALER_LOSS)
    ref_loss.backward()
    runs = []
    for backend in (["auto", "triton"] if ctx.dry_run or ctx.device.type == "cuda" else ["auto"]):
        lp, ent = x["logprobs"].clone().requires_grad_(), x["entropy"].clone().requires_grad_()
        loss, _ = grpo_loss(lp, x["old_logprobs"], x["advantages"], x["cu_seqlens"], ref_logprobs=x["ref_logprobs"],
                            entropy=ent, loss_mask=x["loss_mask"], backend=backend, **DEEPSCALER_LOSS)
        loss.backward()
        runs.append((backend, loss.detach(), lp.grad, ent.grad))
    return runs, (ref_loss.detach(), ref_in["logprobs"].grad, ref_in["entropy"].grad)


def section_grpo_loss(ctx):
    dev, sz = ctx.device, ctx.sizes
    details: dict = {}
    x = grpo_inputs(256, dev, 37)
    runs, (ref_loss, ref_grad_lp, ref_grad_ent) = _grpo_loss_vs_fp64(ctx, x)
    for backend, loss, grad_lp, grad_ent in runs:
        check(f"{backend}/loss fp32 vs fp64", rel_err(loss, ref_loss), 1e-5, details)
        check(f"{backend}/grad_logprobs", rel_err(grad_lp, ref_grad_lp), 1e-5, details)
        check(f"{backend}/grad_entropy", rel_err(grad_ent, ref_grad_ent), 1e-5, details)
    _check_grpo_loss_bf16(ctx, details)

    rows = []
    copy, spec_note = ceiling(ctx, "copy_GBps")
    for T in sz.loss_tokens:
        x = grpo_inputs(T, dev, 1000)
        x["logprobs"].requires_grad_()
        x["entropy"].requires_grad_()
        n_valid = x["loss_mask"].sum()  # a device tensor: no host sync inside the captured call

        def ours():
            x["logprobs"].grad = x["entropy"].grad = None
            loss, _ = grpo_loss(x["logprobs"], x["old_logprobs"], x["advantages"], x["cu_seqlens"],
                                ref_logprobs=x["ref_logprobs"], entropy=x["entropy"], loss_mask=x["loss_mask"],
                                num_global_tokens=n_valid, **DEEPSCALER_LOSS)
            loss.backward()

        def naive():
            x["logprobs"].grad = x["entropy"].grad = None
            naive_grpo_loss(x).backward()

        t_ours, how = replay_seconds(ours, dev, sz.reps)
        t_naive, _ = replay_seconds(naive, dev, sz.reps)
        t_eager = timed(ours, dev, sz.reps)
        # the least a fused fwd+bwd moves: 5 fp32 inputs + the mask in, 2 fp32 gradients out
        min_bytes = T * (5 * 4 + 1 + 2 * 4)
        details[f"T={T}"] = dict(ours_s=t_ours, naive_s=t_naive, ours_eager_s=t_eager, timing=how, bytes=min_bytes)
        if T == sz.loss_tokens[0]:
            rows.append(row(f"grpo_loss fwd+bwd T={T:,}: time per call", t_ours * 1e6, "µs", baseline=t_naive * 1e6,
                            higher_is_better=False,
                            note=f"{how}; eager call {t_eager * 1e6:,.0f} µs; baseline: eager-torch ops, same replay"))
        else:
            rows.append(row(f"grpo_loss fwd+bwd T={T:,}: bandwidth", min_bytes / t_ours / 1e9, "GB/s", copy,
                            baseline=min_bytes / t_naive / 1e9,
                            note=f"29 B/token; {how}; baseline: eager-torch ops, same replay" + spec_note))
        del x
    return rows, details


def _check_grpo_loss_bf16(ctx, details):
    """bf16 logprobs/entropy (what a bf16 head would hand over) against float64 of the same bf16
    values. The kernel upcasts on load and sums in fp32, so the loss keeps the fp32 tolerance;
    the gradients come back in bf16: one rounding, ≤ 2⁻⁸ relative, on top."""
    dev = ctx.device
    x = grpo_inputs(256, dev, 37, seed=3)
    for k in ("logprobs", "entropy"):
        x[k] = x[k].to(torch.bfloat16)
    runs, (ref_loss, ref_grad_lp, ref_grad_ent) = _grpo_loss_vs_fp64(ctx, x)
    for backend, loss, grad_lp, grad_ent in runs:
        if grad_lp.dtype != torch.bfloat16:
            raise CheckFailed(f"{backend}: bf16 logprobs got {grad_lp.dtype} gradients")
        # one bf16 rounding: 2⁻⁸ relative; the interpreter truncates instead of rounding: 2⁻⁷
        u = 2.0**-8 * (2 if dev.type != "cuda" and backend == "triton" else 1)
        check(f"{backend}/loss bf16 inputs vs fp64", rel_err(loss, ref_loss), 1e-5, details)
        check(f"{backend}/grad_logprobs bf16", rel_err(grad_lp, ref_grad_lp), u + 1e-5, details)
        check(f"{backend}/grad_entropy bf16", rel_err(grad_ent, ref_grad_ent), u + 1e-5, details)


def reference_attention(q, k, v, cu_seqlens):
    """Causal attention per sequence in float64 with an explicit softmax (GQA by repetition)."""
    out = []
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        out.append((scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


def section_attention(ctx):
    dev, sz = ctx.device, ctx.sizes
    cfg = sz.model
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    details: dict = {}

    def qkv(lengths, dtype):
        T = sum(lengths)
        cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        tensors = [torch.randn(T, h, d, device=dev, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]
        return tensors, cu, max(lengths)

    (q, k, v), cu, mx = qkv([5, 17, 64, 1, 30], sz.dtype)
    ref = reference_attention(q, k, v, cu)
    backends = available_backends(q)
    tol = 2e-2 if sz.dtype == torch.bfloat16 else 1e-5
    for b in backends:
        check(f"{b} vs fp64", rel_err(varlen_attention(q, k, v, cu, mx, backend=b), ref), tol, details)

    lengths = packed_lengths(sz.tokens, sz.mean_seq, sz.max_seq)
    (q, k, v), cu, mx = qkv(lengths, sz.dtype)
    g = torch.randn_like(q)
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    flops = 3.5 * 4 * hq * d * pairs  # forward QKᵀ + PV; backward counted as 2.5 forwards (FA2)
    times = {}
    for b in backends:
        def run(b=b):
            q.grad = k.grad = v.grad = None
            varlen_attention(q, k, v, cu, mx, backend=b).backward(g)
        times[b] = timed(run, dev, sz.reps)
    matmul, spec_note = ceiling(ctx, "matmul_bf16_TFLOPs")
    base = flops / times["sdpa"] / 1e12
    details.update(times=times, lengths=len(lengths), tokens=sz.tokens)
    if "torch_varlen" in backends:  # what the GQA probe decided on this torch (item: unrepeated K/V)
        from dsr_fast import packing

        kwargs, repeat = packing.torch_varlen_kwargs(packing._torch_varlen_func(), True, hq != hkv, str(q.device), q.dtype)
        details["torch_varlen"] = dict(kwargs={k: str(v) for k, v in kwargs.items()}, repeats_kv=repeat,
                                       torch=torch.__version__)
    return [row(f"varlen attention fwd+bwd [{b}]", flops / t / 1e12, "TFLOP/s", matmul, baseline=base,
                note="baseline: per-sequence SDPA" + spec_note) for b, t in times.items()], details


def build_model(ctx, dtype) -> Qwen2:
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = Qwen2(Qwen2Config(**ctx.sizes.model, max_position_embeddings=32768))
    return model.to(dtype)


def train_step(model, batch, temperature=0.6):
    hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    lp, ent = fused_logprobs(hidden, model.lm_head.weight, batch.labels, temperature=temperature, return_entropy=True)
    (-(lp.sum()) - 0.001 * ent.sum()).backward()


def section_train_step(ctx):
    dev, sz = ctx.device, ctx.sizes
    model = build_model(ctx, sz.dtype)
    shape = cost.ModelShape.qwen2(**sz.model)
    vocab = sz.model["vocab_size"]
    details: dict = {}
    tokens = sz.tokens
    while True:  # halve the batch on out-of-memory rather than lose the figure
        lengths = packed_lengths(tokens, sz.mean_seq, sz.max_seq, seed=1)
        seqs = [torch.randint(0, vocab, (n,)).tolist() for n in lengths]
        batch = pack(seqs).to(dev)
        try:
            t_packed = timed(lambda: (model.zero_grad(set_to_none=True), train_step(model, batch)), dev, sz.reps)
            break
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if tokens <= 2048:
                raise
            tokens //= 2
            details["halved_for_memory"] = tokens

    # baseline: padded micro-batches of 2 sequences with gradient accumulation (a padded trainer)
    micro = [seqs[i:i + 2] for i in range(0, len(seqs), 2)]
    padded = []
    for m in micro:
        longest = max(len(s) for s in m)
        padded.append(pack([s + [0] * (longest - len(s)) for s in m]).to(dev))

    def padded_step():
        model.zero_grad(set_to_none=True)
        for b in padded:
            train_step(model, b)

    t_padded = timed(padded_step, dev, max(1, sz.reps // 2))
    flops = 3 * sum(shape.forward_flops(n) for n in lengths)
    achieved = flops / t_packed
    spec = ctx.spec
    matmul, spec_note = ceiling(ctx, "matmul_bf16_TFLOPs")
    peak = spec.flops if spec else matmul * 1e12
    ctx.report["rates"]["train"] = {"flops_per_s": achieved, "tokens_per_s": tokens / t_packed,
                                    "mean_seq_len": tokens / len(lengths)}
    details.update(tokens=tokens, sequences=len(lengths), packed_s=t_packed, padded_s=t_padded,
                   padded_tokens=sum(b.num_tokens for b in padded), layers=sz.model["num_hidden_layers"])
    return [
        row(f"train step fwd+bwd tokens/s (T={tokens:,})", tokens / t_packed, "tok/s", baseline=tokens / t_padded,
            note="baseline: padded micro-batches of 2"),
        row("train step MFU (model FLOPs)", achieved / 1e12, "TFLOP/s", peak / 1e12,
            note=f"{achieved / 1e12 / matmul:.0%} of {'spec-sheet' if spec_note else 'measured'} matmul" + spec_note),
    ], details


def section_rollout(ctx):
    dev, sz = ctx.device, ctx.sizes
    model = build_model(ctx, sz.dtype).eval().requires_grad_(False)
    cfg = model.config
    shape = cost.ModelShape.qwen2(**sz.model, dtype_bytes=torch.finfo(sz.dtype).bits // 8)
    details: dict = {"runs": {}}

    # correctness: greedy engine logprobs vs a teacher-forced forward of the same tokens
    engine = BuiltinEngine(cfg, dtype=sz.dtype, device=dev, max_batch=4, model=model)
    prompts = [torch.randint(5, cfg.vocab_size, (sz.rollout_prompt,)).tolist() for _ in range(2)]
    out = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=0.0, max_tokens=8))
    worst = 0.0
    for p, group in zip(prompts, out):
        for c in group:
            ids = torch.tensor(p + c.token_ids, device=dev)
            hidden = model(ids, torch.arange(len(ids), device=dev),
                           torch.tensor([0, len(ids)], device=dev, dtype=torch.int32), len(ids))
            logp = torch.log_softmax(model.logits(hidden).double(), -1)[len(p) - 1:-1]
            forced = logp.gather(1, torch.tensor(c.token_ids, device=dev)[:, None])[:, 0]
            worst = max(worst, float((forced - torch.tensor(c.logprobs, device=dev, dtype=torch.float64)).abs().max()))
    engine.close()
    check("greedy logprobs vs teacher-forced", worst, 0.1 if sz.dtype == torch.bfloat16 else 1e-3, details)

    rows, fractions = [], {}
    modes = [True, False] if dev.type == "cuda" else [False]
    copy, spec_note = ceiling(ctx, "copy_GBps")
    spec_or_measured = ctx.spec or cost.measured_device(ctx.report)
    for rows_ in sz.rollout_rows:
        # 8 samples per prompt, as the 8K stage; twice as many requests as rows, so rows free up
        # and are refilled from the queue mid-run (through the graph path) as in training
        n = min(8, rows_)
        prompts = [torch.randint(5, cfg.vocab_size, (sz.rollout_prompt,)).tolist() for _ in range(2 * rows_ // n)]
        sampling = SamplingParams(temperature=0.6, max_tokens=sz.rollout_new, seed=1)
        rates = {}
        for graph in modes:
            engine = BuiltinEngine(cfg, dtype=sz.dtype, device=dev, max_batch=rows_, model=model, cuda_graph=graph)
            outputs = []
            t = timed(lambda: outputs.append(engine.generate(prompts, n=n, sampling=sampling)), dev,
                      max(1, sz.reps // 2))
            getattr(engine, "close", lambda: None)()
            tokens = sum(len(c.token_ids) for group in outputs[-1] for c in group)  # EOS may end some early
            rates[graph] = tokens / t
            context = sz.rollout_prompt + (sz.rollout_new - 1) / 2  # mean KV entries read per row
            bps, fps = cost.decode_rates(tokens / t, rows_, context, shape)
            fraction = cost.decode_roofline_fraction(bps, fps, spec_or_measured)
            key = f"rows={rows_} {'graph' if graph else 'eager'}"
            details["runs"][key] = dict(tokens_per_s=tokens / t, bytes_per_s=bps, flops_per_s=fps,
                                        roofline_fraction=fraction, seconds=t)
            fractions[key] = (fraction, bps, fps, tokens / t, rows_, context)
            details["runs"][key].update(requests=len(prompts) * n, rows=rows_, tokens=tokens)
        best = max(rates)  # graph when measured
        key = f"rows={rows_} {'graph' if best else 'eager'}"
        rows.append(row(f"decode tokens/s {key}", rates[best], "tok/s", baseline=rates[False],
                        note=f"needed traffic {fractions[key][1] / 1e9:,.0f} GB/s = "
                             f"{fractions[key][1] / 1e9 / copy:.0%} of copy; {2 * rows_} requests queued; "
                             "baseline: eager" + spec_note))
    # the cost model applies one roofline fraction to every batch size: take the weakest of the
    # fastest mode's runs
    graph_runs = {k: v for k, v in fractions.items() if k.endswith("graph")} or fractions
    key = min(graph_runs, key=lambda k: graph_runs[k][0])
    f, bps, fps, tps, rows_, context = graph_runs[key]
    ctx.report["rates"]["decode"] = dict(bytes_per_s=bps, flops_per_s=fps, tokens_per_s=tps, rows=rows_,
                                         mean_context=context, run=key)
    return rows, details


def section_paged_decode(ctx):
    """The paged engine's decode step at 256 sequences x 8K context each (dry run: 8 x 64, tiny
    model): tokens/s vs the bandwidth roofline (weights + every live K/V read once per step),
    CUDA graph vs eager, peak memory vs the budget (pool + weights). The pool is filled with
    random K/V and the tables point at distinct blocks, so no prefill is timed."""
    from dsr_fast.engine.blocks import blocks_for
    from dsr_fast.engine.budget import kv_bytes_per_token
    from dsr_fast.engine.graphs import DecodeGraphs

    dev, sz = ctx.device, ctx.sizes
    seqs, context = (8, 64) if ctx.dry_run else (256, 8192)
    model = build_model(ctx, sz.dtype).eval().requires_grad_(False)
    cfg, bs = model.config, 16
    engine = BuiltinEngine(cfg, dtype=sz.dtype, device=dev, max_batch=seqs, block_size=bs,
                           kv_cache_tokens=seqs * blocks_for(context, bs) * bs)
    engine.sync_weights(model)
    del model
    runner = engine._runner()
    g = torch.Generator(device=dev).manual_seed(0)
    for pool in (runner.k_pool, runner.v_pool):
        pool.normal_(generator=g)
    width = blocks_for(context, bs)
    table = (1 + torch.arange(seqs * width, device=dev, dtype=torch.int32)).view(seqs, width)
    lens = torch.full((seqs,), context, dtype=torch.int32, device=dev)
    ids = torch.randint(0, cfg.vocab_size, (seqs,), device=dev, generator=g)
    graphs = runner.graphs or DecodeGraphs(runner.decode_step, seqs, width, dev, capture=False)  # CPU: padding logic only
    details: dict = {"sequences": seqs, "context": context, "block_size": bs}

    eager_logits = runner.decode_step(ids, lens, table)
    graph_logits = graphs.run(ids, lens, table)
    err = float((graph_logits - eager_logits).abs().max() / eager_logits.abs().max().clamp(min=1e-30))
    check("graph vs eager decode logits", err, 1e-2 if sz.dtype == torch.bfloat16 else 1e-5, details)

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    step_bytes = weight_bytes + seqs * context * kv_bytes_per_token(cfg, sz.dtype)
    copy = ctx.report["ceilings"].get("copy_GBps")
    bandwidth = copy * 1e9 if copy else (ctx.spec.bytes_per_s if ctx.spec else None)
    roofline = seqs * bandwidth / step_bytes if bandwidth else None
    t_eager = timed(lambda: runner.decode_step(ids, lens, table), dev, sz.reps)
    peak = peak_extra_bytes(lambda: graphs.run(ids, lens, table), dev)
    t_graph = timed(lambda: graphs.run(ids, lens, table), dev, sz.reps)
    budget = runner.pool_bytes + weight_bytes
    details.update(step_bytes=step_bytes, seconds_graph=t_graph, seconds_eager=t_eager, pool_bytes=runner.pool_bytes,
                   weight_bytes=weight_bytes)
    rows = [
        row(f"paged decode tokens/s {seqs} seqs x {context} {'graph' if runner.graphs else 'eager (no CUDA)'}",
            seqs / t_graph, "tok/s", ceiling=roofline, baseline=seqs / t_eager,
            note=f"ceiling: (weights + live KV = {step_bytes / 1e9:.1f} GB per step) / measured copy bandwidth; baseline: eager"),
    ]
    if dev.type == "cuda":
        allocated = torch.cuda.memory_allocated(dev)
        details.update(allocated_bytes=allocated, step_peak_extra_bytes=peak)
        rows.append(row("paged decode memory: allocated + step peak", (allocated + peak) / 2**30, "GiB",
                        ceiling=budget / 2**30, higher_is_better=False,
                        note=f"ceiling: pool {runner.pool_bytes / 2**30:.1f} GiB + weights {weight_bytes / 2**30:.1f} GiB"))
    engine.close()
    return rows, details


def section_weight_sync(ctx):
    dev, sz = ctx.device, ctx.sizes
    trainer = build_model(ctx, torch.float32)  # the trainer keeps fp32 weights; the engine decodes in bf16
    engine = BuiltinEngine(trainer.config, dtype=torch.bfloat16, device=dev, max_batch=1)
    t_ours = timed(lambda: engine.sync_weights(trainer), dev, sz.reps)
    details: dict = {}
    theirs = trainer.state_dict()
    for name, p in engine.model.state_dict().items():
        if not torch.equal(p, theirs[name].to(torch.bfloat16)):
            raise CheckFailed(f"sync_weights: {name} differs from the trainer's weights cast to bf16")
    check("synced weights == trainer weights in bf16", 0.0, 0.0, details)

    def naive():  # a fresh bf16 state dict, then load_state_dict
        engine.model.load_state_dict({k: v.to(torch.bfloat16) for k, v in trainer.state_dict().items()})

    t_naive = timed(naive, dev, sz.reps)
    params = sum(p.numel() for p in trainer.parameters())
    moved = params * (4 + 2)  # read fp32, write bf16
    ctx.report["rates"]["sync"] = {"seconds": t_ours, "params": params}
    copy, spec_note = ceiling(ctx, "copy_GBps")
    details.update(sync_s=t_ours, naive_s=t_naive, params=params)
    return [row(f"weight sync {params / 1e9:.2f}B params fp32->bf16", moved / t_ours / 1e9, "GB/s", copy,
                baseline=moved / t_naive / 1e9,
                note=f"{t_ours * 1e3:.1f} ms; baseline: new dict + load_state_dict" + spec_note)], details


def grading_case(i: int) -> tuple[str, str]:
    """Distinct (prediction, gold) pairs, so no normaliser cache is hit: a third settled by string
    normalisation, a third needing sympy, a third wrong."""
    kind = i % 3
    if kind == 0:
        return f"{i}.5", f"\\frac{{{2 * i + 1}}}{{2}}"
    if kind == 1:
        return f"\\frac{{\\sqrt{{2}}}}{{{i + 1}}}", f"\\sqrt{{2}}/{i + 1}"
    return f"{i}", f"{i + 1}"


WHEELS = ROOT / "bench" / "wheels"


def import_or_carried_wheel(module: str, details: dict):
    """import `module`; if it is not installed, import it from the pure-Python wheel carried in
    bench/wheels/ (a wheel is a zip: put on sys.path, nothing is installed) and record that."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as missing:
        wheels = sorted(WHEELS.glob(f"{module}-*-py3-none-any.whl"))
        if not wheels:
            raise ModuleNotFoundError(f"{module} is not installed and bench/wheels/ carries no wheel of it") from missing
        sys.path.append(str(wheels[-1]))
        details.setdefault("carried_wheels", []).append(wheels[-1].name)
        return importlib.import_module(module)


def section_grading(ctx):
    details: dict = {}
    # the answer normaliser's LaTeX-to-text (not on the GPU image)
    details["pylatexenc_file"] = import_or_carried_wheel("pylatexenc", details).__file__
    from dsr_fast.reward import score

    cases = [("0.5", r"\frac{1}{2}", 1.0), (r"\dfrac{3}{4}", "0.75", 1.0), ("10", "10", 1.0),
             (r"\frac{2}{4}", r"\frac{1}{2}", 0.0), ("(2,1)", "(1,2)", 0.0), (r"\sqrt{12}", r"2\sqrt{3}", 1.0)]
    reasoning = ("We compute step by step: $x^2 + 2x + 1 = (x+1)^2$. " * 80)[:4000]
    got = [score(f"<think>{reasoning}</think> so $\\boxed{{{pred}}}$.", gold) for pred, gold, _ in cases]
    check("known verdicts", float(sum(g != want for g, (_, _, want) in zip(got, cases))), 0.0, details)
    batch = [grading_case(i) for i in range(1, ctx.sizes.grading_responses + 1)]
    start = time.perf_counter()
    right = sum(score(f"<think>{reasoning}</think> so $\\boxed{{{pred}}}$.", gold) for pred, gold in batch)
    rate = len(batch) / (time.perf_counter() - start)
    check("distinct cases graded as built", abs(right - 2 * len(batch) // 3), 1.0, details)
    ctx.report["rates"]["grading"] = {"responses_per_s": rate, "processes": 1}
    return [row("grading responses/s (1 process)", rate, "resp/s", note="mix incl. sympy")], details


# Test files with Triton kernels, run natively (interpreter off) by section_triton_tests; any test
# file with AOT-marked tests (a new kernel file's) joins automatically.
TRITON_TEST_FILES = ["tests/test_logprobs_triton.py", "tests/test_grpo_loss.py", "tests/test_triton_testing.py"]
# The dry run exercises the section under the interpreter on a few quick tests only.
DRY_TRITON_TESTS = "test_no_grad_path_equals_grad_path or test_empty_batch or test_backend_choice"


def triton_test_files() -> list[str]:
    marked = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
              if "mark.aot" in p.read_text()]
    return list(dict.fromkeys(TRITON_TEST_FILES + marked))


def section_triton_tests(ctx):
    """The Triton test files as a child pytest, natively on this GPU (no TRITON_INTERPRET): bf16
    really runs on tensor cores here, unlike in CI. AOT compile tests are left to CI (make
    test-aot-triton36), slow ones to time. Failures are listed, not raised: every figure above
    is already recorded, and the list is what the next session needs."""
    import subprocess

    files = triton_test_files()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if ctx.dry_run:
        env["TRITON_INTERPRET"] = "1"
    selection = ["-m", "not slow and not aot"] + (["-k", DRY_TRITON_TESTS] if ctx.dry_run else [])
    cmd = [sys.executable, "-m", "pytest", *files, *selection, "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.sizes.triton_tests_s)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as timeout:
        out, code = (timeout.stdout or b"").decode(errors="replace") if isinstance(timeout.stdout, bytes) else (
            timeout.stdout or ""), "timeout"
    seconds = time.perf_counter() - start
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    failed = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    details = dict(files=files, command=" ".join(cmd), returncode=code, counts=counts, failed=failed,
                   seconds=seconds, tail=out[-4000:])
    if code == "timeout":
        raise CheckFailed(f"native Triton tests timed out after {ctx.sizes.triton_tests_s} s; counts so far {counts}")
    if counts.get("passed", 0) == 0:
        raise CheckFailed(f"native Triton tests ran nothing (exit {code}): {out[-500:]}")
    if code != 0 and not failed:
        raise CheckFailed(f"native Triton tests exit {code}: {out[-500:]}")
    note = f"{len(files)} files, {seconds:.0f} s, {counts.get('skipped', 0)} skipped"
    if failed:
        note += f"; {len(failed)} FAILED: {', '.join(failed)[:300]}"
    return [row("Triton tests run natively: passed", counts.get("passed", 0), "tests", note=note)], details


HIDE_MODULE = """
import importlib.abc, importlib.machinery, sys
class HideOutsideWheels(importlib.abc.MetaPathFinder):
    # {name} is importable only from sys.path entries that are wheels: as on the GPU image
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != {name!r}:
            return None
        wheels = [p for p in sys.path if p.endswith(".whl")]
        spec = importlib.machinery.PathFinder.find_spec(fullname, path if path is not None else wheels) if wheels else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}")
        return spec
sys.meta_path.insert(0, HideOutsideWheels())
"""


def section_fallbacks(ctx):
    """Dry run only: the two paths a GPU run takes when something is missing, exercised for real.
    (1) The ceilings section failed: a ceiling-dependent section (weight sync) runs on the H200
    spec sheet's ceilings, and its row says so. (2) pylatexenc is not installed: a child process
    where it is hidden imports it from the carried wheel through the grading section's helper."""
    if not ctx.dry_run:
        return [], {"skipped": "dry run only"}
    import subprocess

    details: dict = {}
    spec = cost.gpu_by_name("NVIDIA H200")
    sub = Context(ctx.device, ctx.sizes, True, dict(ctx.report, ceilings={}, rates={}), spec)
    sync_rows, _ = section_weight_sync(sub)
    if SPEC_NOTE not in sync_rows[0]["note"] or sync_rows[0]["ceiling"] != spec.hbm_gbps:
        raise CheckFailed(f"spec-sheet fallback not taken: {sync_rows[0]}")
    details["spec_fallback_row"] = sync_rows[0]
    child = HIDE_MODULE.format(name="pylatexenc") + (
        "import importlib.util, json\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check_child', {str(Path(__file__).resolve())!r})\n"
        "gc = importlib.util.module_from_spec(spec); sys.modules['gpu_check_child'] = gc; spec.loader.exec_module(gc)\n"
        "d = {}\nm = gc.import_or_carried_wheel('pylatexenc', d)\n"
        "from pylatexenc.latex2text import LatexNodes2Text\n"
        "print(json.dumps(dict(d, file=m.__file__, text=LatexNodes2Text().latex_to_text(r'\\frac{1}{2}'))))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CheckFailed(f"carried pylatexenc wheel: {proc.stderr[-800:]}")
    wheel = json.loads(proc.stdout.strip().splitlines()[-1])
    if ".whl" not in wheel["file"] or wheel["text"] != "1/2":
        raise CheckFailed(f"carried pylatexenc wheel: imported {wheel}")
    details["carried_wheel"] = wheel
    return [row("fallback: spec-sheet ceilings when ceilings fail", sync_rows[0]["value"], sync_rows[0]["unit"],
                sync_rows[0]["ceiling"], note="weight sync rerun without measured ceilings" + SPEC_NOTE),
            row("fallback: pylatexenc from bench/wheels (hidden)", 1.0, "ok", note=wheel["carried_wheels"][0])], details


SECTIONS = [
    ("ceilings", section_ceilings),
    ("logprobs", section_logprobs),
    ("logprobs_bf16", section_logprobs_bf16),
    ("grpo_loss", section_grpo_loss),
    ("attention", section_attention),
    ("train_step", section_train_step),
    ("rollout", section_rollout),
    ("paged_decode", section_paged_decode),
    ("weight_sync", section_weight_sync),
    ("grading", section_grading),
    ("triton_tests", section_triton_tests),
    ("fallbacks", section_fallbacks),
]


# -----------------------------------------------------------------------------
# driver


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    dry_run: bool
    report: dict
    spec: cost.GPU | None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
                "memory_GiB": props.total_memory / 2**30, "sms": props.multi_processor_count}
    return {"name": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}


def fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def format_table(report: dict) -> str:
    head = "| section | figure | value | unit | ceiling | fraction | naive baseline | ratio | note |"
    lines = [head, "|" + "---|" * 9]
    for name, sec in report["sections"].items():
        if sec["status"] != "ok":
            lines.append(f"| {name} | **{sec['status']}** | | | | | | | {sec['error'].splitlines()[0][:120]} |")
            continue
        for r in sec["rows"]:
            frac = f"{r['fraction']:.1%}" if r["fraction"] is not None else "-"
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
            lines.append(f"| {name} | {r['figure']} | {fmt(r['value'])} | {r['unit']} | {fmt(r['ceiling'])} | {frac} "
                         f"| {fmt(r['baseline'])} | {ratio} | {r['note']} |")
    return "\n".join(lines)


def run_sections(ctx: Context, only: set[str] | None) -> None:
    for name, fn in SECTIONS:
        if only and name not in only and name != "ceilings":
            continue
        start = time.perf_counter()
        try:
            rows, details = fn(ctx)
            sec = {"status": "ok", "rows": rows, "details": details}
        except Exception as e:  # record and go on: one GPU run must yield every figure it can
            status = "check failed" if isinstance(e, CheckFailed) else "failed"
            sec = {"status": status, "rows": [], "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        sec["seconds"] = time.perf_counter() - start
        ctx.report["sections"][name] = sec
        print(f"[{sec['seconds']:6.1f}s] {name}: {sec['status']}", flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and table.md")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: exercises every section")
    p.add_argument("--only", default=None, help="comma-separated sections (ceilings always run): "
                                                + ",".join(n for n, _ in SECTIONS))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    info = device_info(device)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "device": info, "versions": versions(), "ceilings": {}, "rates": {},
              "sizes": {k: str(v) for k, v in asdict(DRY if args.dry_run else REAL).items()}, "sections": {}}
    torch.manual_seed(0)
    ctx = Context(device, DRY if args.dry_run else REAL, args.dry_run, report, cost.gpu_by_name(info["name"]))
    start = time.perf_counter()
    run_sections(ctx, set(args.only.split(",")) if args.only else None)
    report["seconds"] = time.perf_counter() - start
    table = format_table(report)
    print(f"\n{info['name']}  {report['versions']}  {report['date']}\n")
    print(table)
    print(f"\ntotal {report['seconds']:.1f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "table.md").write_text(f"{info['name']}, {report['versions']}, {report['date']}\n\n{table}\n")
    print(f"wrote {args.out / 'gpu_check.json'}; project it: python -m dsr_fast.cost --rates {args.out / 'gpu_check.json'}")
    return report


if __name__ == "__main__":
    main()
