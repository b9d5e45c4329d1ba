"""Weight sync time: trainer -> rollout engine, against a plain copy of the same bytes.

Paths, all from the same fp32 Qwen2 (ours) into an engine holding the same dtype:
- builtin:      BuiltinEngine.sync_weights (in-place copy into its own parameters)
- vllm_inplace: VLLMEngine.sync_weights (bucketed _foreach_copy_ into vLLM's fused parameters,
                with the data_ptr / coverage guards and reset_prefix_cache)
- vllm_load:    vLLM's own model.load_weights over HF-named tensors (per-tensor weight loaders),
                then reset_prefix_cache: what the vLLM docs / most RL frameworks call
- copy_bound:   one torch._foreach_copy_ of every parameter into preallocated buffers -- the
                floor any in-place sync can reach on this device

The vLLM paths need vLLM (on CPU: `.venv-vllm/bin/python -m pytest bench/test_bench_weight_sync.py`
after `make test-vllm`) and are skipped without it. CPU sizes only: vLLM is not installed on the
GPU machine (platform notes), so the 1.5B-shape GPU number comes from bench/gpu_check.py's copy
test instead.
"""

import importlib.util

import pytest
import torch

from dsr_fast.model import Qwen2, Qwen2Config
from dsr_fast.rollout import BuiltinEngine

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

SIZES = {
    # the embedded toy model's shape (0.8M parameters)
    "toy": dict(vocab_size=261, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # ~27M parameters (108 MB fp32): big enough that bytes, not per-tensor overhead, dominate
    "mid": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(SIZES))
def model(request):
    torch.manual_seed(0)
    return request.param, Qwen2(Qwen2Config(max_position_embeddings=512, **SIZES[request.param])).eval()


_engines = {}


@pytest.fixture(scope="module")
def vllm_engine(model):
    """One VLLMEngine per size, built once (seconds on CPU) and shared by both vLLM paths."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed (make test-vllm builds .venv-vllm)")
    from dsr_fast.vllm_engine import VLLMEngine

    size, policy = model
    if size not in _engines:
        _engines[size] = VLLMEngine.from_model(policy, max_batch=8)
    yield _engines[size]


def _record(benchmark, nbytes):
    benchmark.extra_info["MB"] = nbytes / 1e6
    benchmark.extra_info["GB_per_s"] = nbytes / benchmark.stats.stats.median / 1e9


def _param_bytes(policy):
    return sum(p.numel() * p.element_size() for p in policy.parameters())


@torch.no_grad()
def test_sync_copy_bound(benchmark, model):
    _, policy = model
    sources = [p.detach() for p in policy.parameters()]
    targets = [torch.empty_like(s) for s in sources]
    torch._foreach_copy_(targets, sources)  # warm-up (first touch of the pages)
    benchmark.pedantic(lambda: torch._foreach_copy_(targets, sources), rounds=20, iterations=1)
    _record(benchmark, _param_bytes(policy))


def test_sync_builtin(benchmark, model):
    _, policy = model
    engine = BuiltinEngine(policy.config, dtype=torch.float32)
    engine.sync_weights(policy)  # warm-up
    benchmark.pedantic(lambda: engine.sync_weights(policy), rounds=20, iterations=1)
    _record(benchmark, _param_bytes(policy))


def test_sync_vllm_inplace(benchmark, model, vllm_engine):
    _, policy = model
    vllm_engine.sync_weights(policy)  # warm-up (the plan is built once, on the first sync)
    benchmark.pedantic(lambda: vllm_engine.sync_weights(policy), rounds=20, iterations=1)
    _record(benchmark, _param_bytes(policy))


def test_sync_vllm_load_weights(benchmark, model, vllm_engine):
    from dsr_fast.vllm_engine import hf_name

    _, policy = model

    @torch.no_grad()
    def load():
        vllm_engine.model.load_weights((hf_name(n), p.detach()) for n, p in policy.named_parameters())
        vllm_engine.llm.reset_prefix_cache()

    load()  # warm-up
    benchmark.pedantic(load, rounds=20, iterations=1)
    _record(benchmark, _param_bytes(policy))
    # the sync really took: vLLM's parameters now hold the policy's (fused) rows
    qkv = dict(vllm_engine.model.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    attn = policy.layers[0].self_attn
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
