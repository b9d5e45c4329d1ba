"""Model forward+backward tokens/s on packed vs padded batches of the same sequences.

Padded = every sequence extended to the longest of its batch (what a padded trainer computes;
the attention runs as one batched call). Padded-micro2 = padded micro-batches of 2 sequences with
gradient accumulation (a padded trainer that bounds memory, as verl without remove_padding).
Packed = the same sequences end to end, no padding.
Throughput counts real tokens only. CPU: the embedded tiny model; --real-sizes on a GPU: the
Qwen2-1.5B shape with random weights in bf16.
"""

import math
import random

import pytest
import torch

from dsr_fast.model import Qwen2, Qwen2Config
from dsr_fast.packing import pack


def lengths_for(real_sizes: bool, seed: int = 0) -> list[int]:
    # lognormal like RL responses (recipe: mean ~4-5K, up to 24,576), scaled down on CPU
    rng = random.Random(seed)
    scale, cap, budget = (3500, 24_576, 65_536) if real_sizes else (60, 400, 4096)
    out = []
    while sum(out) < budget:
        out.append(int(min(cap, max(8, rng.lognormvariate(math.log(scale), 0.8)))))
    return out


def model_for(real_sizes: bool, device) -> Qwen2:
    if real_sizes:
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, rope_theta=10000.0)
        return Qwen2(cfg).to(device, torch.bfloat16)
    cfg = Qwen2Config(vocab_size=261, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return Qwen2(cfg).to(device)


def fwd_bwd(model, batch):
    batches = batch if isinstance(batch, list) else [batch]
    for b in batches:  # gradient accumulation over micro-batches
        hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
        hidden.float().square().mean().backward()
    if batches[0].input_ids.is_cuda:
        torch.cuda.synchronize()


def pad(seqs: list[list[int]]) -> list[list[int]]:
    longest = max(len(s) for s in seqs)
    return [s + [0] * (longest - len(s)) for s in seqs]


@pytest.mark.parametrize("layout", ["packed", "padded", "padded-micro2"])
def test_model_fwd_bwd_tokens_per_s(benchmark, layout, real_sizes, device):
    torch.manual_seed(0)
    lengths = lengths_for(real_sizes)
    model = model_for(real_sizes, device)
    seqs = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in lengths]
    if layout == "padded-micro2":
        batch = [pack(pad(seqs[i:i + 2])).to(device) for i in range(0, len(seqs), 2)]
    else:
        batch = pack(pad(seqs) if layout == "padded" else seqs).to(device)
    fwd_bwd(model, batch)  # warm-up
    # ~25 small micro-batches per round make padded-micro2 the slowest case on CPU: fewer rounds
    rounds = 3 if real_sizes else (2 if layout == "padded-micro2" else 5)
    benchmark.pedantic(fwd_bwd, args=(model, batch), rounds=rounds, iterations=1)
    real = sum(lengths)
    computed = sum(b.num_tokens for b in batch) if isinstance(batch, list) else batch.num_tokens
    benchmark.extra_info.update(
        real_tokens=real, computed_tokens=computed, real_fraction=real / computed,
        real_tokens_per_s=real / benchmark.stats.stats.median,
    )
