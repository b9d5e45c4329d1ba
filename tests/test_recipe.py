"""How a recipe run is wired: presets validate on AIME24 and never hold out training data, the
per-stage validation/checkpoint interval, and the warning for many passes over a small file."""

import json

import pytest
import torch
from conftest import SHARED_DATA

from dsr_fast import presets, toy
from dsr_fast.config import TrainConfig, parse_args
from dsr_fast.data import load_problems
from dsr_fast.model import Qwen2
from dsr_fast.train import setup, warn_many_passes

AIME = SHARED_DATA / "test" / "aime.json"

# The original scripts (recipe.md §1.1; run_deepscaler_1.5b_{8k,16k,24k}.sh test_freq/save_freq,
# n_val), typed in by hand: (eval_every, checkpoint_every, eval_samples)
STAGE_INTERVALS = {"deepscaler-8k": (20, 20, 8), "deepscaler-16k": (10, 10, 16), "deepscaler-24k": (10, 10, 16)}


@pytest.mark.parametrize("preset", sorted(STAGE_INTERVALS))
def test_validation_and_checkpoint_interval_per_stage(preset):
    cfg = parse_args(["--preset", preset, "--model", "m", "--data", "d"])
    assert (cfg.eval_every, cfg.checkpoint_every, cfg.eval_samples) == STAGE_INTERVALS[preset]
    assert cfg.temperature == 0.6 and not cfg.eval_greedy


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = toy.build_tokenizer()
    torch.manual_seed(0)
    Qwen2(toy.model_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps([{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(50)]))
    return path


def test_a_preset_without_eval_data_trains_on_every_problem_and_says_validation_is_off(tiny_model_dir, problem_file, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(presets, "shared_data_dirs", lambda: [tmp_path / "no-shared-data"])
    cfg = parse_args(["--preset", "deepscaler-8k", "--model", str(tiny_model_dir), "--data", str(problem_file)])
    assert cfg.eval_data is None
    _, _, train_set, eval_sets, _ = setup(cfg, torch.device("cpu"))
    assert [p.problem for p in train_set] == [p.problem for p in load_problems(problem_file)]  # all 50, file order
    assert eval_sets == []
    assert f"validation off: no --eval-data, and no AIME24 file at {tmp_path / 'no-shared-data' / 'test' / 'aime.json'}" in capsys.readouterr().out


@pytest.mark.skipif(not AIME.is_file(), reason=f"{AIME} not present")
def test_a_preset_validates_on_aime24_when_found_and_still_trains_on_every_problem(tiny_model_dir, problem_file, monkeypatch):
    monkeypatch.setattr(presets, "shared_data_dirs", lambda: [SHARED_DATA])
    cfg = parse_args(["--preset", "deepscaler-16k", "--model", str(tiny_model_dir), "--data", str(problem_file)])
    assert cfg.eval_data == str(AIME)
    _, _, train_set, eval_sets, _ = setup(cfg, torch.device("cpu"))
    assert len(train_set) == 50
    assert [(name, len(problems)) for name, problems in eval_sets] == [("aime", 30)]
    # an explicit --eval-data wins over the default
    cfg = parse_args(["--preset", "deepscaler-16k", "--model", "m", "--data", "d", "--eval-data", "x.json"])
    assert cfg.eval_data == "x.json"


def test_shared_data_dir_from_the_environment_comes_first(tmp_path, monkeypatch):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "aime.json").write_text("[]")
    monkeypatch.setenv("DSR_FAST_SHARED_DATA", str(tmp_path))
    assert presets.default_eval_data() == str(tmp_path / "test" / "aime.json")


def test_without_a_preset_a_tenth_is_held_out_and_said(tiny_model_dir, problem_file, capsys):
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(problem_file))
    _, _, train_set, eval_sets, _ = setup(cfg, torch.device("cpu"))
    (name, held_out), = eval_sets
    assert (name, len(held_out), len(train_set)) == ("heldout", 5, 45)
    assert not {p.problem for p in held_out} & {p.problem for p in train_set}
    assert "5 of the 50 training problems are held out" in capsys.readouterr().out


def test_many_passes_over_a_small_file_are_warned_about(capsys):
    cfg = TrainConfig(steps=1040, prompts_per_step=128)
    assert warn_many_passes(cfg, 1208) == pytest.approx(1040 * 128 / 1208)  # DSR-sub: ~110 passes
    assert "110 passes over the 1208 training problems" in capsys.readouterr().out
    assert warn_many_passes(cfg, 40315) == pytest.approx(3.3, abs=0.05)  # the 40.3K original: no warning
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not AIME.is_file(), reason=f"{AIME} not present")
def test_a_config_file_can_turn_the_default_validation_off(tiny_model_dir, problem_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(presets, "shared_data_dirs", lambda: [SHARED_DATA])
    config = tmp_path / "run.yaml"
    config.write_text("preset: deepscaler-8k\neval_data: null\n")
    cfg = parse_args(["--config", str(config), "--model", str(tiny_model_dir), "--data", str(problem_file)])
    assert cfg.eval_data is None
    _, _, train_set, eval_sets, _ = setup(cfg, torch.device("cpu"))
    assert len(train_set) == 50 and eval_sets == []
    assert "validation off: eval_data is none (set by --config)" in capsys.readouterr().out
