"""The trainer's one typed config, and its command line.

Defaults are the embedded default run (tiny model, synthetic addition, minutes on a CPU). Every
field is a `--flag` of `python -m dsr_fast.train`; unknown flags and wrong types are errors.
Values resolve in this order, later winning: defaults, `--preset` (see presets.py), `--config`
file (JSON or YAML), flags. `--help` describes every field (HELP, CHOICES below: a new field needs
its line there); `--print-config` prints the resolved configuration and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
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
    # validation problem files, comma-separated (e.g. AIME24 and MATH-500); None: a preset takes the
    # AIME24 test file when found, other runs hold out a tenth of --data
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
    engine: str = "builtin"  # builtin (dsr_fast/engine: paged KV cache) | vllm: colocated in-process vLLM (pip install 'dsr-fast[vllm]')
    rollout_batch: int = 256  # ceiling on sequences decoded at once; the KV budget decides how many run
    kv_cache_memory: float = 0.85  # built-in engine on GPU: share of the free device memory its paged KV pool takes at each wake
    kv_cache_tokens: int = 0  # built-in engine: exact KV pool size in tokens; 0 = from kv_cache_memory (CPU: 256 MiB)
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
    keep_checkpoints: int = 2  # the newest N DCP states are kept (their HF exports are kept apart, see keep_exports)
    keep_exports: int = 0  # the newest N Hugging Face exports of checkpoints are kept; 0 = all (each can start the next stage)
    resume: bool = False  # continue from out_dir's latest checkpoint
    report_to: str = "auto"  # comma-separated of jsonl, tensorboard, wandb; auto = jsonl + the installed ones; none


# One line of --help per field, keyed by field name; the default is appended. A new field needs a
# line here (tests/test_config.py checks that every field has one).
HELP = {
    "preset": "a DeepScaleR stage holding every hyperparameter of the recipe (flags and --config override it)",
    "model": "local Hugging Face Qwen2 directory to start from, also the frozen KL reference; none = the embedded tiny model",
    "data": "training problems (.json, .jsonl, or verl .parquet); none = synthetic addition (embedded run)",
    "eval_data": "validation problem files, comma-separated; none: a preset validates on AIME24 when the file is found "
                 "(else validation is off), other runs hold out a tenth of --data",
    "instruction": "appended to every question in the user message; none = DeepScaleR's sentence (the toy task: nothing)",
    "out_dir": "run directory: config.json, metrics.jsonl, checkpoints/, hf/, final/, results.json",
    "seed": "seed of data order, sampling and initialisation",
    "warmstart_steps": "supervised steps that teach the embedded model the answer format before RL (embedded run only)",
    "warmstart_batch": "sequences per warm-start step",
    "warmstart_lr": "learning rate of the warm-start",
    "warmstart_unboxed_rate": "share of warm-start demonstrations that give the total in words, not \\boxed{} (the habit RL unlearns)",
    "steps": "RL steps (rollout, reward, update) of this run",
    "prompts_per_step": "prompts sampled per RL step (DeepScaleR: 128)",
    "samples_per_prompt": "responses per prompt, the GRPO group (DeepScaleR: 8 at 8K, 16 at 16K/24K)",
    "mini_batches": "optimizer steps per RL step; the step's sequences are split evenly (DeepScaleR: 2)",
    "max_tokens_per_microbatch": "token budget of one packed forward/backward (DeepScaleR: 32768)",
    "max_prompt_tokens": "longer prompts are dropped, with a count (DeepScaleR: 1024)",
    "max_response_tokens": "most tokens per response (DeepScaleR: 8192 / 16384 / 24576)",
    "temperature": "sampling temperature, also applied to every logprob (DeepScaleR: 0.6)",
    "top_p": "nucleus sampling threshold of the rollout (DeepScaleR: 1.0)",
    "engine": "rollout engine",
    "rollout_batch": "ceiling on sequences decoded at once (finished ones are refilled); the KV budget decides how many run",
    "kv_cache_memory": "built-in engine on GPU: share of the free device memory its paged KV pool takes, measured at each wake",
    "kv_cache_tokens": "built-in engine: exact KV pool size in tokens; 0 = from --kv-cache-memory (CPU: 256 MiB)",
    "rollout_shares_weights": "generate with the policy's own weights (one process): no copy, no sync",
    "lr": "AdamW learning rate, constant (DeepScaleR: 1e-6)",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clip per optimizer step",
    "clip_low": "PPO ratio clip below 1 (ratio >= 1 - clip_low)",
    "clip_high": "PPO ratio clip above 1 (ratio <= 1 + clip_high; > clip_low is DAPO's clip-higher)",
    "kl_coef": "weight of the KL penalty to the frozen reference in the loss; 0 = no reference model",
    "kl_type": "KL estimator",
    "entropy_coef": "weight of the entropy bonus",
    "advantage": "advantage estimator over each prompt's group",
    "drop_uniform_groups": "drop groups whose rewards are all equal before the update (DAPO dynamic sampling)",
    "loss_agg": "how per-token losses are averaged",
    "eval_problems": "most problems per validation file; 0 = no validation",
    "eval_samples": "samples per validation problem; Pass@1 = mean score over problems x samples",
    "eval_every": "RL steps between validations; 0 = before and after training only",
    "eval_greedy": "also a greedy (temperature 0) Pass@1 at each validation",
    "dtype": "dtype of the policy's master weights and optimizer state",
    "mixed_precision": "compute dtype of the policy",
    "recompute": "activation recomputation in backward, per layer (recompute.py)",
    "recompute_budget_gb": "--recompute auto: activation memory allowed per micro-batch, GB per process",
    "old_logprobs_first_minibatch": "also recompute old logprobs for the first mini-batch (the old path: same result, one more forward)",
    "device": "auto = cuda if available, else cpu; or cpu, cuda, cuda:N",
    "threads": "CPU threads for torch; 0 = torch's default",
    "checkpoint_every": "RL steps between checkpoints (DCP state + Hugging Face export); 0 = only on SIGTERM",
    "keep_checkpoints": "newest DCP states (model, optimizer, data position) kept for --resume",
    "keep_exports": "newest Hugging Face exports of checkpoints kept (out_dir/hf/step_N); 0 = all",
    "resume": "continue from out_dir's latest checkpoint",
    "report_to": "comma-separated of jsonl, tensorboard, wandb; auto = jsonl + the installed ones; none",
}

# Fields with a fixed set of values, with a line per value where the name does not say enough.
CHOICES: dict[str, dict[str, str]] = {
    "preset": {},  # filled from presets.DESCRIPTIONS below
    "engine": {"builtin": "dsr_fast/engine: paged KV cache under a memory budget, CUDA graphs per batch bucket",
               "vllm": "colocated in-process vLLM (pip install 'dsr-fast[vllm]')"},
    "kl_type": {"k1": "log(p/ref)", "k2": "(log(p/ref))^2 / 2", "k3": "ref/p - log(ref/p) - 1, Schulman's (DeepScaleR's low_var_kl)"},
    "advantage": {"grpo": "(r - mean) / (std + 1e-6), std unbiased (DeepScaleR)", "dr_grpo": "r - mean (Dr. GRPO)"},
    "loss_agg": {"token-mean": "mean over every response token of the mini-batch",
                 "seq-mean-token-mean": "mean over sequences of each one's token-mean",
                 "seq-mean-token-sum": "mean over sequences of each one's token-sum",
                 "seq-mean-token-sum-norm": "token-sums divided by a fixed length (Dr. GRPO)"},
    "mixed_precision": {"auto": "bfloat16 on CUDA, none on CPU", "bfloat16": "autocast to bfloat16", "none": "compute in --dtype"},
    "dtype": {"float32": "", "bfloat16": ""},
    "recompute": {"none": "store every activation",
                  "selective": "keep attention's inputs and output; recompute norms, projections, rope and MLP",
                  "full": "keep each layer's input only; recompute the whole layer",
                  "auto": "per micro-batch, the plan recomputing the fewest FLOPs whose activations fit --recompute-budget-gb"},
}

# --help groups: a field opens the section named here; the fields after it belong to it.
SECTIONS = {
    "preset": "recipe",
    "model": "model and data",
    "warmstart_steps": "supervised warm-start (embedded run only)",
    "steps": "RL schedule",
    "max_prompt_tokens": "generation",
    "lr": "optimisation and loss",
    "eval_problems": "validation",
    "dtype": "runtime",
    "checkpoint_every": "checkpoints and logging",
}


def _choices() -> dict[str, dict[str, str]]:
    from .presets import DESCRIPTIONS

    return {**CHOICES, "preset": dict(DESCRIPTIONS)}


def _flag_type(tp):
    """(python type, optional?) from a field annotation like `str | None`."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return tp, False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Wraps each line of a help text on its own, so that a choice's line stays a line."""

    def _split_lines(self, text, width):
        lines = []
        for line in text.splitlines():
            indent = " " * (len(line) - len(line.lstrip()))
            lines += textwrap.wrap(line, width, subsequent_indent=indent + "    ") or [""]
        return lines

    def _get_help_string(self, action):
        return action.help  # the default is written into the text by build_parser


