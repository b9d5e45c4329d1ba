"""The engine's copy of the policy, with fused projections, and the in-place weight sync.

The copy is a plain `Qwen2` (same parameter names as the trainer's, so the sync is a copy by
name), except that q/k/v and gate/up are row slices of one fused tensor per layer: the decode
step then runs one GEMM for q/k/v and one for gate/up instead of five, while the sync still writes
`q_proj.weight` etc. by name, into the fused storage. Storage never moves after construction:
captured CUDA graphs read the weights through these pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed import full_tensor
from ..model import Qwen2, Qwen2Config


@dataclass
class FusedLayer:
    qkv_weight: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    qkv_bias: torch.Tensor  # [(Hq + 2 Hkv) D]
    gate_up_weight: torch.Tensor  # [2 I, H]


def _fuse(modules: list[nn.Module], attr: str, dtype, device) -> torch.Tensor:
    """One tensor whose row slices become `attr` of each module (as parameters, no grad)."""
    parts = [getattr(m, attr) for m in modules]
    fused = torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:], dtype=dtype, device=device)
    start = 0
    for m, p in zip(modules, parts):
        setattr(m, attr, nn.Parameter(fused[start : start + p.shape[0]], requires_grad=False))
        start += p.shape[0]
    return fused


def build_fused_copy(config: Qwen2Config, dtype: torch.dtype, device) -> tuple[Qwen2, list[FusedLayer]]:
    """An uninitialised Qwen2 on `device` whose q/k/v and gate/up weights are views of fused
    tensors; sync_weights fills it."""
    with torch.device("meta"):
        model = Qwen2(config)
    fused = []
    for block in model.layers:
        a, m = block.self_attn, block.mlp
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        fused.append(FusedLayer(_fuse(qkv, "weight", dtype, device), _fuse(qkv, "bias", dtype, device),
                                _fuse([m.gate_proj, m.up_proj], "weight", dtype, device)))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), fused


@torch.no_grad()
def copy_weights_in_place(dst: nn.Module, src: nn.Module) -> None:
    """Copy src's weights into dst by name; assert every parameter is written and no storage
    moved (a captured CUDA graph holds these pointers)."""
    ours, theirs = dst.state_dict(), src.state_dict()
    if ours.keys() != theirs.keys():
        raise RuntimeError(f"sync_weights: parameter names differ: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    pointers = {name: t.data_ptr() for name, t in ours.items()}
    for name, target in ours.items():
        source = full_tensor(theirs[name])  # an FSDP2 shard is gathered (every rank syncs in the same order)
        if source.shape != target.shape:
            raise RuntimeError(f"sync_weights: {name} has shape {tuple(source.shape)}, engine has {tuple(target.shape)}")
        target.copy_(source)
    moved = [n for n, t in dst.state_dict().items() if t.data_ptr() != pointers[n]]
    assert not moved, f"sync_weights moved parameter storage: {moved[:5]}"
