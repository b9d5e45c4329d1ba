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
per-layer plan with the least recomputed work whose activations fit a byte budget.

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
        "gate_up": 2 * tokens * 2 * h * i,
        "down_proj": 2 * tokens * i * h,
    }


# The parts of a layer's forward that backward runs again, per mode. Never down_proj: nothing in
# backward needs its output, and torch's checkpoint stops recomputing once it has every saved
# tensor it needs (early stop, the default).
RECOMPUTED_PARTS = {"none": (), "selective": ("qkv", "gate_up"), "full": ("qkv", "attention", "o_proj", "gate_up")}


def forward_flops(cfg: Qwen2Config, lengths: Sequence[int]) -> float:
    """FLOPs of one forward of the model (every layer and the lm_head) over the given sequences."""
    return cfg.num_hidden_layers * sum(layer_flops(cfg, lengths).values()) + 2.0 * sum(lengths) * cfg.hidden_size * cfg.vocab_size


def recompute_flops(cfg: Qwen2Config, lengths: Sequence[int], plan: Sequence[str]) -> float:
    """FLOPs that backward spends re-running forward parts, for a per-layer plan."""
    parts = layer_flops(cfg, lengths)
    return sum(parts[p] for mode in plan for p in RECOMPUTED_PARTS[mode])


def plan_recompute(cfg: Qwen2Config, mode: str, lengths: Sequence[int], budget_bytes: float, dtype_bytes: int) -> list[str]:
    """Per-layer modes for one micro-batch of sequences of the given lengths.

    A fixed mode applies to every layer. `auto` takes, among the plans with a none, b selective
    and the other layers full, the one that recomputes the fewest FLOPs and whose estimated
    activation bytes fit budget_bytes (ties: the fewest bytes); if none fits, all full. Which
    layers get which mode does not change either count, so the first a are none, the next b
    selective."""
    layers = cfg.num_hidden_layers
    if mode in RECOMPUTE_MODES:
        return [mode] * layers
    if mode != AUTO:
        raise ValueError(f"recompute mode {mode!r}: use one of {', '.join(RECOMPUTE_MODES + (AUTO,))}")
    tokens, parts = sum(lengths), layer_flops(cfg, lengths)
    flops = {m: sum(parts[p] for p in RECOMPUTED_PARTS[m]) for m in RECOMPUTE_MODES}  # per layer
    best, best_key = ["full"] * layers, None
    for a in range(layers + 1):
        for b in range(layers - a + 1):
            plan = ["none"] * a + ["selective"] * b + ["full"] * (layers - a - b)
            nbytes = activation_bytes(cfg, plan, tokens, dtype_bytes)
            key = (b * flops["selective"] + (layers - a - b) * flops["full"], nbytes)
            if nbytes <= budget_bytes and (best_key is None or key < best_key):
                best, best_key = plan, key
    return best


def recompute_fraction(cfg: Qwen2Config, lengths: Sequence[int], plan: Sequence[str]) -> float:
    """Recomputed FLOPs in forward-pass equivalents (1.0 = one more whole-model forward)."""
    return recompute_flops(cfg, lengths, plan) / forward_flops(cfg, lengths)
