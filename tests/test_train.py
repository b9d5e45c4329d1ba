"""The whole RL loop: a shortened embedded-default run must learn, and bad input must say so."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsr_fast.config import TrainConfig
from dsr_fast.model import Qwen2
from dsr_fast.train import train


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    # the embedded default with fewer RL steps and a smaller held-out set (~2-3 min on 2 cores)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=16, eval_problems=100, eval_samples=2)
    results = train(cfg)

    rewards = [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    assert results["before"]["pass@1"] <= 0.35
    assert results["after"]["pass@1"] >= results["before"]["pass@1"] + 0.2, results

    # the run directory: resolved config, metrics, and an HF checkpoint transformers can load
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 16
    final = tmp_path / "final"
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ours = Qwen2.from_pretrained(final).eval()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Add: 1 + 2 + 3"}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)
    x = torch.tensor(ids)
    with torch.no_grad():
        ref = hf(x[None], use_cache=False).logits[0]
        got = ours.logits(ours(x, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dsr_fast.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_missing_model_dir(tmp_path):
    out = run_cli("--model", str(tmp_path / "nope"), "--data", "x.json", "--out-dir", str(tmp_path / "run"))
    assert out.returncode != 0
    assert f"error: {tmp_path / 'nope'}: model directory does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_data_file_with_missing_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "Add: 1 + 2", "answer": "3"}\n{"problem": "Add: 2 + 2"}\n')
    out = run_cli("--data", str(data), "--out-dir", str(tmp_path / "run"), "--warmstart-steps", "0")
    assert out.returncode != 0
    assert f"error: {data}: record 1: missing field 'answer'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_model_without_data(tmp_path):
    model_dir = tmp_path / "m"
    from dsr_fast import toy

    tok = toy.build_tokenizer()
    Qwen2(toy.model_config(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = run_cli("--model", str(model_dir), "--out-dir", str(tmp_path / "run"))
    assert out.returncode != 0 and "--model needs --data" in out.stderr


def test_sync_drift_flags_a_stale_engine(tmp_path, monkeypatch):
    from dsr_fast import rollout

    small = dict(steps=3, warmstart_steps=0, eval_problems=4, eval_samples=1, prompts_per_step=4, lr=1e-2, kl_coef=0.0, max_response_tokens=16)
    fresh = [json.loads(x)["sync_drift"] for x in open_metrics(train(TrainConfig(out_dir=str(tmp_path / "a"), **small)))]
    # an engine whose sync silently does nothing after the first call keeps sampling old weights
    original, calls = rollout.BuiltinEngine.sync_weights, []

    def stale_sync(self, model):
        calls.append(1)
        if len(calls) == 1:
            original(self, model)

    monkeypatch.setattr(rollout.BuiltinEngine, "sync_weights", stale_sync)
    stale = [json.loads(x)["sync_drift"] for x in open_metrics(train(TrainConfig(out_dir=str(tmp_path / "b"), **small)))]
    assert max(fresh) < 1e-4  # same fp32 weights: only float noise
    assert stale[0] < 1e-4 and min(stale[1:]) > 100 * max(fresh), (fresh, stale)


def open_metrics(results):
    return (results["out_dir"] / "metrics.jsonl").read_text().splitlines()


def test_engine_stats_logged_per_step(tmp_path):
    small = dict(steps=2, warmstart_steps=0, eval_problems=4, eval_samples=1, prompts_per_step=4, max_response_tokens=16,
                 kv_cache_tokens=512)
    records = [json.loads(x) for x in open_metrics(train(TrainConfig(out_dir=str(tmp_path), **small)))]
    assert len(records) == 2
    for r in records:
        assert r["engine_kv_capacity_tokens"] == 512 and r["engine_block_size"] == 16
        assert 0 < r["engine_peak_kv_tokens"] <= 512 and isinstance(r["engine_preemptions"], int)
        assert r["engine_decode_steps"] > 0  # may exceed max_response_tokens: preempted requests decode again
