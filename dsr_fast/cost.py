"""Projected GPU-hours of the three-stage DeepScaleR run, from measured component rates.

    python -m dsr_fast.cost                                  # documented assumptions only
    python -m dsr_fast.cost --rates runs/gpu_check/gpu_check.json
    python -m dsr_fast.cost --measured-on H200 --decode-tokens-per-s 30000 --decode-rows 256 \\
        --decode-context 400 --train-tokens-per-s 40000 --train-seq-len 4096 --sync-s 0.01

The run is colocated and synchronous, as DeepScaleR's (verl hybrid engine) and dsr_fast's: every
GPU rolls out its share of the step's requests, then the CPUs grade, then every GPU trains on its
share, then the new weights are copied into the engines. So a step costs

    G · rollout_wall + train_flops / (peak · MFU) + G · sync_s + responses / grading_rate_per_gpu

GPU-seconds, summed over the steps of each stage (G = GPUs of the stage).

- Rollout is simulated, not divided out: each GPU decodes R = prompts·samples/G requests with
  continuous batching over `slots` rows. A decode step reads every weight once plus every live
  row's KV cache and does 2·N FLOPs per row, so its time is the roofline
  max(bytes / bandwidth, FLOPs / peak) divided by the fraction of that roofline the engine
  reaches. The GPU is held until its longest response ends, so a stage whose truncated responses
  run to the cap pays for a draining batch at the end; that tail is why GPU count matters.
- Response lengths per GPU are the quantiles of a lognormal capped at the stage's max length,
  scaled so that their mean is the stage's mean response length (every GPU gets the same set,
  admitted in one fixed shuffled order).
- Training is compute-bound: FLOPs = passes · Σ_seq (2·N·L + 2·layers·heads·head_dim·L·(L+1)),
  the second term causal attention's QKᵀ and PV. The passes per trained token are what the
  trainer does with its configuration (presets.py by default; `stage_passes`): 3 (forward +
  backward of the update) + 1 reference forward if the KL term is on + the old log-probs of
  every mini-batch but the first ((m-1)/m of a forward with m mini-batches) + the FLOPs that
  activation recomputation reruns, in forwards, from the per-layer plan the trainer picks for a
  full micro-batch of the stage (recompute.py).

Measured rates become device-independent efficiencies (fraction of the decode roofline, MFU),
which are then applied to an A100's spec sheet. That is the stated conversion: decode and the
weight copy scale with HBM bandwidth, training with dense bf16 TFLOP/s. It assumes the code
reaches the same fraction of peak on an A100 as where it was measured.

Not modelled: the optimizer step (~0.1 A100-s per RL step for 1.78B fp32 params), FSDP
collectives (overlapped with compute), validation, checkpointing, data loading, preemption of
rows when the KV cache overflows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .model import Qwen2Config
from .presets import PRESETS
from .recompute import forward_flops, plan_recompute, recompute_flops

PUBLISHED_A100_HOURS = 3800.0  # DeepScaleR blog / model card (recipe.md §1.1)
GOAL_A100_HOURS = 1000.0


# -----------------------------------------------------------------------------
# hardware and model


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core peak (spec sheet, no sparsity)
    hbm_gbps: float  # HBM bandwidth (spec sheet)

    @property
    def flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9


# Spec sheets. DeepScaleR ran A100-SXM4-80GB.
GPUS = {
    "A100": GPU("A100-SXM4-80GB", 312.0, 2039.0),
    "H100": GPU("H100-SXM5-80GB", 989.0, 3350.0),
    "H100-PCIE": GPU("H100-PCIe-80GB", 756.0, 2000.0),
    "H200": GPU("H200-SXM-141GB", 989.0, 4800.0),
}
A100 = GPUS["A100"]


def gpu_by_name(name: str) -> GPU | None:
    """Spec of a device name as torch reports it ("NVIDIA H200", "NVIDIA A100-SXM4-80GB")."""
    upper = name.upper()
    if "H100" in upper and "PCIE" in upper:
        return GPUS["H100-PCIE"]
    for key in ("A100", "H100", "H200"):
        if key in upper:
            return GPUS[key]
    return None


@dataclass(frozen=True)
class ModelShape:
    """What the cost formulas need from a model."""

    matmul_params: int  # weights multiplied per token: every Linear incl. lm_head, not the embedding
    layers: int
    attn_width: int  # heads · head_dim (query side): attention FLOPs per (query, key) pair / 4 per layer
    kv_bytes_per_token: int  # K and V of one token over all layers, in the engine's dtype
    weight_bytes: int  # bytes a decode step reads for the weights (engine dtype)

    @classmethod
    def qwen2(cls, *, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
              num_key_value_heads, head_dim=None, dtype_bytes=2) -> "ModelShape":
        d = head_dim or hidden_size // num_attention_heads
        per_layer = (hidden_size * (num_attention_heads + 2 * num_key_value_heads) * d  # q, k, v
                     + num_attention_heads * d * hidden_size  # o
                     + 3 * hidden_size * intermediate_size)  # gate, up, down
        matmul = num_hidden_layers * per_layer + hidden_size * vocab_size  # + lm_head
        return cls(
            matmul_params=matmul,
            layers=num_hidden_layers,
            attn_width=num_attention_heads * d,
            kv_bytes_per_token=2 * num_hidden_layers * num_key_value_heads * d * dtype_bytes,
            weight_bytes=matmul * dtype_bytes,
        )

    def forward_flops(self, length: float) -> float:
        """FLOPs of one forward over a sequence of `length` tokens (causal attention)."""
        return 2.0 * self.matmul_params * length + 2.0 * self.layers * self.attn_width * length * (length + 1)


# DeepSeek-R1-Distill-Qwen-1.5B (Qwen2-1.5B shape, untied lm_head), bf16 engine
QWEN2_1_5B_CONFIG = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2)
QWEN2_1_5B = ModelShape.qwen2(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2)


# -----------------------------------------------------------------------------
# workload


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    prompts: int
    samples: int
    max_response: int
    mean_response: float
    gpus: int


# recipe.md §1.1. Mean response lengths: the 8K stage fell from ~5.5K to ~3.5K tokens (recipe.md
# §1.1 "Other facts"), so its mean is taken as 4.5K; the notes give none for 16K and 24K, whose
# lengths grew again after each extension: 5.5K and 7K are assumptions.
DEEPSCALER = (
    Stage("8K", 1040, 128, 8, 8192, 4500.0, 8),
    Stage("16K", 480, 128, 16, 16384, 5500.0, 32),
    Stage("24K", 240, 128, 16, 24576, 7000.0, 32),
)


_RECIPE = PRESETS["deepscaler-8k"]


@dataclass(frozen=True)
class Workload:
    stages: tuple[Stage, ...] = DEEPSCALER
    prompt_tokens: int = 150  # assumption: an AIME/MATH problem + chat template; the cap is 1,024
    length_sigma: float = 0.6  # assumption: lognormal spread of response lengths (σ of log length)
    max_rows: int = 512  # decode rows per GPU at most: the presets' rollout_batch (a ceiling)
    kv_cache_memory: float = 0.85  # the presets': share of the memory left for the engine's paged KV pool
    memory_reserve_gb: float = 6.0  # assumption: CUDA context, decode activations, logits, sampling buffers
    # the trainer's configuration that sets the passes per trained token (presets.py's values)
    mini_batches: int = _RECIPE["mini_batches"]  # optimizer steps per RL step
    kl: bool = _RECIPE["kl_coef"] > 0  # a reference forward per sequence
    recompute: str = _RECIPE["recompute"]  # none | selective | full | auto (recompute.py)
    recompute_budget_gb: float = _RECIPE["recompute_budget_gb"]  # auto: activation bytes per micro-batch
    microbatch_tokens: int = _RECIPE["max_tokens_per_microbatch"]  # tokens of the micro-batch the plan is made for
    old_logprobs_first_minibatch: bool = False  # the trainer's opt-in extra forward


@dataclass
class Efficiency:
    """Device-independent efficiencies and per-step costs, in A100 terms, with where each came from."""

    decode_fraction: float = 0.5  # of the decode roofline max(bytes/BW, FLOPs/peak)
    train_mfu: float = 0.40  # of dense bf16 peak, for every training and log-prob forward
    sync_s: float = 0.05  # A100 seconds per RL step per GPU for the trainer -> engine weight copy
    grading_per_s_per_gpu: float = 500.0  # responses graded per second per GPU's share of CPU cores
    sources: dict[str, str] = field(default_factory=lambda: {
        "decode_fraction": "assumption: CUDA-graph decode at half its roofline",
        "train_mfu": "assumption: 40% MFU, typical of packed FA2 training of a 1.5B model on A100",
        "sync_s": "assumption: 3.55 GB bf16 copy (~3.5 ms at A100 bandwidth) + FSDP gather and overhead",
        "grading_per_s_per_gpu": "assumption: the grading goal, 500 responses/s on 2 CPU cores per GPU",
    })


# -----------------------------------------------------------------------------
# response lengths


def response_lengths(mean: float, cap: int, count: int, sigma: float) -> np.ndarray:
    """`count` lengths: quantiles of a lognormal(μ, σ) capped at `cap`, μ chosen so that their
    mean is `mean` (to within integer rounding)."""
    if mean >= cap:
        return np.full(count, cap, dtype=np.int64)
    normal = statistics.NormalDist()
    z = np.array([normal.inv_cdf((i + 0.5) / count) for i in range(count)])

    def sample(mu: float) -> np.ndarray:
        return np.clip(np.exp(mu + sigma * z), 1.0, cap)

    lo, hi = 0.0, math.log(cap) + 4 * sigma  # the mean grows with μ: bisect
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sample(mid).mean() < mean else (lo, mid)
    return np.maximum(1, np.rint(sample(0.5 * (lo + hi)))).astype(np.int64)


def admission_order(lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed shuffle: requests arrive in no particular length order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return lengths[order]


# -----------------------------------------------------------------------------
# component costs


def decode_seconds(lengths, prompt: int, slots: int, shape: ModelShape, gpu: GPU, fraction: float) -> tuple[float, int]:
    """(seconds, decode steps) for one GPU to generate `lengths` (in admission order).

    Continuous batching over `slots` rows: a finished row is refilled by the next request. Each
    response token is one decode step of its row, at a context of prompt + tokens so far (the KV
    entries the step reads). Step time = max(bytes / BW, FLOPs / peak) / fraction with
    bytes = weights + KV of every live row's context and FLOPs = 2·N per row + 4·width·layers
    per context token (QKᵀ and PV).
    """
    pending = [int(n) for n in lengths][::-1]
    context: list[int] = []  # per live row: KV entries read at its next step
    remaining: list[int] = []
    seconds, steps = 0.0, 0
    bw, peak = gpu.bytes_per_s * fraction, gpu.flops * fraction
    attn_flops_per_key = 4.0 * shape.attn_width * shape.layers
    while pending or remaining:
        while pending and len(remaining) < slots:
            remaining.append(pending.pop())
            context.append(prompt)
        rows = len(remaining)
        run = min(remaining)  # steps until the next row finishes: the live set is fixed until then
        keys = sum(context) + rows * np.arange(run, dtype=np.float64)  # Σ context at each step
        step_bytes = shape.weight_bytes + shape.kv_bytes_per_token * keys
        step_flops = 2.0 * shape.matmul_params * rows + attn_flops_per_key * keys
        seconds += float(np.maximum(step_bytes / bw, step_flops / peak).sum())
        steps += run
        context = [c + run for c in context]
        remaining = [r - run for r in remaining]
        live = [i for i, r in enumerate(remaining) if r > 0]
        context, remaining = [context[i] for i in live], [remaining[i] for i in live]
    return seconds, steps


def decode_slots(stage: Stage, workload: Workload, shape: ModelShape, requests_per_gpu: int) -> int:
    """Rows decoded at once on one GPU: the rollout_batch ceiling, the requests it has, and what the
    paged KV pool of the memory plan holds at the mean row size (blocks are taken as rows grow)."""
    return max(1, min(workload.max_rows, requests_per_gpu, kv_memory_plan(stage, workload, shape)["rows_at_mean"]))


def train_flops(lengths, shape: ModelShape, passes: float) -> float:
    """FLOPs of `passes` forward-equivalents over sequences of the given lengths."""
    return passes * sum(shape.forward_flops(float(n)) for n in lengths)


def stage_passes(lengths, workload: Workload, model: Qwen2Config = QWEN2_1_5B_CONFIG) -> dict[str, float]:
    """Forward-pass equivalents per trained token, by kind, for sequences of the given lengths:
    what the trainer (train.py) runs with the workload's configuration. The recomputation plan is
    the trainer's for a full micro-batch of `microbatch_tokens` tokens of sequences of the mean
    length, with bf16 activations."""
    lengths = [int(n) for n in lengths]
    mean = max(1, round(sum(lengths) / len(lengths)))
    per_microbatch = [mean] * max(1, workload.microbatch_tokens // mean)
    plan = plan_recompute(model, workload.recompute, per_microbatch, workload.recompute_budget_gb * 1e9, 2)
    old = 1.0 if workload.old_logprobs_first_minibatch else (workload.mini_batches - 1) / workload.mini_batches
    return {
        "update": 3.0,
        "ref": 1.0 if workload.kl else 0.0,
        "old": old,
        "recompute": recompute_flops(model, lengths, plan) / forward_flops(model, lengths),
        "plan_none": float(plan.count("none")),
        "plan_selective": float(plan.count("selective")),
        "plan_full": float(plan.count("full")),
    }


def total_passes(passes: dict[str, float]) -> float:
    return sum(passes[k] for k in ("update", "ref", "old", "recompute"))


@dataclass
class StageCost:
    stage: str
    steps: int
    gpus: int
    slots: int
    rollout_wall_s: float  # per step
    decode_steps: int  # per step, per GPU
    truncated_fraction: float
    gpu_hours: dict[str, float]  # component -> GPU-hours for the whole stage
    passes: dict[str, float] = field(default_factory=dict)  # training forward-equivalents per token (stage_passes)

    @property
    def total(self) -> float:
        return sum(self.gpu_hours.values())


def stage_cost(stage: Stage, workload: Workload, eff: Efficiency, shape: ModelShape = QWEN2_1_5B,
               gpu: GPU = A100) -> StageCost:
    responses = stage.prompts * stage.samples
    per_gpu = math.ceil(responses / stage.gpus)
    lengths = response_lengths(stage.mean_response, stage.max_response, per_gpu, workload.length_sigma)
    slots = decode_slots(stage, workload, shape, per_gpu)
    wall, decode_steps = decode_seconds(admission_order(lengths), workload.prompt_tokens, slots, shape, gpu,
                                        eff.decode_fraction)
    # one prefill per prompt, shared by its samples: a compute-bound forward
    prefill = (per_gpu / stage.samples) * shape.forward_flops(workload.prompt_tokens) / (gpu.flops * eff.train_mfu)
    all_lengths = response_lengths(stage.mean_response, stage.max_response, responses, workload.length_sigma)
    passes = stage_passes(all_lengths + workload.prompt_tokens, workload)
    flops = train_flops(all_lengths + workload.prompt_tokens, shape, total_passes(passes))
    per_step = {
        "rollout": stage.gpus * (wall + prefill),
        "train": flops / (gpu.flops * eff.train_mfu),
        "sync": stage.gpus * eff.sync_s,
        "grading": responses / eff.grading_per_s_per_gpu,
    }
    return StageCost(
        stage=stage.name, steps=stage.steps, gpus=stage.gpus, slots=slots, rollout_wall_s=wall + prefill,
        decode_steps=decode_steps, truncated_fraction=float((lengths >= stage.max_response).mean()),
        gpu_hours={k: v * stage.steps / 3600.0 for k, v in per_step.items()},
        passes=passes,
    )


def project(workload: Workload, eff: Efficiency, shape: ModelShape = QWEN2_1_5B, gpu: GPU = A100) -> list[StageCost]:
    return [stage_cost(s, workload, eff, shape, gpu) for s in workload.stages]


# -----------------------------------------------------------------------------
# measured rates -> efficiencies


def decode_roofline_fraction(bytes_per_s: float, flops_per_s: float, gpu: GPU) -> float:
    """Fraction of the roofline reached: the model's minimum time over the measured time."""
    return max(bytes_per_s / gpu.bytes_per_s, flops_per_s / gpu.flops)


