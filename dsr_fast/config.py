"""The trainer's one typed config, and its command line.

Defaults are the embedded default run (tiny model, synthetic addition, minutes on a CPU). Every
field is a `--flag` of `python -m dsr_fast.train`; unknown flags and wrong types are errors.
Values resolve in this order, later winning: defaults, `--preset` (see presets.py), `--config`
file (JSON or YAML), flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    preset: str | None = None  # deepscaler-8k | deepscaler-16k | deepscaler-24k (presets.py)
    # model and data
    model: str | None = None  # local HF Qwen2 directory; None = the embedded tiny model
    data: str | None = None  # problem file (.json/.jsonl/.parquet); None = synthetic addition
    # held-out problem files, comma-separated (e.g. AIME24 and MATH-500); None = a held-out split
    # of the training set
    eval_data: str | None = None
    instruction: str | None = None  # appended to every question; None = DeepScaleR's sentence (none for the toy task)
    out_dir: str = "runs/default"
    seed: int = 0
    # supervised warm-start, embedded default only: teaches the answer format before RL
    warmstart_steps: int = 450  # the tiny model learns to add in ~400 steps
    warmstart_batch: int = 32
    warmstart_lr: float = 3e-3
    # share of demonstrations that state the total in words instead of \boxed{} (see toy.py):
    # the imperfect teacher whose habit RL has to unlearn
    warmstart_unboxed_rate: float = 0.75
    # RL schedule
    steps: int = 40
    prompts_per_step: int = 16  # DeepScaleR: 128
    samples_per_prompt: int = 8  # DeepScaleR: 8 (8K stage), 16 (16K, 24K)
    mini_batches: int = 1  # optimizer steps per RL step; DeepScaleR: 2
    max_tokens_per_microbatch: int = 8192  # token budget of one packed forward/backward
    # generation
    max_prompt_tokens: int = 1024  # longer prompts are dropped with a count
    max_response_tokens: int = 48  # DeepScaleR: 8192 / 16384 / 24576
    temperature: float = 1.0  # DeepScaleR: 0.6, used for rollout AND every logprob
    top_p: float = 1.0
    engine: str = "builtin"  # builtin (rollout.py) | vllm: colocated in-process vLLM (pip install 'dsr-fast[vllm]')
    rollout_batch: int = 256  # sequences decoded at once (KV-cache rows); finished ones are refilled
    # generate with the policy's own weights (one process, same dtype): no copy and no sync;
    # otherwise the engine keeps a copy (bf16 on GPU) that is synced in place after each update
    rollout_shares_weights: bool = False
    # optimisation and loss
    lr: float = 1e-4  # DeepScaleR: 1e-6 on a 1.5B model; a 1M model needs far more
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    kl_type: str = "k3"
    entropy_coef: float = 0.001
    advantage: str = "grpo"  # grpo: (r - mean) / (std + 1e-6); dr_grpo: r - mean
    # DAPO dynamic sampling: drop groups whose rewards are all equal (their advantage is 0 anyway,
    # but they still cost a forward/backward and dilute the token-mean)
    drop_uniform_groups: bool = False
    loss_agg: str = "token-mean"
    # evaluation and runtime
    eval_problems: int = 200
    eval_samples: int = 4  # Pass@1 = mean score over problems x samples, at `temperature`
    eval_every: int = 0  # RL steps between evaluations; 0 = before and after training only
    eval_greedy: bool = True  # also greedy Pass@1 (one sample) at each evaluation
    dtype: str = "float32"  # parameter (master weight) and optimizer-state dtype of the policy
    mixed_precision: str = "auto"  # compute dtype: auto = bfloat16 on CUDA, none on CPU; bfloat16 | none
    # selective = keep attention's inputs and output, recompute norms, projections and MLP; full =
    # keep each layer's input only; auto = per micro-batch, the plan recomputing the fewest FLOPs
    # whose estimated activations fit recompute_budget_gb (recompute.py)
    recompute: str = "none"  # activation recomputation in backward: none | selective | full | auto
    recompute_budget_gb: float = 16.0  # --recompute auto: activation memory allowed per micro-batch, GB per process
    # the first mini-batch's old logprobs equal the update's own (its policy has not moved since the
    # rollout); recomputing them costs one forward per sequence and changes nothing
    old_logprobs_first_minibatch: bool = False  # also recompute old logprobs for the first mini-batch
    device: str = "auto"  # auto = cuda if available, else cpu
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    # runs that survive
    checkpoint_every: int = 0  # RL steps between checkpoints (model, optimizer, data position); 0 = only on SIGTERM
    keep_checkpoints: int = 2  # the newest N are kept
    resume: bool = False  # continue from out_dir's latest checkpoint
    report_to: str = "auto"  # comma-separated of jsonl, tensorboard, wandb; auto = jsonl + the installed ones; none


def _flag_type(tp):
    """(python type, optional?) from a field annotation like `str | None`."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return tp, False


def build_parser(cls=TrainConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsr_fast.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON file of field: value pairs, applied before the other flags")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp, _ = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=tp, default=None, metavar=tp.__name__.upper())
    return parser


def parse_args(argv: list[str] | None = None, cls=TrainConfig):
    """Defaults <- --config file <- flags. Unknown flags or config keys and wrong types exit with an error."""
    parser = build_parser(cls)
    args = parser.parse_args(argv)
    from_file = _read_config_file(parser, Path(args.config), cls) if args.config else {}
    from_flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    preset = from_flags.get("preset", from_file.get("preset"))
    values: dict = {}
    if preset is not None:
        from .presets import preset_values

        try:
            values.update(preset_values(preset))
        except KeyError as e:
            parser.error(f"--preset: {e.args[0]}")
    values.update(from_file)
    values.update(from_flags)
    return cls(**values)


def _read_config_file(parser, path: Path, cls) -> dict:
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml  # transformers depends on PyYAML

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        parser.error(f"--config {path}: {e}")
    except Exception as e:  # yaml.YAMLError, which derives from Exception only
        parser.error(f"--config {path}: not valid YAML ({e})")
    if not isinstance(raw, dict):
        parser.error(f"--config {path}: expected a mapping of field: value")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            parser.error(f"--config {path}: unknown key {key!r}")
        tp, optional = _flag_type(hints[key])
        ok = (value is None and optional) or isinstance(value, tp) or (tp is float and type(value) is int)
        if not ok or (tp is int and isinstance(value, bool)):
            parser.error(f"--config {path}: {key} should be {tp.__name__}, got {value!r}")
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
