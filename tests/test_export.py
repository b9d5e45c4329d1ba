"""Every checkpoint is a branch point: a Hugging Face export beside each DCP state (kept by the
documented policy), loadable by transformers and by --model with the same logits, and
`python -m dsr_fast.export` for a DCP state whose export is gone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsr_fast import checkpoint, distributed, toy
from dsr_fast.config import TrainConfig
from dsr_fast.errors import InputError
from dsr_fast.export import export
from dsr_fast.model import Qwen2
from dsr_fast.train import setup, train

REPO = Path(__file__).resolve().parents[1]


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def our_logits(model: Qwen2, ids: list[int]) -> torch.Tensor:
    x = torch.tensor(ids)
    with torch.no_grad():
        return model.logits(model(x, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny embedded run: 3 RL steps, a checkpoint after each of the first two, the newest DCP state kept."""
    out = tmp_path_factory.mktemp("run")
    data = out / "toy.json"  # a small file: encoding the embedded run's 20,000 problems takes seconds
    data.write_text(json.dumps([{"problem": p.problem, "answer": p.answer} for p in toy.make_problems(16, seed=1)]))
    cfg = TrainConfig(out_dir=str(out), data=str(data), rollout_batch=8, steps=3, warmstart_steps=0, prompts_per_step=4, samples_per_prompt=2,
                      max_response_tokens=8, max_prompt_tokens=64, max_tokens_per_microbatch=256, eval_problems=0,
                      checkpoint_every=1, keep_checkpoints=1, report_to="jsonl", lr=1e-2)
    train(cfg)
    return out


@pytest.mark.slow  # the shared tiny run takes ~30 s on 2 busy cores
def test_every_checkpoint_has_an_export_and_the_keep_policy_holds(run_dir):
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000002"]  # keep_checkpoints=1
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["step_000001", "step_000002"]  # every export
    first, second = hf_weights(run_dir / "hf" / "step_000001"), hf_weights(run_dir / "hf" / "step_000002")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first), "the two exports hold the same weights"


@pytest.mark.slow  # the shared tiny run takes ~30 s on 2 busy cores
def test_an_export_loads_in_transformers_and_as_model_with_the_same_logits(run_dir):
    export_dir = run_dir / "hf" / "step_000001"
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Add: 12 + 30"}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)
    hf = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = hf(torch.tensor(ids)[None], use_cache=False).logits[0]
    # --model goes through setup(): the export starts a new run (and is its KL reference)
    problems = run_dir / "problems.json"
    problems.write_text(json.dumps([{"problem": "Add: 1 + 2", "answer": "3"}] * 10))
    _, policy, train_set, _, _ = setup(TrainConfig(model=str(export_dir), data=str(problems), eval_problems=0), torch.device("cpu"))
    assert len(train_set) == 10
    torch.testing.assert_close(our_logits(policy.eval(), ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the shared tiny run takes ~30 s on 2 busy cores
def test_export_command_gives_the_checkpoints_own_weights(run_dir, tmp_path):
    out = tmp_path / "exported"
    command = [sys.executable, "-m", "dsr_fast.export", str(run_dir / "checkpoints" / "step_000002"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    expected, got = hf_weights(run_dir / "hf" / "step_000002"), hf_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert AutoTokenizer.from_pretrained(out).encode("1 + 2") == AutoTokenizer.from_pretrained(run_dir / "final").encode("1 + 2")
    # a run directory means its latest checkpoint; bfloat16 on request
    export(run_dir, tmp_path / "latest", dtype="bfloat16")
    got = hf_weights(tmp_path / "latest")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected[k].bfloat16()) for k in expected)


def test_export_names_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="neither a checkpoint"):
        export(tmp_path, tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "dsr_fast.export", str(tmp_path / "nope"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "dsr_fast.export: error:" in done.stderr and "Traceback" not in done.stderr


def test_keep_exports_prunes_the_oldest(tmp_path):
    world = distributed.init("cpu")
    tokenizer = toy.build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2(toy.model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        checkpoint.save(world, tmp_path, step, model, optimizer, {"step": step}, keep=2, tokenizer=tokenizer, keep_exports=2)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["step_000002", "step_000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert not list(tmp_path.rglob("*.tmp"))
