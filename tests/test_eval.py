"""Tests of the Pass@1 evaluation command (dsr_fast.eval): end to end with a tiny random Qwen2 on
AIME 2024, Pass@1 from responses whose verdicts are known, resuming, and clear errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

import dsr_fast.eval as evaluation
from dsr_fast.model import Qwen2
from dsr_fast.rollout import Completion
from dsr_fast.toy import build_tokenizer, model_config

REPO_ROOT = Path(__file__).resolve().parents[1]
AIME = SHARED_DATA / "test" / "aime.json"
AMC = SHARED_DATA / "test" / "amc.json"

needs_data = pytest.mark.skipif(not AIME.exists() or not AMC.exists(), reason=f"test data not available at {SHARED_DATA}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded toy Qwen2 (random weights, byte tokenizer with a chat template), with a
    context long enough for AIME problems written one token per byte (<= 937 bytes)."""
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    Qwen2(dataclasses.replace(model_config(tokenizer), max_position_embeddings=1280)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _args(model_dir: Path, out: Path, *extra: str, data: str | None = None, samples: int = 4, problems: int = 3) -> list[str]:
    return [
        "--model", str(model_dir), "--data", data or f"{AIME},{AMC}", "--out", str(out),
        "--samples", str(samples), "--max-problems", str(problems), "--max-tokens", "8", *extra,
    ]  # fmt: skip


@needs_data
def test_command_end_to_end_on_aime_with_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "aime.jsonl"
    command = [sys.executable, "-m", "dsr_fast.eval", *_args(tiny_model_dir, out, data=str(AIME), samples=2, problems=2)]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert "| model | AIME24 | Avg |" in done.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, records = lines[0], lines[1:]
    assert header["settings"]["samples"] == 2 and header["settings"]["temperature"] == 0.6
    problems = json.loads(AIME.read_text())
    assert [(r["dataset"], r["index"]) for r in records] == [("aime", 0), ("aime", 1)]
    for record, problem in zip(records, problems):
        assert record["answer"] == problem["answer"] and record["problem"] == problem["problem"]
        assert len(record["samples"]) == 2
        for sample in record["samples"]:
            assert sample["status"] == "graded" and sample["score"] in (0.0, 1.0)
            assert 1 <= sample["num_tokens"] <= 8 and sample["finish_reason"] in ("stop", "length")


class KnownAnswers:
    """An engine whose samples have known verdicts: for each problem, sample 0 boxes the gold as
    the dataset writes it, sample 1 boxes it as a model might ("204" for AMC's 142.0-style golds,
    "204.0" for AIME's "204"; both equal per recipe 4b), sample 2 has no </think>, sample 3 boxes
    a wrong number.  So every problem's Pass@1 is exactly 0.5."""

    def __init__(self, tokenizer, problems: dict[str, str]) -> None:
        self.tokenizer, self.problems, self.generated = tokenizer, problems, 0

    def _gold(self, prompt: list[int]) -> str:
        text = self.tokenizer.decode(prompt)
        (gold,) = [answer for problem, answer in self.problems.items() if problem in text]
        return gold

    def generate(self, prompt_ids, n, sampling, seeds):
        assert len(seeds) == len(prompt_ids) * n
        groups = []
        for prompt in prompt_ids:
            gold = self._gold(prompt)
            restated = str(int(float(gold))) if "." in gold else f"{gold}.0"
            texts = [
                f"so</think> The answer is $\\boxed{{{gold}}}$.",
                f"hmm</think> \\boxed{{{restated}}}",
                f"\\boxed{{{gold}}}",
                f"no</think> \\boxed{{{int(float(gold)) + 1}}}",
            ][:n]
            groups.append([Completion(self.tokenizer.encode(t, add_special_tokens=False), [0.0], "stop") for t in texts])
            self.generated += 1
        return groups


@pytest.fixture()
def known_answers(monkeypatch, tiny_model_dir: Path) -> KnownAnswers:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = {p["problem"]: str(p["answer"]) for path in (AIME, AMC) for p in json.loads(path.read_text())}
    engine = KnownAnswers(tokenizer, problems)
    loaded = evaluation.LoadedModel(tokenizer, engine, (tokenizer.eos_token_id,), 1280)
    monkeypatch.setattr(evaluation, "load_model", lambda *args, **kwargs: loaded)
    return engine


@needs_data
def test_pass_at_1_table_from_known_verdicts(known_answers: KnownAnswers, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    by_dataset = evaluation.run(evaluation.parse_args(_args(tiny_model_dir, tmp_path / "out.jsonl", "--batch", "2")))
    assert by_dataset == {"aime": 0.5, "amc": 0.5}
    assert "| tiny_qwen2" in capsys.readouterr().out.split("| model | AIME24 | AMC23 | Avg |")[1]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 6
    for record in records:
        assert [s["score"] for s in record["samples"]] == [1.0, 1.0, 0.0, 0.0]
        assert record["samples"][2]["extracted"] is None  # no </think>: nothing to grade


@needs_data
def test_an_interrupted_run_resumes_without_regenerating(known_answers: KnownAnswers, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    evaluation.run(evaluation.parse_args(_args(tiny_model_dir, out, problems=2)))
    assert known_answers.generated == 4
    with open(out, "a") as file:
        file.write('{"dataset": "aime", "index": 2, "samp')  # killed while writing a record
    by_dataset = evaluation.run(evaluation.parse_args(_args(tiny_model_dir, out, problems=3)))
    assert known_answers.generated == 6  # only the third problem of each file
    assert by_dataset == {"aime": 0.5, "amc": 0.5}
    keys = [(r["dataset"], r["index"]) for r in map(json.loads, out.read_text().splitlines()[1:])]
    assert sorted(keys) == [(name, i) for name in ("aime", "amc") for i in range(3)]
    with pytest.raises(evaluation.InputError, match="other settings.*temperature"):
        evaluation.run(evaluation.parse_args(_args(tiny_model_dir, out, "--temperature", "1.0")))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(_args(tiny_model_dir, tmp_path / "out.jsonl", "--engine", "vllm", data=str(AIME)))
    assert exit_info.value.code == 2
    assert "--engine vllm: vLLM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_unsupported_data_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "problems.csv"
    data.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(_args(tiny_model_dir, tmp_path / "out.jsonl", data=str(data)))
    assert exit_info.value.code == 2
    assert "unsupported data format '.csv'" in capsys.readouterr().err