def _default_text(value) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, str) and not value else str(value)


def field_help(name: str, default, choices: dict[str, str] | None) -> str:
    text = HELP.get(name, "(no description)") + f" (default: {_default_text(default)})"
    if choices and any(choices.values()):
        width = max(map(len, choices))
        text += "".join(f"\n  {value:<{width}}  {line}".rstrip() for value, line in choices.items())
    return text


def build_parser(cls=TrainConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsr_fast.train", formatter_class=_HelpFormatter,
        description="GRPO on math with verifiable rewards: the DeepScaleR recipe (--preset), or with no flags the "
                    "embedded default run (a tiny model learns to add, minutes on a CPU).",
        epilog="Values resolve in this order, later winning: the field defaults shown here, --preset, --config, flags.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of field: value pairs, applied after --preset and before the other flags")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration (preset + file + flags) as JSON, and exit")
    hints = typing.get_type_hints(cls)
    choices = _choices()
    group = parser
    for f in fields(cls):
        if f.name in SECTIONS:
            group = parser.add_argument_group(SECTIONS[f.name])
        tp, _ = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = field_help(f.name, f.default, choices.get(f.name))
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "preset":  # checked by preset_values, whose message names the unknown preset
            group.add_argument(flag, type=tp, default=None, metavar="{" + ",".join(choices[f.name]) + "}", help=text)
        elif f.name in choices:
            group.add_argument(flag, type=tp, default=None, choices=list(choices[f.name]), help=text)
        else:
            group.add_argument(flag, type=tp, default=None, metavar=tp.__name__.upper(), help=text)
    return parser


def parse_args(argv: list[str] | None = None, cls=TrainConfig):
    """Defaults <- --preset <- --config file <- flags. Unknown flags or config keys, wrong types and
    values outside a field's choices exit with an error; --print-config prints the result and exits."""
    parser = build_parser(cls)
    args = parser.parse_args(argv)
    from_file = _read_config_file(parser, Path(args.config), cls) if args.config else {}
    from_flags = {k: v for k, v in vars(args).items() if k not in ("config", "print_config") and v is not None}
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
    cfg = cls(**values)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg


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
        allowed = _choices().get(key)
        if allowed and value is not None and value not in allowed:
            parser.error(f"--config {path}: {key} {value!r} is not one of {', '.join(allowed)}")
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
