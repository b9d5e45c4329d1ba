"""Per-token logprob + entropy from hidden states: dsr_fast.kernels.fused_logprobs vs naive torch.

Three implementations, each timed for the forward alone (no-grad, as for old/reference logprobs)
and for forward+backward (random upstream gradients into logprobs and entropy, grads to hidden
and weight):

    fused    fused_logprobs, backend "auto": the Triton kernels on a GPU (skipped on CPU, where
             "auto" is the chunked path below)
    chunked  fused_logprobs, backend "torch": token chunks of bounded [chunk, V] fp32 logits
    naive    what a trainer writes without a kernel: the [T, V] matmul, fp32 log_softmax, gather,
             entropy from the probabilities, autograd backward

Sizes: T = 4,096, H = 256, V = 151,936 fp32 on CPU; with --real-sizes on a GPU, R1-Distill-Qwen's
head (H = 1,536, V = 151,936) in bf16 at T = 8,192 and 24,576.

extra_info: peak_extra_MB, the peak of memory allocated during one call above what was allocated
before it (CPU: from the profiler's allocation events; GPU: torch.cuda.max_memory_allocated);
TFLOPs at the usual count (2·T·H·V forward, 8·T·H·V forward+backward with the logits recomputed),
and on a GPU matmul_fraction = that rate over a measured bf16 [T, H]·[H, V] matmul's.
Goals (issue 3): GPU fused fwd+bwd ≥ 75% of the matmul rate, ≥ 2× faster than naive, peak extra
memory ≤ 2% of naive's; CPU chunked peak ≤ 1/10 of naive's.
"""

from __future__ import annotations

import time

import pytest
import torch
from dsr_fast.kernels import fused_logprobs
from dsr_fast.memory import peak_extra_bytes

VOCAB, TEMPERATURE = 151_936, 0.6


def make_inputs(num_tokens: int, hidden_size: int, dtype, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = dict(
        hidden=torch.randn(num_tokens, hidden_size, generator=gen),
        weight=torch.randn(VOCAB, hidden_size, generator=gen) * (2.0 / hidden_size**0.5),
        labels=torch.randint(0, VOCAB, (num_tokens,), generator=gen),
        g_lp=torch.rand(num_tokens, generator=gen) - 0.5,
        g_h=(torch.rand(num_tokens, generator=gen) - 0.5) * 1e-3,
    )
    x = {k: v.to(device, dtype if v.is_floating_point() and k in ("hidden", "weight") else None) for k, v in x.items()}
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    return x


def naive_logprobs(hidden, weight, labels, temperature: float):
    logits = (hidden @ weight.T).float() / temperature  # [T, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(1, labels[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy


def step_fn(impl: str, mode: str, x: dict):
    backend = {"fused": "auto", "chunked": "torch"}.get(impl)

    def logprobs():
        if impl == "naive":
            return naive_logprobs(x["hidden"], x["weight"], x["labels"], TEMPERATURE)
        return fused_logprobs(x["hidden"], x["weight"], x["labels"], temperature=TEMPERATURE,
                              return_entropy=True, backend=backend)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return logprobs()
        x["hidden"].grad = x["weight"].grad = None
        lp, ent = logprobs()
        ((lp * x["g_lp"]).sum() + (ent * x["g_h"]).sum()).backward()

    return step


def matmul_seconds(x: dict) -> float:
    """One bf16 [T, H]·[H, V] matmul (the forward's FLOPs), by CUDA events: the rate to beat."""
    a, b = x["hidden"].detach().bfloat16(), x["weight"].detach().bfloat16()
    for _ in range(3):
        a @ b.T
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b.T
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / 10


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "chunked", "naive"])
@pytest.mark.parametrize("num_tokens", [4096, 8192, 24576])
def test_logprobs(benchmark, num_tokens, impl, mode, real_sizes, device):
    if real_sizes != (num_tokens != 4096):
        pytest.skip("T = 4,096 on CPU; 8,192 and 24,576 with --real-sizes (GPU)")
    if impl == "fused" and device.type != "cuda":
        pytest.skip("on CPU the fused path is the chunked one")
    hidden_size, dtype = (1536, torch.bfloat16) if real_sizes else (256, torch.float32)
    x = make_inputs(num_tokens, hidden_size, dtype, device)
    step = step_fn(impl, mode, x)
    cuda = device.type == "cuda"

    def timed():
        step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        timed()  # warm-up: Triton compiles, cuBLAS heuristics, outside the timing
    benchmark.group = f"logprobs {mode}, T={num_tokens} H={hidden_size} V={VOCAB} {str(dtype)[6:]}"
    start = time.perf_counter()
    peak = peak_extra_bytes(timed)  # an untimed call of its own: the CPU profiler slows it down
    # CPU calls take seconds and vary little: as many rounds as fit in ~10 s, at least one
    rounds = 10 if cuda else max(1, min(3, int(10 / (time.perf_counter() - start))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    seconds = benchmark.stats.stats.median
    flops = (2 if mode == "fwd" else 8) * num_tokens * hidden_size * VOCAB
    benchmark.extra_info.update(tokens=num_tokens, peak_extra_MB=peak / 2**20, TFLOPs=flops / seconds / 1e12,
                                tokens_per_s=num_tokens / seconds)
    if cuda:
        matmul_rate = 2 * num_tokens * hidden_size * VOCAB / matmul_seconds(x)
        benchmark.extra_info["matmul_fraction"] = flops / seconds / matmul_rate
