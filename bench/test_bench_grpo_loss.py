"""GRPO loss forward+backward over a packed batch: dsr_fast.kernels.grpo_loss vs plain torch.

The workload is DeepScaleR's loss (PPO clip 0.2, k3 KL 0.001, entropy bonus 0.001, token-mean
with an int token count, fp32 inputs from fused_logprobs, bool mask) and its metrics, on ~1,000-token
sequences. Three implementations, each timed for one fwd+bwd (grads to logprobs and entropy):

    dsr_fast       grpo_loss with backend "auto": the Triton kernels on a GPU, the vectorised torch
                   path on CPU (the Triton interpreter says nothing about speed)
    torch_eager    the loss written as differentiable torch ops, autograd backward (verl-style)
    torch_compile  the same function under torch.compile (inductor: Triton on GPU, C++ on CPU);
                   the cold compile (~10 s) happens in the warm-up, outside the timing

Sizes: 1M tokens on CPU; with --real-sizes on a GPU, 1M and 10M tokens.

Bandwidth (extra_info): bytes_per_token is what the Triton path reads and writes per token
(forward: inputs + 2 fp32 derivatives; backward: reads them, writes the grads); min_bytes_per_token
is what any fused fwd+bwd must move (inputs once, grads once). On a GPU, the fwd+bwd is also
replayed from a CUDA graph (no Python launch overhead; it has no host sync, so it captures) and
timed with events: device_GBps and copy_fraction = device_GBps / the device's copy bandwidth
(a large tensor copy, read + write). The goal is copy_fraction ≥ 0.7; it can only be measured
on a GPU. Small T is launch-bound (3 fwd+bwd kernels, the finalize a single program): expect
the fraction to grow with T.
"""

from __future__ import annotations

import pytest
import torch
from dsr_fast.kernels import grpo_loss

CLIP, KL_COEF, ENTROPY_COEF = 0.2, 0.001, 0.001
SEQ_LEN = 1000


