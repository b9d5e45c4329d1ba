"""Fewer forwards per RL step, same gradients: the trainer with its first mini-batch's old logprobs
taken from the update itself and selective/auto recomputation makes, in float64, the gradient of
every optimizer step that the old path (old logprobs recomputed for every mini-batch, every
activation stored) makes."""

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dsr_fast import model as model_module
from dsr_fast import train as train_module
from dsr_fast.config import TrainConfig
from dsr_fast.kernels.logprobs import reference_logprobs
from dsr_fast.train import train


def float64_head(hidden, weight, labels, *, temperature=1.0, return_entropy=False):
    """The fused logprob kernel's contract on float64 logits (the kernel takes fp32/bf16 only)."""
    logprobs, entropy = reference_logprobs(hidden, weight, labels, temperature=temperature)
    return logprobs, entropy if return_entropy else None


def parity_grade(tokenizer, groups, problems):
    """A reward with contrast inside every group from the first step (an untrained model never
    answers right): 1 when the sampled token ids sum to an even number."""
    return [[float(sum(c.token_ids) % 2 == 0) for c in group] for group in groups]


SMALL = dict(steps=2, warmstart_steps=0, eval_problems=0, prompts_per_step=2, samples_per_prompt=4, mini_batches=2,
             max_prompt_tokens=40, max_response_tokens=16, max_tokens_per_microbatch=120, lr=3e-3, kl_coef=0.05,
             entropy_coef=0.01, report_to="jsonl")


def run_and_record(tmp_path, monkeypatch, name, **overrides):
    """Train in float64; the (clipped) gradient of every optimizer step and the metrics."""
    grads = []

    def record(optimizer, args, kwargs):
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(TrainConfig(out_dir=str(tmp_path / name), **SMALL, **overrides))
    finally:
        handle.remove()
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return grads, metrics


@pytest.mark.slow
def test_every_optimizer_step_has_the_old_paths_gradient_in_float64(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "fused_logprobs", float64_head)
    monkeypatch.setattr(train_module, "grade", parity_grade)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the toy model and every tensor the trainer makes
    try:
        old, old_metrics = run_and_record(tmp_path, monkeypatch, "old", old_logprobs_first_minibatch=True, recompute="none")
        runs = {
            "selective": run_and_record(tmp_path, monkeypatch, "selective", recompute="selective"),
            "full": run_and_record(tmp_path, monkeypatch, "full", recompute="full"),
            # a budget between all-full and all-none: a mixed per-layer plan
            "auto": run_and_record(tmp_path, monkeypatch, "auto", recompute="auto", recompute_budget_gb=2e-3),
        }
    finally:
        torch.set_default_dtype(default_dtype)

    assert len(old) == SMALL["steps"] * SMALL["mini_batches"]
    assert all(r["reward"] not in (0.0, 1.0) for r in old_metrics)  # the policy term is not zero
    for name, (grads, metrics) in runs.items():
        assert len(grads) == len(old), name
        for step, (got, want) in enumerate(zip(grads, old)):
            assert all(g.dtype == torch.float64 for g in got)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"{name}: optimizer step {step}")
        # the same work minus the first mini-batch's old-logprob forwards
        for r, r_old in zip(metrics, old_metrics):
            assert r["fwd_passes_update"] == r_old["fwd_passes_update"] and r["fwd_passes_ref"] == r_old["fwd_passes_ref"]
            assert 0 < r["fwd_passes_old"] < r_old["fwd_passes_old"], name
    assert old_metrics[0]["recompute_passes"] == 0.0
    assert 0 < runs["selective"][1][0]["recompute_passes"] < runs["full"][1][0]["recompute_passes"]
    assert 0 < runs["auto"][1][0]["recompute_passes"] < runs["full"][1][0]["recompute_passes"]


def test_unknown_recompute_mode_is_an_input_error(tmp_path):
    from dsr_fast.errors import InputError

    with pytest.raises(InputError, match="--recompute 'some': use none, selective, full or auto"):
        train(TrainConfig(out_dir=str(tmp_path), recompute="some", warmstart_steps=0, eval_problems=0))


@pytest.mark.slow
def test_two_fsdp2_ranks_with_selective_recompute_make_the_old_paths_step(tmp_path):
    # FSDP2 unshards a layer in its forward hook and again before its backward: the selective
    # path's checkpointed regions run inside both, on every rank
    from test_train_scale import TINY, metrics, run_train

    args = [*TINY, "--steps", "1", "--lr", "1e-2", "--mini-batches", "2"]
    old = run_train(*args, "--recompute", "none", "--old-logprobs-first-minibatch", "--out-dir", str(tmp_path / "old"))
    new = run_train(*args, "--recompute", "selective", "--out-dir", str(tmp_path / "new"), torchrun=2)
    assert old.returncode == 0, old.stderr[-3000:]
    assert new.returncode == 0, new.stderr[-3000:]
    a, b = metrics(tmp_path / "old")[0], metrics(tmp_path / "new")[0]
    for key in ("loss", "grad_norm", "entropy_mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert b["fwd_passes_old"] < a["fwd_passes_old"] and b["recompute_passes"] > 0
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "old/final/model.safetensors"), load_file(tmp_path / "new/final/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=2e-6, msg=name)
