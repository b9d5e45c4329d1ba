"""Hugging Face drop-in: per-token logprobs (+ entropy) of a transformers causal LM, no logits.

A TRL-style trainer scores completions with

    logits = model(input_ids, attention_mask=mask).logits[:, :-1] / temperature     # [B, L-1, V]
    logps = selective_log_softmax(logits, input_ids[:, 1:])                         # [B, L-1]

which materialises [B, L, V] logits (14.9 GB in fp32 at 24,576 tokens and Qwen's 151,936-word
vocabulary), then a log-softmax of the same size, and both again in the backward. `hf_logprobs`
runs only the decoder body for the final hidden states, keeps the positions that have a label, and
gives them with the lm_head weight to `fused_logprobs`: same values and gradients, no logits.

Duck-typed: the model needs a decoder body (``get_decoder()``, else ``.model``) that returns the
final (normed) hidden states as ``last_hidden_state`` or its first output, and an lm_head
(``get_output_embeddings()``, else ``.lm_head``) with a [V, H] ``weight`` and an optional bias.
That covers Qwen2/2.5/3, Llama, Mistral and the other Llama-style models; transformers itself is
never imported here, so ``dsr_fast.kernels`` stays importable with only torch.

What happens between lm_head and the softmax is read from the config:
- ``logit_scale`` (Cohere), ``logits_scaling`` (Granite), ``lm_head_multiplier`` (Falcon-H1):
  a constant factor, folded into the temperature (z = x·scale/τ = x/(τ/scale)).
- ``final_logit_softcapping`` (Gemma 2/3): tanh soft-capping, not supported: NotImplementedError.
A model whose forward changes the logits in some other way is not detected; compare against
``model(...).logits`` once when adopting a new architecture.

Inputs, as transformers takes them:
- padded: input_ids [B, L] with attention_mask [B, L] (left or right padding);
- packed: input_ids [1, T] (or [T]) with no attention_mask and either position_ids [1, T]
  restarting at 0 for every sequence or cu_seqlens [B+1] (turned into such position_ids).
  transformers then builds a block-diagonal mask for eager/SDPA attention and varlen
  cu_seqlens for flash-attention from the position_ids (what DataCollatorWithFlattening relies on).
"""

from __future__ import annotations

from typing import Any

import torch

from .logprobs import fused_logprobs

# Config attributes of a constant factor applied to the logits: (name, True if logits are
# multiplied by it, False if divided).
_LOGIT_FACTORS = (("logit_scale", True), ("logits_scaling", False), ("lm_head_multiplier", True))
_SOFTCAPS = ("final_logit_softcapping",)


def _configs(model) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return [config] if text is None or text is config else [config, text]


def logit_scale(model) -> float:
    """The constant factor the model applies to lm_head's output before the softmax (1.0 if none).

    Raises NotImplementedError for soft-capped logits, which are not a constant factor.
    """
    configs = _configs(model)
    for config in configs:
        for name in _SOFTCAPS:
            if getattr(config, name, None) is not None:
                raise NotImplementedError(
                    f"the model's config sets {name}={getattr(config, name)!r}: tanh soft-capping of the "
                    "logits is not supported by the fused head (set it to None only if the model was "
                    "trained without it)"
                )
    scale = 1.0
    for name, multiplies in _LOGIT_FACTORS:
        # The first config that has the attribute is the one the model's forward reads.
        value = next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)
        if value is None:
            continue
        value = float(value)
        if not value > 0:
            raise NotImplementedError(f"the model's config sets {name}={value!r}: only a positive factor is supported")
        scale = scale * value if multiplies else scale / value
    return scale


def decoder_body(model) -> torch.nn.Module:
    """The module that maps input_ids to the final hidden states (everything but lm_head)."""
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if body is None or body is model:
        body = getattr(model, "model", None)
    if not isinstance(body, torch.nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no decoder body: expected get_decoder() or a .model attribute "
            "returning the final hidden states"
        )
    return body


def output_head(model) -> torch.nn.Module:
    """The lm_head module: .weight [V, H] (tied or not), optional .bias [V]."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no lm_head with a 2-D weight: expected get_output_embeddings() "
            "or a .lm_head Linear"
        )
    return head


def _sequence_starts(
    shape: torch.Size,
    device: torch.device,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """Bool [..., L]: True where a new sequence starts (packed inputs), False elsewhere."""
    starts = torch.zeros(shape, dtype=torch.bool, device=device)
    starts[..., 0] = True
    if cu_seqlens is not None:
        bounds = cu_seqlens[:-1].to(device=device, dtype=torch.long)
        flat = starts.view(-1)
        flat[bounds[bounds < flat.numel()]] = True
    elif position_ids is not None:
        # transformers' rule for packed rows: a sequence starts where the position does not go up by 1.
        positions = position_ids.expand(shape).to(device)
        starts[..., 1:] = positions[..., 1:] != positions[..., :-1] + 1
    return starts


def next_token_labels(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """labels[..., t] = input_ids[..., t + 1]: the token the distribution at position t predicts.

    ignore_index at the last position, where t or t + 1 is padding (attention_mask 0), and at the
    last token of every packed sequence (from cu_seqlens over the flattened tokens, or from
    position_ids that restart). Mask more (e.g. the prompt) by writing ignore_index into the result.
    """
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.long)
    labels[..., :-1] = input_ids[..., 1:]
    keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    keep[..., -1] = False
    if attention_mask is not None:
        attended = attention_mask.bool()
        keep[..., :-1] &= attended[..., :-1] & attended[..., 1:]
    if cu_seqlens is not None or position_ids is not None:
        starts = _sequence_starts(input_ids.shape, input_ids.device, position_ids, cu_seqlens)
        keep[..., :-1] &= ~starts[..., 1:]  # the next token begins another sequence
    return labels.masked_fill_(~keep, ignore_index)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[1, T] positions restarting at 0 at every cu_seqlens boundary."""
    bounds = cu_seqlens.to(dtype=torch.long)
    tokens = torch.arange(num_tokens, device=bounds.device)
    sequence = torch.searchsorted(bounds[1:], tokens, right=True)
    return (tokens - bounds[sequence]).unsqueeze(0)


