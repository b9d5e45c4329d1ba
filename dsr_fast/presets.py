"""The DeepScaleR-1.5B recipe as three presets, one per context-lengthening stage.

Numbers from ../shared/reference/recipe.md §1.1 (the deepscaler repo's run_deepscaler_1.5b_*.sh and
its verl defaults). A stage starts from the previous stage's checkpoint, which is also its frozen
KL reference: the trainer takes the reference from --model, so passing a checkpoint of the
previous stage as --model does both. Every saved step has a Hugging Face export beside it
(checkpoint.py), so the hand-off step can be chosen after the run, as the original's was (8K→16K
at step 1040 of ~1,600).

Step counts are per stage (the published run's global steps 0→1040, 1040→1520, 1520→~1750).
Validation and checkpoints as the original scripts: every 20 steps at 8K, every 10 at 16K and
24K (test_freq, save_freq). The original trains on every problem and validates on AIME24 alone,
so a preset never holds out training data: it validates on --eval-data, by default the AIME24
file of the DeepScaleR test sets when it is found (`default_eval_data`), and otherwise the trainer
says that validation is off.
"""

from __future__ import annotations

import os
from pathlib import Path

_SHARED = dict(
    prompts_per_step=128,
    mini_batches=2,  # PPO mini-batch 64 prompts -> 2 optimizer steps per RL step
    max_prompt_tokens=1024,
    temperature=0.6,
    top_p=1.0,
    lr=1e-6,
    weight_decay=0.01,
    grad_clip=1.0,
    clip_low=0.2,
    clip_high=0.2,
    kl_coef=0.001,
    kl_type="k3",
    entropy_coef=0.001,
    advantage="grpo",
    drop_uniform_groups=False,  # rejection_sample=False: all-equal groups stay, with A = 0
    max_tokens_per_microbatch=32768,  # ppo_max_token_len_per_gpu
    eval_problems=10**6,  # every problem of the --eval-data files
    eval_greedy=False,
    warmstart_steps=0,
    dtype="float32",  # fp32 master weights and optimizer state; bf16 compute (mixed_precision)
    mixed_precision="auto",
    # keep attention, recompute the rest, and store whole layers while 40 GB of an A100-80GB allows
    recompute="auto",
    recompute_budget_gb=40.0,
    instruction=None,  # DeepScaleR's sentence
    # a ceiling on concurrent sequences per GPU: the paged KV pool (kv_cache_memory of the memory
    # left next to the training state) decides how many run; the rest wait or are preempted
    rollout_batch=512,
    kv_cache_memory=0.85,
)

PRESETS: dict[str, dict] = {
    "deepscaler-8k": dict(_SHARED, samples_per_prompt=8, max_response_tokens=8192, steps=1040,
                          eval_samples=8, eval_every=20, checkpoint_every=20, out_dir="runs/deepscaler-8k"),
    "deepscaler-16k": dict(_SHARED, samples_per_prompt=16, max_response_tokens=16384, steps=480,
                           eval_samples=16, eval_every=10, checkpoint_every=10, out_dir="runs/deepscaler-16k"),
    "deepscaler-24k": dict(_SHARED, samples_per_prompt=16, max_response_tokens=24576, steps=230,
                           eval_samples=16, eval_every=10, checkpoint_every=10, out_dir="runs/deepscaler-24k"),
}

# one line per preset, for --help
DESCRIPTIONS = {
    "deepscaler-8k": "stage 1: from R1-Distill-Qwen-1.5B, 8K responses, 8 samples/prompt, 1040 steps, validate+save every 20",
    "deepscaler-16k": "stage 2: from an 8K checkpoint, 16K responses, 16 samples/prompt, 480 steps, validate+save every 10",
    "deepscaler-24k": "stage 3: from a 16K checkpoint, 24K responses, 16 samples/prompt, 230 steps, validate+save every 10",
}

# what --model should be for each stage: the stage chain of iterative context lengthening
STAGE_START = {
    "deepscaler-8k": "a local copy of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "deepscaler-16k": "the 8K stage's checkpoint, any saved step's Hugging Face export (e.g. runs/deepscaler-8k/hf/step_001040)",
    "deepscaler-24k": "the 16K stage's checkpoint, any saved step's Hugging Face export (e.g. runs/deepscaler-16k/hf/step_000480)",
}

# The AIME 2024 file the published numbers were computed on, relative to the shared data folder.
AIME24 = Path("test") / "aime.json"


def shared_data_dirs() -> list[Path]:
    """Where the DeepScaleR data may be: $DSR_FAST_SHARED_DATA, then ../shared/data beside a source checkout."""
    dirs = [Path(os.environ["DSR_FAST_SHARED_DATA"])] if os.environ.get("DSR_FAST_SHARED_DATA") else []
    return dirs + [Path(__file__).resolve().parents[2] / "shared" / "data"]


def default_eval_data() -> str | None:
    """The AIME24 test file if one of `shared_data_dirs` has it, else None (validation off)."""
    for root in shared_data_dirs():
        if (root / AIME24).is_file():
            return str(root / AIME24)
    return None


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name], eval_data=default_eval_data())