def make_inputs(num_tokens: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    logprobs = -3.0 * torch.rand(num_tokens, generator=gen)
    lengths = [SEQ_LEN] * (num_tokens // SEQ_LEN) + ([num_tokens % SEQ_LEN] if num_tokens % SEQ_LEN else [])
    per_seq = torch.randn(len(lengths), generator=gen)
    inputs = dict(
        logprobs=logprobs,
        old_logprobs=logprobs + 0.1 * torch.randn(num_tokens, generator=gen),
        advantages=per_seq.repeat_interleave(torch.tensor(lengths)),
        ref_logprobs=logprobs + 0.1 * torch.randn(num_tokens, generator=gen),
        entropy=3.0 * torch.rand(num_tokens, generator=gen),
        loss_mask=torch.rand(num_tokens, generator=gen) < 0.9,
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["logprobs"].requires_grad_()
    inputs["entropy"].requires_grad_()
    inputs["num_tokens"] = int(inputs["loss_mask"].sum())  # an int, as train.py passes
    return inputs


def dsr_fast_loss(x: dict):
    return grpo_loss(
        x["logprobs"], x["old_logprobs"], x["advantages"], x["cu_seqlens"], ref_logprobs=x["ref_logprobs"],
        entropy=x["entropy"], loss_mask=x["loss_mask"], clip_low=CLIP, clip_high=CLIP, kl_coef=KL_COEF,
        kl_type="k3", entropy_coef=ENTROPY_COEF, num_global_tokens=x["num_tokens"],
    )


def eager_loss(logprobs, old_logprobs, advantages, ref_logprobs, entropy, loss_mask, num_tokens: int):
    """DeepScaleR's loss and metrics as plain differentiable torch (what a trainer writes without
    a kernel); masked-out tokens are zeroed with where (they may hold garbage)."""
    mask = loss_mask
    ratio = torch.exp(logprobs - old_logprobs)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = ref_logprobs - logprobs
    kl = (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
    per_token = pg + KL_COEF * kl - ENTROPY_COEF * entropy
    loss = torch.where(mask, per_token, 0.0).sum() / max(num_tokens, 1)
    count = mask.sum().clamp_min(1)

    def mean(values):
        return torch.where(mask, values.detach().float(), 0.0).sum() / count

    metrics = {
        "clip_frac_low": mean((advantages < 0) & (ratio < 1 - CLIP)),
        "clip_frac_high": mean((advantages > 0) & (ratio > 1 + CLIP)),
        "approx_kl": mean(old_logprobs - logprobs),
        "ratio_mean": mean(ratio),
        "pg_loss": mean(pg),
        "entropy_mean": mean(entropy),
        "kl_mean": mean(kl),
    }
    return loss, metrics


_compiled_loss = None


def compiled_loss(*args):
    global _compiled_loss
    if _compiled_loss is None:
        _compiled_loss = torch.compile(eager_loss, dynamic=False)
    return _compiled_loss(*args)


def step_fn(impl: str, x: dict):
    """One fwd+bwd of `impl` on inputs x, leaving the grads in x's leaves."""
    args = [x[k] for k in ("logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy", "loss_mask")]
    loss_fn = {"dsr_fast": lambda: dsr_fast_loss(x), "torch_eager": lambda: eager_loss(*args, x["num_tokens"]),
               "torch_compile": lambda: compiled_loss(*args, x["num_tokens"])}[impl]

    def step():
        x["logprobs"].grad = x["entropy"].grad = None
        loss, metrics = loss_fn()
        loss.backward()
        return loss, metrics

    return step


def bytes_per_token(x: dict) -> tuple[int, int]:
    """(bytes the Triton path moves per token, bytes any fused fwd+bwd must move per token)."""
    inputs = sum(x[k].element_size() for k in ("logprobs", "old_logprobs", "advantages", "ref_logprobs",
                                                "entropy", "loss_mask"))
    grads = x["logprobs"].element_size() + x["entropy"].element_size()
    derivatives = 2 * 4  # fp32 ∂/∂logp and ∂/∂H: written by the forward, read by the backward
    return inputs + derivatives + derivatives + grads, inputs + grads


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device copy (read + write), by CUDA events."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * src.element_size() / (start.elapsed_time(end) / 1e3)


def graph_seconds_per_step(step, replays: int = 50) -> float:
    """Device seconds per fwd+bwd, replayed from a CUDA graph (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


@pytest.mark.parametrize("size", ["1M", "10M"])
@pytest.mark.parametrize("impl", ["dsr_fast", "torch_eager", "torch_compile"])
def test_grpo_loss_fwd_bwd(benchmark, impl, size, real_sizes, device):
    if size == "10M" and not real_sizes:
        pytest.skip("10M tokens only with --real-sizes (GPU)")
    num_tokens = {"1M": 1 << 20, "10M": 10 << 20}[size]
    x = make_inputs(num_tokens, device)
    step = step_fn(impl, x)
    cuda = x["logprobs"].is_cuda

    def timed():
        step()
        if cuda:
            torch.cuda.synchronize()

    timed()  # warm-up: Triton JIT / inductor compile, outside the timing
    benchmark.group = f"grpo_loss fwd+bwd, {size} tokens"
    benchmark.pedantic(timed, rounds=10 if cuda else 5, iterations=1, warmup_rounds=1)
    moved, minimal = bytes_per_token(x)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        tokens=num_tokens, tokens_per_s=num_tokens / seconds, bytes_per_token=moved, min_bytes_per_token=minimal,
        wall_GBps=moved * num_tokens / seconds / 1e9,
    )
    if cuda:
        device_seconds = graph_seconds_per_step(step)
        device_GBps = moved * num_tokens / device_seconds / 1e9
        benchmark.extra_info.update(
            device_us=device_seconds * 1e6, device_GBps=device_GBps,
            copy_fraction=device_GBps * 1e9 / copy_bandwidth(x["logprobs"].device),
        )