def hf_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(labels) (and entropy) of a transformers causal LM, without its logits.

    Args:
        model: a transformers causal LM (see the module docstring for what is duck-typed).
        input_ids: [B, L] padded, or [1, T] / [T] packed token ids.
        labels: same shape as input_ids; labels[..., t] is the token scored by the distribution at
            position t (already shifted: TRL's input_ids[:, t + 1]), ignore_index where nothing is
            scored. Default: next_token_labels(input_ids, ...) from the other arguments.
        attention_mask: [B, L] 1 for real tokens, 0 for padding (padded inputs only).
        position_ids: passed to the model; for packed inputs they restart at 0 per sequence.
        cu_seqlens: [B+1] boundaries of packed sequences in the flattened tokens; sets
            position_ids when they are not given. Not with attention_mask.
        temperature: τ > 0; logits are divided by it (times any constant logit factor of the config).
        return_entropy: also return the per-token entropy of the tempered distribution.
        ignore_index: label value of unscored positions.
        backend: fused_logprobs' backend ("auto", "triton", "torch").
        model_kwargs: passed to the decoder body (use_cache defaults to False).

    Returns:
        (logprobs, entropy or None), fp32, shaped like labels, 0 where labels == ignore_index.
        Differentiable w.r.t. every parameter of the body and lm_head (tied or not).

    Only the scored positions go through the head: their indices are found with one host sync.
    """
    if cu_seqlens is not None and attention_mask is not None:
        raise ValueError(
            "cu_seqlens marks packed inputs, which transformers takes without an attention_mask; "
            "pass one or the other"
        )
    flat_input = input_ids.dim() == 1
    if flat_input:
        # transformers wants a batch dimension; outputs drop it again.
        input_ids, labels, attention_mask, position_ids = (
            None if t is None else t.unsqueeze(0) if t.dim() == 1 else t
            for t in (input_ids, labels, attention_mask, position_ids)
        )
    if cu_seqlens is not None and input_ids.shape[0] != 1:
        raise ValueError(f"packed inputs (cu_seqlens) need input_ids of shape [1, T], got {tuple(input_ids.shape)}")
    if labels is None:
        labels = next_token_labels(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
            ignore_index=ignore_index,
        )
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if cu_seqlens is not None and position_ids is None:
        position_ids = position_ids_from_cu_seqlens(cu_seqlens.to(input_ids.device), input_ids.shape[1])

    temperature = float(temperature) / logit_scale(model)
    head = output_head(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = decoder_body(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **model_kwargs
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]

    flat_labels = labels.reshape(-1)
    # Host sync: the number of scored positions sizes the head's work (prompt and padding skipped).
    scored = (flat_labels != ignore_index).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    logprobs, entropy = _head_logprobs(
        hidden, head, flat_labels.index_select(0, scored), temperature, return_entropy, ignore_index, backend
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(flat_labels.shape[0]).index_copy(0, scored, values)
        return full.view(labels.shape[1:] if flat_input else labels.shape)

    return scatter(logprobs), None if entropy is None else scatter(entropy)


def _head_logprobs(hidden, head, labels, temperature, return_entropy, ignore_index, backend):
    """fused_logprobs through lm_head, with its bias and the caller's autocast handled."""
    weight, bias = head.weight, getattr(head, "bias", None)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What nn.Linear does under autocast: both operands in the autocast dtype. The fused head
        # itself then runs with autocast off, so its own fp32 GEMMs stay fp32.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if bias is not None:
        if type(weight).__name__ == "DTensor":
            raise NotImplementedError("an lm_head with a bias is not supported when its weight is a DTensor")
        # x = h·Wᵀ + b = [h, 1]·[W, b]ᵀ: exact, at the cost of one [V, H+1] copy of the weight.
        weight = torch.cat([weight, bias.to(weight.dtype).unsqueeze(1)], dim=1)
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
    with torch.autocast(device_type, enabled=False):
        return fused_logprobs(
            hidden, weight, labels, temperature=temperature, return_entropy=return_entropy,
            ignore_index=ignore_index, backend=backend,
        )
