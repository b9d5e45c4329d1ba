"""The DeepScaleR-1.5B recipe as three presets, one per context-lengthening stage.

Numbers from ../shared/reference/recipe.md §1.1 (the deepscaler repo's run_deepscaler_1.5b_*.sh and
its verl defaults). A stage starts from the previous stage's final checkpoint, which is also its
frozen KL reference: the trainer takes the reference from --model, so passing the previous stage's
`final/` directory as --model does both.

Step counts are per stage (the published run's global steps 0→1040, 1040→1520, 1520→~1750).
Validation is every 20 steps on the --eval-data files, as the original scripts (test_freq=20).
"""

from __future__ import annotations

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
    eval_every=20,
    eval_samples=8,
    eval_problems=10**6,  # the whole test file
    eval_greedy=False,
    warmstart_steps=0,
    dtype="float32",  # fp32 master weights and optimizer state; bf16 compute (mixed_precision)
    mixed_precision="auto",
    # keep attention, recompute the rest, and store whole layers while 40 GB of an A100-80GB allows
    recompute="auto",
    recompute_budget_gb=40.0,
    checkpoint_every=20,
    instruction=None,  # DeepScaleR's sentence
    rollout_batch=512,
)

PRESETS: dict[str, dict] = {
    "deepscaler-8k": dict(_SHARED, samples_per_prompt=8, max_response_tokens=8192, steps=1040,
                          out_dir="runs/deepscaler-8k"),
    "deepscaler-16k": dict(_SHARED, samples_per_prompt=16, max_response_tokens=16384, steps=480,
                           eval_samples=16, out_dir="runs/deepscaler-16k"),
    "deepscaler-24k": dict(_SHARED, samples_per_prompt=16, max_response_tokens=24576, steps=230,
                           eval_samples=16, out_dir="runs/deepscaler-24k"),
}

# what --model should be for each stage: the stage chain of iterative context lengthening
STAGE_START = {
    "deepscaler-8k": "a local copy of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "deepscaler-16k": "the 8K stage's checkpoint (e.g. runs/deepscaler-8k/final)",
    "deepscaler-24k": "the 16K stage's checkpoint (e.g. runs/deepscaler-16k/final)",
}


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])
