"""The trainer at scale, on CPU: presets, config files, FSDP2 over 2 gloo ranks, runs that survive
kill -9 and SIGTERM, skipped non-finite steps, the run log."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsr_fast.config import TrainConfig, parse_args
from dsr_fast.errors import InputError
from dsr_fast.run_log import RunLog

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# presets and config files

# ../shared/reference/recipe.md §1.1, typed in by hand: (samples, max response, steps)
RECIPE_STAGES = {"deepscaler-8k": (8, 8192, 1040), "deepscaler-16k": (16, 16384, 480), "deepscaler-24k": (16, 24576, 230)}


@pytest.mark.parametrize("preset", sorted(RECIPE_STAGES))
def test_presets_resolve_to_the_recipe(preset):
    cfg = parse_args(["--preset", preset, "--model", "m", "--data", "d.parquet"])
    samples, max_response, steps = RECIPE_STAGES[preset]
    assert (cfg.samples_per_prompt, cfg.max_response_tokens, cfg.steps) == (samples, max_response, steps)
    assert cfg.prompts_per_step == 128 and cfg.mini_batches == 2  # 64-prompt mini-batches
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip) == (1e-6, 0.01, 1.0)
    assert (cfg.kl_coef, cfg.kl_type, cfg.entropy_coef) == (0.001, "k3", 0.001)
    assert (cfg.clip_low, cfg.clip_high) == (0.2, 0.2)
    assert (cfg.temperature, cfg.top_p) == (0.6, 1.0)
    assert cfg.max_prompt_tokens == 1024 and cfg.max_tokens_per_microbatch == 32768
    assert cfg.advantage == "grpo" and not cfg.drop_uniform_groups  # all-equal groups kept with A = 0
    assert cfg.loss_agg == "token-mean" and cfg.dtype == "float32"


def test_preset_then_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: deepscaler-16k\nlr: 2.0e-6\nsteps: 10\n")
    cfg = parse_args(["--config", str(path), "--steps", "3", "--model", "m", "--data", "d"])
    assert (cfg.preset, cfg.samples_per_prompt, cfg.lr, cfg.steps) == ("deepscaler-16k", 16, 2e-6, 3)
    assert parse_args(["--preset", "deepscaler-8k", "--temperature", "1.0"]).temperature == 1.0


def test_unknown_preset_and_bad_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "deepscaler-4k"])
    assert "unknown preset 'deepscaler-4k'" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert str(bad) in capsys.readouterr().err


def test_a_preset_says_which_checkpoint_starts_the_stage(tmp_path):
    from dsr_fast.train import train

    with pytest.raises(InputError, match="deepscaler-16k needs --model: the 8K stage's checkpoint"):
        train(parse_args(["--preset", "deepscaler-16k", "--data", "d", "--out-dir", str(tmp_path)]))


def test_empty_data_file_names_the_file(tmp_path):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    out = run_train("--data", str(data), "--out-dir", str(tmp_path / "run"), "--warmstart-steps", "0")
    assert out.returncode != 0 and f"error: {data}: no problems in file" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# FSDP2 over two processes

TINY = ["--warmstart-steps", "0", "--prompts-per-step", "4", "--samples-per-prompt", "4", "--max-response-tokens", "12",
        "--max-prompt-tokens", "64", "--max-tokens-per-microbatch", "256", "--eval-problems", "0"]


def run_train(*args, torchrun: int = 0, timeout: int = 600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), "-m", "dsr_fast.train"] if torchrun else [sys.executable, "-m", "dsr_fast.train"]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_make_the_same_step_as_one(tmp_path):
    # same prompts, same per-request seeds -> same samples; the ranks shard the model (FSDP2) and
    # split rollout and micro-batches, so only the order of float reductions differs
    args = [*TINY, "--steps", "1", "--lr", "1e-2"]
    one = run_train(*args, "--out-dir", str(tmp_path / "one"))
    two = run_train(*args, "--out-dir", str(tmp_path / "two"), torchrun=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2;" in two.stdout  # really two ranks
    a, b = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert a["response_len_mean"] == b["response_len_mean"] and a["reward"] == b["reward"]
    # the global token-mean and FSDP's averaging: a wrong world-size scale would show in these
    for key in ("loss", "grad_norm", "entropy_mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    wa, wb = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=2e-6, msg=name)
    moved = max((wa[k] - _initial_weights()[k]).abs().max().item() for k in wa)
    assert moved > 1e-3  # the step did change the weights (lr 1e-2)


def _initial_weights() -> dict:
    from dsr_fast import toy
    from dsr_fast.model import _to_hf_key, Qwen2

    torch.manual_seed(0)
    model = Qwen2(toy.model_config(toy.build_tokenizer()))
    return {_to_hf_key(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}


# ---------------------------------------------------------------------------------------------
# runs that survive

VOLATILE = ("time_", "tokens_per_s")


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE[0]) and not k.endswith(VOLATILE[1])} for r in records]


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_reproduces_the_run(tmp_path):
    args = [*TINY, "--steps", "5", "--warmstart-steps", "2", "--lr", "1e-2", "--checkpoint-every", "1", "--eval-problems", "4",
            "--eval-samples", "1"]
    straight = run_train(*args, "--out-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "broken"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dsr_fast.train", *args, "--out-dir", str(run)]
    # 1. SIGTERM after the first step: checkpoint, then exit 143
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "continue with --resume" in out
    stopped_at = int((run / "checkpoints/latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < 5

    # 2. resume, then kill -9 once a later checkpoint exists
    proc = subprocess.Popen([*cmd, "--resume"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: int((run / "checkpoints/latest").read_text().strip().split("_")[1]) > stopped_at, proc)
    proc.kill()
    proc.wait(timeout=60)

    # 3. resume again to the end
    done = run_train(*args, "--out-dir", str(run), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at RL step" in done.stdout

    want, got = comparable(metrics(tmp_path / "straight")), comparable(metrics(run))
    assert [r["step"] for r in got] == list(range(5))
    for w, g in zip(want, got):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (w["step"], k)
    a, b = load_file(tmp_path / "straight/final/model.safetensors"), load_file(run / "final/model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def _wait_for(condition, proc, timeout=400):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if condition():
                return
        except (OSError, ValueError, IndexError):
            pass  # a file being replaced right now
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def test_non_finite_loss_skips_the_optimizer_step(tmp_path, monkeypatch):
    from dsr_fast import train as train_module

    real = train_module.grpo_loss

    def poisoned(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * float("nan"), m

    monkeypatch.setattr(train_module, "grpo_loss", poisoned)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=1, warmstart_steps=0, eval_problems=0, prompts_per_step=4,
                      samples_per_prompt=2, max_response_tokens=8, max_prompt_tokens=64, report_to="jsonl")
    train_module.train(cfg)
    record = metrics(tmp_path)[0]
    assert record["skipped_steps"] == 1
    final = load_file(tmp_path / "final/model.safetensors")
    for name, want in _initial_weights().items():
        torch.testing.assert_close(final[name], want, rtol=0, atol=0, msg=name)  # untouched: no step, no decay


# ---------------------------------------------------------------------------------------------
# the run log


def test_run_log_resume_drops_redone_steps_and_rejects_unknown_backends(tmp_path):
    log = RunLog(tmp_path, "jsonl", {})
    for step in range(4):
        log.log({"step": step, "reward": step / 4, "eval": {"pass@1": 0.5}})
    log.close(plot=False)
    again = RunLog(tmp_path, "jsonl", {}, resume_step=2)
    again.log({"step": 2, "reward": 9.0})
    again.close(plot=False)
    assert [(r["step"], r["reward"]) for r in metrics(tmp_path)] == [(0, 0.0), (1, 0.25), (2, 9.0)]
    with pytest.raises(ValueError, match="unknown backend"):
        RunLog(tmp_path, "jsonl,mlflow", {})


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLog(tmp_path, "jsonl", {})
    for step in range(3):
        log.log({"step": step, "reward": step / 3, "kl_mean": 0.01 * step, "eval": {"pass@1": 0.1 * step}})
    path = log.close()
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vllm_engine_without_vllm_says_how_to_get_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the error path does not apply")
    from dsr_fast.train import train

    with pytest.raises(InputError, match="make test-vllm"):
        train(TrainConfig(engine="vllm", out_dir=str(tmp_path)))
    with pytest.raises(InputError, match="--engine 'sglang'"):
        train(TrainConfig(engine="sglang", out_dir=str(tmp_path)))
