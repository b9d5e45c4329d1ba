"""Rollout: the names the trainer, the evaluator and the vLLM tier import.

The built-in engine lives in dsr_fast/engine/ (paged KV cache under a memory budget, shared
prompt blocks, preemption by recompute, CUDA graphs per batch bucket); sampling and the request
checks every engine makes are in dsr_fast/engine/sampling.py.
"""

from .engine import BuiltinEngine
from .engine.sampling import Completion, SamplingParams, check_requests, hash32, request_seeds, sample, uniform

__all__ = ["BuiltinEngine", "Completion", "SamplingParams", "check_requests", "hash32", "request_seeds", "sample", "uniform"]