def decode_rates(tokens_per_s: float, rows: int, mean_context: float, shape: ModelShape = QWEN2_1_5B) -> tuple[float, float]:
    """(bytes/s, FLOPs/s) that the decode model needs at a measured steady rate: `rows` rows per
    step at `mean_context` KV entries per row."""
    step_s = rows / tokens_per_s
    step_bytes = shape.weight_bytes + shape.kv_bytes_per_token * rows * mean_context
    step_flops = 2.0 * shape.matmul_params * rows + 4.0 * shape.attn_width * shape.layers * rows * mean_context
    return step_bytes / step_s, step_flops / step_s


def measured_device(report: dict) -> GPU:
    """The spec of the device a report was measured on; an unknown device (a CPU dry run) is
    described by its own measured ceilings."""
    name = report.get("device", {}).get("name", "unknown")
    spec = gpu_by_name(name)
    if spec is not None:
        return spec
    ceilings = report.get("ceilings", {})
    tflops, gbps = ceilings.get("matmul_bf16_TFLOPs"), ceilings.get("copy_GBps")
    if not tflops or not gbps:
        raise ValueError(f"device {name!r} has no spec here and the report has no measured ceilings")
    return GPU(f"{name} (measured ceilings)", float(tflops), float(gbps))


def efficiency_from_rates(report: dict, base: Efficiency | None = None) -> Efficiency:
    """Efficiencies from a rates report (the JSON of bench/gpu_check.py, or one built from flags):

        {"device": {"name": ...}, "ceilings": {"copy_GBps": ..., "matmul_bf16_TFLOPs": ...},
         "rates": {"decode": {"bytes_per_s", "flops_per_s"},   # or tokens_per_s, rows, mean_context
                   "train": {"flops_per_s"},                    # or tokens_per_s, seq_len
                   "sync": {"seconds"},
                   "grading": {"responses_per_s", "processes"}}}

    Every rate is optional; a missing one keeps its assumption.
    """
    eff = replace(base or Efficiency())
    eff.sources = dict(eff.sources)
    rates = report.get("rates", {})
    dev = measured_device(report)
    where = f"measured on {dev.name}"
    if "decode" in rates:
        d = rates["decode"]
        if "bytes_per_s" not in d:
            d = dict(d, **dict(zip(("bytes_per_s", "flops_per_s"),
                                   decode_rates(d["tokens_per_s"], d["rows"], d["mean_context"]))))
        eff.decode_fraction = decode_roofline_fraction(d["bytes_per_s"], d["flops_per_s"], dev)
        bound = "bandwidth" if d["bytes_per_s"] / dev.bytes_per_s >= d["flops_per_s"] / dev.flops else "compute"
        eff.sources["decode_fraction"] = (
            f"{where}: {d['bytes_per_s'] / 1e9:,.0f} GB/s, {d['flops_per_s'] / 1e12:,.1f} TFLOP/s of needed traffic "
            f"= {eff.decode_fraction:.1%} of its roofline ({bound}-bound there)")
    if "train" in rates:
        t = rates["train"]
        flops_per_s = t.get("flops_per_s")
        if flops_per_s is None:
            flops_per_s = t["tokens_per_s"] * 3 * QWEN2_1_5B.forward_flops(t["seq_len"]) / t["seq_len"]
        eff.train_mfu = flops_per_s / dev.flops
        eff.sources["train_mfu"] = f"{where}: {flops_per_s / 1e12:,.1f} TFLOP/s = {eff.train_mfu:.1%} MFU"
    if "sync" in rates:
        s = rates["sync"]["seconds"]
        eff.sync_s = s * dev.bytes_per_s / A100.bytes_per_s
        eff.sources["sync_s"] = (f"{where}: {s * 1e3:,.1f} ms x bandwidth ratio "
                                 f"{dev.hbm_gbps:,.0f}/{A100.hbm_gbps:,.0f}")
    if "grading" in rates:
        g = rates["grading"]
        per_process = g["responses_per_s"] / g.get("processes", 1)
        cores = 2  # assumption: CPU cores per GPU for grading (16-core hosts have 8 GPUs)
        eff.grading_per_s_per_gpu = per_process * cores
        eff.sources["grading_per_s_per_gpu"] = (f"measured: {per_process:,.0f} responses/s per process "
                                                f"x {cores} cores per GPU (assumption)")
    return eff


