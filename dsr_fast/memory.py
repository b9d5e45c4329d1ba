"""Peak memory of one call, on CUDA or CPU: for the benchmarks, the GPU check and memory tests."""

from __future__ import annotations

import gc

import torch


def peak_cpu_bytes(fn) -> int:
    """Peak bytes torch allocates on the CPU while fn runs, above what was allocated before it.
    CPU torch keeps no allocator statistics, so the profiler's allocation/free events are replayed
    in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results is not public API, but it is the only place the allocation events keep
    # their own timestamps (FunctionEvents fold them into the allocating op).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn, device: torch.device | str | None = None) -> int:
    """Peak bytes fn() allocates above what was allocated before it: the CUDA allocator's
    statistics on a GPU, else peak_cpu_bytes. device None = CUDA when available."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gc.collect()
    if device.type != "cuda":
        return peak_cpu_bytes(fn)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
