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