# -----------------------------------------------------------------------------
# report


def kv_memory_plan(stage: Stage, workload: Workload, shape: ModelShape, gpu_memory_gb: float = 80.0) -> dict:
    """The built-in engine's paged KV budget on one GPU next to the training state (engine/budget.py's
    rule: kv_cache_memory x the memory left), and the rows it holds at this stage's lengths.

    Resident while the engine is awake: the FSDP-sharded fp32 master weights, gradients and AdamW
    moments (16 B/param / GPUs), the sharded fp32 frozen reference (4 B/param / GPUs), the engine's
    full bf16 copy (weight_bytes) and a reserve for the CUDA context, decode activations, logits and
    sampling buffers (assumption). A static cache reserves every row at the cap; a paged one holds
    rows at their live length (here the mean)."""
    params = shape.weight_bytes / 2  # bf16 weights incl. the head: ~1.78B for Qwen2-1.5B
    training = 20.0 * params / stage.gpus
    left = gpu_memory_gb * 1e9 - training - shape.weight_bytes - workload.memory_reserve_gb * 1e9
    pool = max(0.0, workload.kv_cache_memory * left)
    tokens = int(pool // shape.kv_bytes_per_token)
    return {"training_gb": training / 1e9, "engine_weights_gb": shape.weight_bytes / 1e9, "pool_gb": pool / 1e9,
            "pool_tokens": tokens, "rows_at_mean": tokens // int(workload.prompt_tokens + stage.mean_response),
            "rows_at_cap": tokens // (workload.prompt_tokens + stage.max_response)}


def format_memory_plan(workload: Workload, shape: ModelShape) -> str:
    lines = [f"KV memory plan per A100-80GB (built-in engine, kv_cache_memory {workload.kv_cache_memory:g}, "
             f"{workload.memory_reserve_gb:g} GB reserve assumed; decode runs min(rows at the mean, "
             f"{workload.max_rows}) rows):"]
    for stage in workload.stages:
        m = kv_memory_plan(stage, workload, shape)
        lines.append(f"  {stage.name:>4}: training state {m['training_gb']:.1f} GB (FSDP over {stage.gpus}) + engine "
                     f"{m['engine_weights_gb']:.2f} GB -> KV pool {m['pool_gb']:.1f} GB = {m['pool_tokens']:,} tokens: "
                     f"{m['rows_at_mean']} rows at the mean length (a static cache at the cap: {m['rows_at_cap']})")
    return "\n".join(lines)


def format_report(costs: list[StageCost], workload: Workload, eff: Efficiency, report: dict | None,
                  shape: ModelShape = QWEN2_1_5B) -> str:
    lines = ["Projected GPU-hours of the DeepScaleR-1.5B run (3 stages), in A100-SXM4-80GB hours", ""]
    lines.append("Workload (recipe.md §1.1; 'assumed' = not in the reference notes):")
    for s in workload.stages:
        lines.append(f"  {s.name:>4}: {s.steps:>5} steps x {s.prompts} prompts x {s.samples:>2} samples on "
                     f"{s.gpus:>2} GPUs, max response {s.max_response:,}, mean response {s.mean_response:,.0f}")
    lines.append("  mean response: 8K from the notes (5.5K -> 3.5K); 16K and 24K assumed")
    lines.append(f"  prompt {workload.prompt_tokens} tokens (assumed); lengths lognormal sigma {workload.length_sigma} "
                 f"(assumed), capped at the stage max; decode rows from the paged KV memory plan (below), "
                 f"<= {workload.max_rows} rows")
    lines.append(f"  trainer: {workload.mini_batches} mini-batches, KL {'on' if workload.kl else 'off'}, recompute "
                 f"{workload.recompute}" + (f" (budget {workload.recompute_budget_gb:g} GB per {workload.microbatch_tokens:,}-token "
                                             "micro-batch)" if workload.recompute == "auto" else "")
                 + (", old log-probs for every mini-batch" if workload.old_logprobs_first_minibatch else ""))
    lines.append(f"  model: {shape.matmul_params / 1e9:.3f}B matmul params, {shape.weight_bytes / 1e9:.2f} GB bf16 "
                 f"weights, {shape.kv_bytes_per_token:,} B of KV per token")
    lines.append("")
    lines.append("Conversion to A100 (spec sheets, dense bf16):")
    for g in GPUS.values():
        lines.append(f"  {g.name:<16} {g.bf16_tflops:>6,.0f} TFLOP/s  {g.hbm_gbps:>6,.0f} GB/s   time on A100 = time x "
                     f"{g.bf16_tflops / A100.bf16_tflops:.2f} (compute-bound: training, prefill) or "
                     f"x {g.hbm_gbps / A100.hbm_gbps:.2f} (bandwidth-bound: decode, weight copy)")
    lines.append("  i.e. a measured fraction of peak (decode roofline, MFU) is assumed to carry over to an A100")
    if report is not None:
        lines.append(f"  rates measured on: {measured_device(report).name}")
    lines.append("")
    lines.append("Efficiencies used:")
    for name in ("decode_fraction", "train_mfu", "sync_s", "grading_per_s_per_gpu"):
        lines.append(f"  {name:<22} {getattr(eff, name):>10.4g}   {eff.sources[name]}")
    lines.append("")
    parts = list(costs[0].gpu_hours)
    header = f"  {'stage':>5} {'slots':>5} {'trunc':>6} {'rollout/step':>12} " + " ".join(f"{p:>9}" for p in parts)
    lines.append("A100-hours per stage:")
    lines.append(header + f" {'total':>9}")
    for c in costs:
        lines.append(f"  {c.stage:>5} {c.slots:>5} {c.truncated_fraction:>6.1%} {c.rollout_wall_s:>11.1f}s "
                     + " ".join(f"{c.gpu_hours[p]:>9,.1f}" for p in parts) + f" {c.total:>9,.1f}")
    totals = {p: sum(c.gpu_hours[p] for c in costs) for p in parts}
    total = sum(totals.values())
    lines.append(f"  {'all':>5} {'':>5} {'':>6} {'':>12} " + " ".join(f"{totals[p]:>9,.1f}" for p in parts)
                 + f" {total:>9,.1f}")
    lines.append("")
    lines.append("Training passes per trained token (forward-equivalents; train = passes x forward FLOPs / (peak x MFU)):")
    lines.append(f"  {'stage':>5} {'fwd+bwd':>7} {'ref':>5} {'old':>5} {'recompute':>9} {'total':>6}   recompute plan (layers)")
    for c in costs:
        p = c.passes
        lines.append(f"  {c.stage:>5} {p['update']:>7.2f} {p['ref']:>5.2f} {p['old']:>5.2f} {p['recompute']:>9.2f} "
                     f"{total_passes(p):>6.2f}   {p['plan_none']:.0f} none, {p['plan_selective']:.0f} selective, "
                     f"{p['plan_full']:.0f} full   ({c.gpu_hours['train']:,.1f} A100-h)")
    lines.append("")
    lines.append(f"Projected: {total:,.0f} A100-hours   published DeepScaleR: {PUBLISHED_A100_HOURS:,.0f} "
                 f"({PUBLISHED_A100_HOURS / total:.1f}x)   goal: <= {GOAL_A100_HOURS:,.0f} "
                 f"({'met' if total <= GOAL_A100_HOURS else 'not met'})")
    return "\n".join(lines)


def plot(costs: list[StageCost], path: Path) -> bool:
    """Stacked bars of A100-hours per stage and component; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [c.stage for c in costs] + ["total"]
    bottom = np.zeros(len(names))
    for part in costs[0].gpu_hours:
        values = np.array([c.gpu_hours[part] for c in costs] + [sum(c.gpu_hours[part] for c in costs)])
        ax.bar(names, values, bottom=bottom, label=part)
        bottom += values
    ax.axhline(PUBLISHED_A100_HOURS, color="k", linestyle="--", linewidth=1, label="published DeepScaleR")
    ax.axhline(GOAL_A100_HOURS, color="g", linestyle=":", linewidth=1, label="goal")
    ax.set_ylabel("A100-hours")
    ax.set_title(f"DeepScaleR-1.5B, projected: {bottom[-1]:,.0f} A100-hours")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# command line


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsr_fast.cost", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("measured rates (each overrides its assumption)")
    g.add_argument("--rates", type=Path, help="JSON of measured rates (bench/gpu_check.py writes one)")
    g.add_argument("--measured-on", default=None, help="GPU of the flag rates below: A100, H100, H200 (default A100)")
    g.add_argument("--decode-tokens-per-s", type=float, help="steady decode tokens/s of one GPU ...")
    g.add_argument("--decode-rows", type=int, default=256, help="... at this many rows per step")
    g.add_argument("--decode-context", type=float, default=400.0, help="... and this mean KV context per row")
    g.add_argument("--train-tokens-per-s", type=float, help="fwd+bwd tokens/s of one GPU ...")
    g.add_argument("--train-seq-len", type=float, default=4096.0, help="... on sequences of this length")
    g.add_argument("--sync-s", type=float, help="weight-sync seconds per step on --measured-on")
    g.add_argument("--grading-per-s", type=float, help="responses graded per second by one process")
    g = p.add_argument_group("efficiencies (device-independent; override rates)")
    g.add_argument("--decode-fraction", type=float)
    g.add_argument("--train-mfu", type=float)
    g = p.add_argument_group("workload")
    g.add_argument("--steps", type=_floats, help="steps per stage, e.g. 1040,480,240")
    g.add_argument("--gpus", type=_floats, help="GPUs per stage, e.g. 8,32,32")
    g.add_argument("--mean-response", type=_floats, help="mean response tokens per stage, e.g. 4500,5500,7000")
    g.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens)
    g.add_argument("--length-sigma", type=float, default=Workload.length_sigma)
    g.add_argument("--max-rows", type=int, default=Workload.max_rows)
    g.add_argument("--kv-cache-memory", type=float, default=Workload.kv_cache_memory,
                   help="share of the memory left next to the training state for the paged KV pool")
    g.add_argument("--memory-reserve-gb", type=float, default=Workload.memory_reserve_gb)
    g = p.add_argument_group("trainer configuration (default: the presets, presets.py)")
    g.add_argument("--mini-batches", type=int, default=Workload.mini_batches, help="optimizer steps per RL step")
    g.add_argument("--no-kl", action="store_true", help="no KL term: no reference forward")
    g.add_argument("--recompute", choices=("none", "selective", "full", "auto"), default=Workload.recompute,
                   help="activation recomputation (DeepScaleR: full)")
    g.add_argument("--recompute-budget-gb", type=float, default=Workload.recompute_budget_gb)
    g.add_argument("--microbatch-tokens", type=int, default=Workload.microbatch_tokens)
    g.add_argument("--old-logprobs-first-minibatch", action="store_true",
                   help="old log-probs recomputed for every mini-batch (one more forward for the first)")
    g = p.add_argument_group("output")
    g.add_argument("--plot", type=Path, default=Path("runs/cost/breakdown.png"), help="PNG of the per-stage breakdown")
    g.add_argument("--json-out", type=Path, help="write the projection as JSON")
    return p


def _flag_report(args) -> dict | None:
    rates = {}
    if args.decode_tokens_per_s:
        rates["decode"] = {"tokens_per_s": args.decode_tokens_per_s, "rows": args.decode_rows,
                           "mean_context": args.decode_context}
    if args.train_tokens_per_s:
        rates["train"] = {"tokens_per_s": args.train_tokens_per_s, "seq_len": args.train_seq_len}
    if args.sync_s is not None:
        rates["sync"] = {"seconds": args.sync_s}
    if args.grading_per_s:
        rates["grading"] = {"responses_per_s": args.grading_per_s, "processes": 1}
    if not rates:
        return None
    return {"device": {"name": args.measured_on or "A100"}, "rates": rates}


def _per_stage(values, stages, name, cast):
    if values is None:
        return stages
    if len(values) != len(stages):
        raise SystemExit(f"--{name}: need {len(stages)} comma-separated values, got {len(values)}")
    key = name.replace("-", "_")
    return tuple(replace(s, **{key: cast(v)}) for s, v in zip(stages, values))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    stages = DEEPSCALER
    stages = _per_stage(args.steps, stages, "steps", int)
    stages = _per_stage(args.gpus, stages, "gpus", int)
    stages = _per_stage(args.mean_response, stages, "mean-response", float)
    workload = Workload(stages=stages, prompt_tokens=args.prompt_tokens, length_sigma=args.length_sigma,
                        max_rows=args.max_rows, kv_cache_memory=args.kv_cache_memory,
                        memory_reserve_gb=args.memory_reserve_gb, mini_batches=args.mini_batches,
                        kl=not args.no_kl, recompute=args.recompute, recompute_budget_gb=args.recompute_budget_gb,
                        microbatch_tokens=args.microbatch_tokens,
                        old_logprobs_first_minibatch=args.old_logprobs_first_minibatch)
    eff, report = Efficiency(), None
    if args.rates is not None:
        report = json.loads(args.rates.read_text())
        eff = efficiency_from_rates(report, eff)
    flag_report = _flag_report(args)
    if flag_report is not None:
        if args.rates is not None and args.measured_on is None:
            flag_report["device"] = report.get("device", flag_report["device"])
            flag_report["ceilings"] = report.get("ceilings", {})
        eff = efficiency_from_rates(flag_report, eff)
        report = report or flag_report
    if args.decode_fraction is not None:
        eff.decode_fraction, eff.sources["decode_fraction"] = args.decode_fraction, "given (--decode-fraction)"
    if args.train_mfu is not None:
        eff.train_mfu, eff.sources["train_mfu"] = args.train_mfu, "given (--train-mfu)"
    costs = project(workload, eff)
    print(format_report(costs, workload, eff, report))
    print(format_memory_plan(workload, QWEN2_1_5B))
    if plot(costs, args.plot):
        print(f"plot: {args.plot}")
    else:
        print("plot: skipped (matplotlib is not installed; pip install matplotlib)")
    result = {
        "a100_hours": sum(c.total for c in costs),
        "published_a100_hours": PUBLISHED_A100_HOURS,
        "goal_a100_hours": GOAL_A100_HOURS,
        "stages": [asdict(c) | {"total": c.total} for c in costs],
        "efficiency": asdict(eff),
        "workload": asdict(workload),
    }
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
