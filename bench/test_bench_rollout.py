"""Rollout tokens/s: the built-in engine vs transformers' generate on the same model and batch.

Both sample every request to exactly max_tokens (no stop token), so they do the same work:
P prompts x n samples x max_tokens new tokens. CPU: the embedded tiny model; --real-sizes on a
GPU: the Qwen2-1.5B shape with random weights in bf16 (the built-in engine with its CUDA-graph
decode).

test_decode_time_vs_capacity: the same workload with a KV pool of 8K tokens and of 512K tokens (it
fits in either, no preemption): a paged decode step reads the live blocks, so the two take the
same time; a static cache sized to the capacity would not.
"""

import pytest
import torch

from dsr_fast.model import Qwen2, Qwen2Config
from dsr_fast.rollout import BuiltinEngine, SamplingParams


def setup_model(real_sizes, device, tmp_path_factory):
    torch.manual_seed(0)
    if real_sizes:
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096)
        dtype, shape = torch.bfloat16, (64, 8, 512)  # prompts, samples, new tokens
    else:
        cfg = Qwen2Config(vocab_size=261, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        dtype, shape = torch.float32, (16, 8, 64)
    model = Qwen2(cfg).to(dtype)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return model.to(device), path, dtype, shape


@pytest.mark.parametrize("engine", ["builtin", "transformers"])
def test_rollout_tokens_per_s(benchmark, engine, real_sizes, device, tmp_path_factory):
    model, path, dtype, (P, n, new) = setup_model(real_sizes, device, tmp_path_factory)
    prompts = [torch.randint(5, model.config.vocab_size, (32,)).tolist() for _ in range(P)]
    if engine == "builtin":
        eng = BuiltinEngine(model.config, dtype=dtype, device=device, max_batch=P * n)
        eng.sync_weights(model)
        sp = SamplingParams(temperature=1.0, max_tokens=new)

        def run():
            eng.generate(prompts, n=n, sampling=sp)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        ids = torch.tensor(prompts, device=device)

        def run():
            with torch.no_grad():
                hf.generate(ids, do_sample=True, top_k=0, max_new_tokens=new, min_new_tokens=new,
                            num_return_sequences=n, pad_token_id=0)

    def timed():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up (and CUDA-graph capture)
    benchmark.pedantic(timed, rounds=3, iterations=1)
    benchmark.extra_info["new_tokens_per_s"] = P * n * new / benchmark.stats.stats.median


@pytest.mark.parametrize("capacity", [8192, 524288])
def test_decode_time_vs_capacity(benchmark, capacity, real_sizes, device, tmp_path_factory):
    model, _, dtype, (P, n, new) = setup_model(real_sizes, device, tmp_path_factory)
    P = max(1, 8192 // (n * (32 + new)))  # the workload fills at most the small pool
    prompts = [torch.randint(5, model.config.vocab_size, (32,)).tolist() for _ in range(P)]
    eng = BuiltinEngine(model.config, dtype=dtype, device=device, max_batch=P * n, kv_cache_tokens=capacity)
    eng.sync_weights(model)
    sp = SamplingParams(temperature=1.0, max_tokens=new)

    def timed():
        eng.generate(prompts, n=n, sampling=sp)
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed()
    benchmark.pedantic(timed, rounds=3, iterations=1)
    assert eng.stats["preemptions"] == 0 and eng.stats["kv_capacity_tokens"] >= capacity
    benchmark.extra_info.update(new_tokens_per_s=P * n * new / benchmark.stats.stats.median, **eng.stats)
