"""Activation recomputation: what each mode stores and recomputes, and a per-layer plan that fits a
memory budget.

Per decoder layer the model offers three modes (model.py, `Qwen2.set_recompute`):

    none       store every activation backward needs; recompute nothing
    selective  store the layer input, q/k/v, the attention output and its log-sum-exp; recompute the
               input norm + q/k/v projections + rope and the second norm + MLP
    full       store the layer input; recompute the whole layer, attention included

Attention is what makes `selective` worth having: its cost grows with L^2 while what it needs to
skip recomputation (its inputs and outputs) grows with L, and the MLP is the opposite (four
[T, intermediate] tensors, cheap matmuls to redo). `plan_recompute` picks, per micro-batch, the
plan with the least recomputed work whose stored activations fit a byte budget.

Byte counts are per token and layer, for compute dtype `dtype_bytes` (RMSNorm normalises a fp32
copy of its input, so a norm stores 4 + 2 * dtype_bytes bytes per element). They are estimates of what
autograd saves (tests/test_recompute.py checks them against saved-tensor hooks); FLOPs count
matmuls and the attention core, 2 per multiply-add.
"""

from __future__ import annotations

from typing import Sequence

from .model import RECOMPUTE_MODES, Qwen2Config

AUTO = "auto"


def saved_bytes_per_token(cfg: Qwen2Config, mode: str, dtype_bytes: int) -> float:
    """Activation bytes one layer keeps for backward, per token, in `mode`."""
    h, i, d, hq, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    s = dtype_bytes
    attention = (hq + 2 * hkv) * d * s + hq * d * s + 4 * hq  # q, k, v, output, fp32 log-sum-exp
    if mode == "full":
        return h * s  # the layer input
    if mode == "selective":
        return 2 * h * s + attention  # the inputs of both recomputed regions, and attention
    if mode == "none":
        norm = (4 + 2 * s) * h + 4  # fp32 copy of the input, 1/rms, normalised, scaled by the weight
        mlp = 4 * i * s  # gate, silu(gate), up, their product
        return 2 * norm + attention + mlp
    raise ValueError(f"recompute mode {mode!r}: use one of {', '.join(RECOMPUTE_MODES)}")


def recompute_peak_bytes_per_token(cfg: Qwen2Config, plan: Sequence[str], dtype_bytes: int) -> float:
    """What one layer's recomputation holds at once in backward, on top of the stored activations:
    the whole layer (full) or the norm + MLP region (selective)."""
    if "full" in plan:
        return saved_bytes_per_token(cfg, "none", dtype_bytes)
    if "selective" in plan:
        return (4 + 2 * dtype_bytes) * cfg.hidden_size + 4 + 4 * cfg.intermediate_size * dtype_bytes
    return 0.0


def activation_bytes(cfg: Qwen2Config, plan: Sequence[str], num_tokens: int, dtype_bytes: int) -> float:
    """Estimated peak activation bytes of a forward + backward of the layer stack over num_tokens."""
    stored = sum(saved_bytes_per_token(cfg, m, dtype_bytes) for m in plan)
    return num_tokens * (stored + recompute_peak_bytes_per_token(cfg, plan, dtype_bytes))


def layer_flops(cfg: Qwen2Config, lengths: Sequence[int]) -> dict[str, float]:
    """Forward FLOPs of one decoder layer over packed sequences of the given lengths, by part."""
    h, i, d, hq, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    tokens = float(sum(lengths))
    pairs = float(sum(n * (n + 1) // 2 for n in lengths))  # causal (query, key) pairs
    return {
        "qkv": 2 * tokens * h * (hq + 2 * hkv) * d,
        "attention": 2 * 2 * hq * d * pairs,  # QK^T and PV
        "o_proj": 2 * tokens * hq * d * h,
        "mlp": 2 * tokens * 3 * h * i,
    }


# the parts of a layer's forward that backward runs again, per mode
RECOMPUTED_PARTS = {"none": (), "selective": ("qkv", "mlp"), "full": ("qkv", "attention", "o_proj", "mlp")}


def forward_flops(cfg: Qwen2Config, lengths: Sequence[int]) -> float:
    """FLOPs of one forward of the model (every layer and the lm_head) over the given sequences."""
    return cfg.num_hidden_layers * sum(layer_flops(cfg, lengths).values()) + 2.0 * sum(lengths) * cfg.hidden_size * cfg.vocab_size


def recompute_flops(cfg: Qwen2Config, lengths: Sequence[int], plan: Sequence[str]) -> float:
    """FLOPs that backward spends re-running forward parts, for a per-layer plan."""
    parts = layer_flops(cfg, lengths)
    return sum(parts[p] for mode in plan for p in RECOMPUTED_PARTS[mode])


def plan_recompute(cfg: Qwen2Config, mode: str, num_tokens: int, budget_bytes: float, dtype_bytes: int) -> list[str]:
    """Per-layer modes for one micro-batch of num_tokens tokens.

    A fixed mode applies to every layer. `auto` starts from full recomputation and moves layers,
    one at a time, to selective and then to none while the estimated activation bytes stay within
    budget_bytes: full -> selective first, because skipping attention's recomputation buys the most
    FLOPs per byte stored. If even full recomputation does not fit, the plan is all full."""
    layers = cfg.num_hidden_layers
    if mode in RECOMPUTE_MODES:
        return [mode] * layers
    if mode != AUTO:
        raise ValueError(f"recompute mode {mode!r}: use one of {', '.join(RECOMPUTE_MODES + (AUTO,))}")
    plan = ["full"] * layers
    for upgrade in ("selective", "none"):
        for j in range(layers):
            trial = plan[:j] + [upgrade] + plan[j + 1 :]
            if activation_bytes(cfg, trial, num_tokens, dtype_bytes) > budget_bytes:
                return plan
            plan = trial
    return plan


def recompute_fraction(cfg: Qwen2Config, lengths: Sequence[int], plan: Sequence[str]) -> float:
    """Recomputed FLOPs in forward-pass equivalents (1.0 = one more whole-model forward)."""
    return recompute_flops(cfg, lengths, plan) / forward_flops(cfg, lengths)
