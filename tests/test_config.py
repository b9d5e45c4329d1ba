"""The trainer's command line: defaults, overrides, config files, rejected input."""

import json

import pytest

from dsr_fast.config import TrainConfig, parse_args


def test_no_arguments_is_the_embedded_default():
    assert parse_args([]) == TrainConfig()


def test_flags_override_with_types():
    cfg = parse_args(["--steps", "7", "--lr", "3e-5", "--model", "/m", "--kl-coef", "0"])
    assert (cfg.steps, cfg.lr, cfg.model, cfg.kl_coef) == (7, 3e-5, "/m", 0.0)


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 3, "temperature": 0.6, "model": None, "lr": 1}))
    cfg = parse_args(["--config", str(path), "--steps", "5"])
    assert (cfg.steps, cfg.temperature, cfg.lr) == (5, 0.6, 1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stepz", "3"], "unrecognized arguments"),
        (["--steps", "three"], "invalid int value"),
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ({"stepz": 1}, "unknown key 'stepz'"),
        ({"steps": "3"}, "steps should be int"),
        ({"steps": True}, "steps should be int"),
        ({"data": 5}, "data should be str"),
    ],
)
def test_bad_config_file(tmp_path, content, message, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert message in err and str(path) in err


# ---------------------------------------------------------------------------------------------
# --help and --print-config


def help_text(capsys) -> str:
    with pytest.raises(SystemExit) as err:
        parse_args(["--help"])
    assert err.value.code == 0
    return capsys.readouterr().out


def test_every_field_has_a_description():
    """A new TrainConfig field needs its one line in config.HELP (and nothing stale stays there)."""
    from dataclasses import fields

    from dsr_fast.config import HELP

    names = {f.name for f in fields(TrainConfig)}
    missing = sorted(names - set(HELP))
    assert not missing, f"fields without a --help line in dsr_fast/config.py HELP: {missing}"
    assert not set(HELP) - names, f"HELP lines of no field: {sorted(set(HELP) - names)}"
    assert all(isinstance(HELP[n], str) and len(HELP[n]) > 10 for n in names)


def test_help_shows_description_default_and_choices_of_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per flag's description, to find it whole
    from dataclasses import fields

    from dsr_fast.config import HELP

    text = help_text(capsys)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        default = "none" if f.default is None else str(f.default)
        assert f"{HELP[f.name]} (default: {default})" in text, f.name
    # choices, each with a line
    for line in ["deepscaler-8k   stage 1: from R1-Distill-Qwen-1.5B, 8K responses, 8 samples/prompt, 1040 steps",
                 "deepscaler-16k  stage 2", "deepscaler-24k  stage 3",
                 "--engine {builtin,vllm}", "--kl-type {k1,k2,k3}", "--advantage {grpo,dr_grpo}",
                 "--loss-agg {token-mean,seq-mean-token-mean,seq-mean-token-sum,seq-mean-token-sum-norm}",
                 "--mixed-precision {auto,bfloat16,none}", "k3  ref/p - log(ref/p) - 1", "--print-config"]:
        assert line in text, line


def test_choices_are_what_the_code_accepts():
    from dsr_fast.advantages import ESTIMATORS
    from dsr_fast.config import _choices
    from dsr_fast.kernels.grpo_loss import AGG_MODES, KL_TYPES
    from dsr_fast.presets import PRESETS

    choices = _choices()
    assert tuple(choices["kl_type"]) == KL_TYPES and tuple(choices["loss_agg"]) == AGG_MODES
    assert tuple(choices["advantage"]) == ESTIMATORS and list(choices["preset"]) == list(PRESETS)


@pytest.mark.parametrize("argv", [["--kl-type", "k4"], ["--engine", "sglang"], ["--mixed-precision", "fp16"], ["--loss-agg", "sum"]])
def test_values_outside_the_choices_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "invalid choice" in capsys.readouterr().err


def test_config_file_values_outside_the_choices_are_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("advantage: ppo\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "advantage 'ppo' is not one of grpo, dr_grpo" in capsys.readouterr().err


def test_print_config_prints_preset_then_file_then_flags_and_exits(tmp_path, capsys):
    from dsr_fast.presets import PRESETS

    path = tmp_path / "c.yaml"
    path.write_text("lr: 2.0e-6\nsteps: 100\n")
    with pytest.raises(SystemExit) as err:
        parse_args(["--preset", "deepscaler-16k", "--config", str(path), "--steps", "7", "--model", "m", "--print-config"])
    assert err.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples_per_prompt"] == PRESETS["deepscaler-16k"]["samples_per_prompt"] == 16  # preset
    assert printed["lr"] == 2e-6  # file over preset
    assert printed["steps"] == 7  # flag over file
    assert printed["warmstart_lr"] == TrainConfig().warmstart_lr  # default, untouched
    assert printed["model"] == "m" and printed["preset"] == "deepscaler-16k"
    # and it is a config file that reproduces itself
    again = tmp_path / "again.json"
    again.write_text(json.dumps(printed))
    assert parse_args(["--config", str(again)]) == TrainConfig(**printed)
