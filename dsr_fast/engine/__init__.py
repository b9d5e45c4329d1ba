"""The built-in rollout engine, one job per file (after nano-vllm's layout):

    sampling.py   request parameters, counter-based random numbers, inverse-CDF sampling
    blocks.py     the KV pool's blocks: free list and reference counts
    budget.py     how many blocks: a memory budget, never rows x max_len
    scheduler.py  admission under the budget, growth block by block, preemption by recompute
    weights.py    the engine's copy of the policy (fused projections) and the in-place sync
    runner.py     the model over the paged pool: packed prefill, one-token decode
    graphs.py     CUDA graphs of the decode step per batch-size bucket
    engine.py     BuiltinEngine: the generate loop and its stats
"""

from .engine import BuiltinEngine
from .sampling import Completion, SamplingParams, check_requests, hash32, request_seeds, sample, uniform

__all__ = ["BuiltinEngine", "Completion", "SamplingParams", "check_requests", "hash32", "request_seeds", "sample", "uniform"]
