"""Forward passes per RL step: the trainer's logprob and update phases before and after issue 18's
changes, and selective vs full activation recomputation.

test_rl_step_phases: the real trainer (train.py) for two RL steps per path (the second is measured), alternated in one
run; its metrics.jsonl gives the wall time of the logprob and update phases and the forwards it
counted. Paths: before = old logprobs recomputed for every mini-batch and full recomputation (the
presets' gradient checkpointing); selective / auto = old logprobs only after an optimizer step,
with selective or budgeted recomputation. Sizes: the embedded default with two mini-batches (the
presets' count; with one there is no old-logprob forward to save) and a mid-size Qwen2 on the
same task with longer responses. The benchmark's own time is the whole run (rollout included);
the phase figures are in extra_info (pytest --benchmark-json).

test_recompute_fwd_bwd: one packed forward+backward per recompute mode on RL-like lengths: time,
peak extra memory (dsr_fast.memory) and the recomputed FLOPs (recompute.py; checked against
FlopCounterMode in tests/test_recompute.py).
"""

import json
import math
import random
import statistics

import pytest
import torch

from dsr_fast import toy
from dsr_fast.config import TrainConfig
from dsr_fast.memory import peak_extra_bytes
from dsr_fast.model import Qwen2, Qwen2Config
from dsr_fast.packing import pack
from dsr_fast.recompute import forward_flops, recompute_flops
from dsr_fast.train import train

PATHS = {
    "before": dict(old_logprobs_first_minibatch=True, recompute="full"),
    "selective": dict(recompute="selective"),
    "auto": dict(recompute="auto"),  # the default 16 GB budget: at CPU sizes nothing is recomputed
}
STEP = dict(steps=2, warmstart_steps=0, eval_problems=0, mini_batches=2, report_to="jsonl", seed=1)


def mid_model_dir(tmp_path_factory):
    """A ~3M-parameter Qwen2 (random weights) with the toy tokenizer, and addition problems; it
    rarely samples EOS, so responses run to the cap: long sequences, where attention counts."""
    root = tmp_path_factory.mktemp("mid")
    tok = toy.build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in toy.make_problems(500, seed=3)))
    return dict(model=str(root / "model"), data=str(data), instruction="", max_response_tokens=112,
                prompts_per_step=4, samples_per_prompt=8)


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    return {"default": {}, "mid": mid_model_dir(tmp_path_factory)}


@pytest.mark.parametrize("size", ["default", "mid"])
@pytest.mark.parametrize("path", list(PATHS))
def test_rl_step_phases(benchmark, sizes, size, path, tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), **STEP, **sizes[size], **PATHS[path])
    benchmark.pedantic(train, args=(cfg,), rounds=1, iterations=1)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]  # step 0 warms up
    for key in ("time_logprobs", "time_update", "fwd_passes", "fwd_passes_ref", "fwd_passes_old", "fwd_passes_update",
                "passes_per_token", "recompute_passes", "response_len_mean"):
        benchmark.extra_info[key] = statistics.median(r[key] for r in steps)


def rl_lengths(total: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    while sum(out) < total:
        out.append(int(min(1024, max(16, rng.lognormvariate(math.log(300), 0.7)))))
    return out


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_recompute_fwd_bwd(benchmark, mode):
    cfg = Qwen2Config(vocab_size=261, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Qwen2(cfg)
    model.set_recompute(mode)
    lengths = rl_lengths(4096)
    batch = pack([torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lengths])

    def step():
        model.zero_grad(set_to_none=False)
        logprobs, entropy = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen,
                                  labels=batch.labels, temperature=0.6, return_entropy=True)
        (logprobs.sum() + 0.001 * entropy.sum()).backward()

    step()  # gradients allocated before anything is measured
    benchmark.extra_info["peak_extra_MB"] = peak_extra_bytes(step) / 1e6
    benchmark.extra_info["recomputed_GFLOP"] = recompute_flops(cfg, lengths, [mode] * cfg.num_hidden_layers) / 1e9
    benchmark.extra_info["forward_GFLOP"] = forward_flops(cfg, lengths) / 1e9
    benchmark.extra_info["tokens"] = sum(lengths)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
