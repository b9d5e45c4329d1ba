"""A minimal Qwen2 decoder that runs natively on packed tokens.

Same math and parameter names as transformers' `Qwen2ForCausalLM` (so HF checkpoints load and
save with no conversion): RMSNorm, rotary embeddings with the config's theta, grouped-query
attention with q/k/v biases, SwiGLU MLP, tied or untied lm_head.

Two ways in:
- `forward(input_ids[T], position_ids[T], cu_seqlens[B+1], max_seqlen)` over a packed batch
  returns the final hidden states [T, H]. The lm_head is NOT applied: the fused logprob kernel
  (dsr_fast.kernels.fused_logprobs) takes hidden states and `lm_head.weight` and never builds
  the [T, V] logits. Given a KVCache and the cache row of each token, the same call is the
  prefill of generation.
- `decode(input_ids[B], positions[B], cache)` runs one new token per cache row.

Shapes: T tokens, B sequences, H hidden, V vocab, Hq/Hkv query/key-value heads, D head dim.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import InputError
from .kernels import fused_logprobs
from .packing import varlen_attention

# -----------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype: the order HF Qwen2 uses (one fused op)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [N, D] for the given positions (non-interleaved halves, as HF Qwen2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [N, heads, D], cos/sin [N, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


RECOMPUTE_MODES = ("none", "selective", "full")

# attend(q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D], layer_idx) -> [N, Hq, D]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: "Qwen2Config", layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x, cos, sin):  # -> q [N, Hq, D], k, v [N, Hkv, D], rotated
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(N, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y):  # y [N, Hq, D] -> [N, H]
        return self.o_proj(y.reshape(y.shape[0], self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, attend: AttendFn):
        q, k, v = self.qkv(x, cos, sin)
        return self.out(attend(q, k, v, self.layer_idx))


class MLP(nn.Module):
    def __init__(self, cfg: "Qwen2Config"):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: "Qwen2Config", layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.recompute = "none"  # what backward recomputes: none | selective | full (RECOMPUTE_MODES)

    def forward(self, x, cos, sin, attend: AttendFn):
        if self.recompute == "selective" and torch.is_grad_enabled():
            return self._forward_selective(x, cos, sin, attend)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_selective(self, x, cos, sin, attend: AttendFn):
        """Same math as forward; backward keeps only what is dear to recompute and cheap to store.

        Kept: the attention core's inputs and outputs (q, k, v, the output and the varlen kernel's
        log-sum-exp, saved by the kernel itself), so backward never reruns the O(L^2) attention;
        o_proj saves the attention output, which is kept anyway, so it is not rerun either.
        Recomputed in backward: the input norm + q/k/v projections + rope, and the second norm +
        MLP (by far the largest activations: four [T, intermediate] tensors; down_proj itself is
        never rerun, checkpoint stops once it has what backward needs). Bytes and FLOPs per mode
        are in recompute.py."""
        q, k, v = checkpoint(self._normed_qkv, x, cos, sin, use_reentrant=False)
        x = x + self.self_attn.out(attend(q, k, v, self.self_attn.layer_idx))
        return x + checkpoint(self._normed_mlp, x, use_reentrant=False)

    def _normed_qkv(self, x, cos, sin):
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def _normed_mlp(self, x):
        return self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# KV cache for generation


class KVCache:
    """Static cache: k, v of shape [layers, rows, Hkv, max_len, D], allocated once.

    Every row is one sequence being generated; row r holds positions 0..len_r-1. Shapes never
    change between decode steps, so a decode step can be captured in a CUDA graph.
    """

    def __init__(self, cfg: "Qwen2Config", rows: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k, v, rows, positions):  # k, v [N, Hkv, D]; rows, positions [N]
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy whole rows (e.g. one prefilled prompt to the other samples of its group)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def attend(self, layer: int, q, positions, length: int | None = None):
        """Attention of each row's new token (q [B, Hq, D]) to its cached keys 0..positions[b].

        length: attend to the first `length` cache positions only (a bound on every position + 1
        that the caller knows without a sync); None = the whole cache, the static shape a CUDA
        graph needs. Two batched matmuls rather than SDPA: with one query per row SDPA's CPU
        kernel is ~2.6x slower. The scores q·k are accumulated and kept in fp32 (a bf16 matmul
        output would round each score by up to 2⁻⁹ of |q·k| before the softmax): the engine's
        logprobs are the importance ratio's baseline, so they must match the trainer's forward,
        whose attention kernels keep scores in fp32 too."""
        B, Hq, D = q.shape
        S = self.max_len if length is None else length
        keys, values = self.k[layer, :, :, :S], self.v[layer, :, :, :S]  # [B, Hkv, S, D]
        q = q.view(B, keys.shape[1], Hq // keys.shape[1], D)  # [B, Hkv, group, D]
        scores = _scores_fp32(q, keys) * D**-0.5  # [B, Hkv, group, S]
        visible = torch.arange(S, device=q.device)[None, :] <= positions[:, None]  # [B, S]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        return torch.matmul(scores.softmax(-1).to(values.dtype), values).view(B, Hq, D)


_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()  # bmm(..., out_dtype=) (torch >= 2.8)


def _scores_fp32(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, G, D] · keys [B, Hkv, S, D]ᵀ -> fp32 [B, Hkv, G, S], accumulated in fp32."""
    if q.dtype == torch.float32:
        return torch.matmul(q, keys.transpose(-1, -2))
    B, Hkv, G, D = q.shape
    if q.is_cuda and _BMM_OUT_DTYPE:
        # 16-bit operands stay on the tensor cores; cuBLAS writes its fp32 accumulator out as is
        # (no fp32 copy of the cache). keys is a view of the cache: B and Hkv merge without a copy.
        return torch.bmm(q.reshape(B * Hkv, G, D), keys.reshape(B * Hkv, -1, D).transpose(1, 2),
                         out_dtype=torch.float32).view(B, Hkv, G, -1)
    return torch.matmul(q.float(), keys.float().transpose(-1, -2))  # CPU has no 16-bit GEMM with fp32 output


# -----------------------------------------------------------------------------
# config


@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as HF
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Qwen2Config":
        """Read an HF `config.json`; every problem is an InputError naming the file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no config.json (is this a Hugging Face model directory?)") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise InputError(f"{path}: model_type is {model_type!r}; dsr_fast runs Qwen2 models only")
        if raw.get("hidden_act", "silu") != "silu":
            raise InputError(f"{path}: hidden_act {raw['hidden_act']!r} unsupported (Qwen2 uses 'silu')")
        if raw.get("use_sliding_window"):
            raise InputError(f"{path}: use_sliding_window=true is not supported")
        # transformers >= 5 nests theta in rope_parameters; older files have rope_theta at the top
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise InputError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if missing:
            raise InputError(f"{path}: missing required field(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise InputError(f"{path}: {e}") from None

    def to_hf_dict(self, dtype: torch.dtype) -> dict:
        d = asdict(self)
        d.update(
            model_type="qwen2",
            architectures=["Qwen2ForCausalLM"],
            hidden_act="silu",
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            use_cache=True,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            dtype=str(dtype).removeprefix("torch."),
        )
        return d


# -----------------------------------------------------------------------------
# the model


class Qwen2(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    # -------------------------------------------------------------------------
    # activation recomputation (per layer; the trainer plans it per micro-batch, see recompute.py)

    def set_recompute(self, plan: str | Sequence[str]) -> None:
        """What backward recomputes, for every layer (a mode) or per layer (a list of modes):
        none = store every activation; selective = keep attention (Block._forward_selective),
        recompute norms, projections and MLP; full = keep only each layer's input."""
        plan = [plan] * len(self.layers) if isinstance(plan, str) else list(plan)
        if len(plan) != len(self.layers) or any(m not in RECOMPUTE_MODES for m in plan):
            raise ValueError(f"recompute plan {plan!r}: need one of {', '.join(RECOMPUTE_MODES)} per layer "
                             f"({len(self.layers)} layers)")
        for block, mode in zip(self.layers, plan):
            block.recompute = mode

    @property
    def recompute_plan(self) -> list[str]:
        return [block.recompute for block in self.layers]

    @property
    def gradient_checkpointing(self) -> bool:  # the Hugging Face name: full recomputation everywhere
        return all(m == "full" for m in self.recompute_plan)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.set_recompute("full" if on else "none")

    def _body(self, x, position_ids, attend: AttendFn):
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        for block in self.layers:
            if block.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attend, use_reentrant=False)
            else:
                x = block(x, cos, sin, attend)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        cu_seqlens: torch.Tensor,  # [B+1]
        max_seqlen: int,
        cache: KVCache | None = None,
        cache_rows: torch.Tensor | None = None,  # [T]: the cache row each token is written to
        *,
        labels: torch.Tensor | None = None,  # [T]: return logprobs of these instead of hidden states
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        """Final hidden states [T, H] (after the last norm); with labels, (logprobs [T], entropy [T]
        or None) of the labels under softmax(lm_head(h) / temperature), by the fused kernel. The
        head runs inside forward so that an FSDP2-sharded head is unsharded when it is read."""
        assert input_ids.ndim == 1 and input_ids.shape == position_ids.shape, "packed input: 1-D ids and positions"

        def attend(q, k, v, layer):
            if cache is not None:
                cache.write(layer, k, v, cache_rows, position_ids)
            return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)

        hidden = self._body(self.embed_tokens(input_ids), position_ids, attend)
        if labels is None:
            return hidden
        weight = self.lm_head.weight
        kind = hidden.device.type
        if torch.is_autocast_enabled(kind):  # a custom kernel is outside autocast's op lists: cast as it would
            dtype = torch.get_autocast_dtype(kind)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return fused_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=return_entropy)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, length: int | None = None) -> torch.Tensor:
        """One token per cache row: input_ids [rows] at positions [rows] -> hidden [rows, H].

        length: optional bound on max(positions) + 1, to attend over that much of the cache."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)

        def attend(q, k, v, layer):
            cache.write(layer, k, v, rows, positions)
            return cache.attend(layer, q, positions, length)

        return self._body(self.embed_tokens(input_ids), positions, attend)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [N, V]: for sampling a few rows and for tests, never for training."""
        return self.lm_head(hidden)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> "Qwen2":
        """Load a local HF Qwen2 directory: config.json + model.safetensors or sharded *.safetensors."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise InputError(f"{model_dir}: model directory does not exist")
        cfg = Qwen2Config.from_json_file(model_dir / "config.json")
        state = _read_safetensors(model_dir)
        state = {_from_hf_key(k): v for k, v in state.items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: the embedding is the head
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise InputError(
                f"{model_dir}: checkpoint does not match config.json: "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, param in model.state_dict().items():
            if name in state and state[name].shape != param.shape:
                raise InputError(f"{model_dir}: {name} has shape {tuple(state[name].shape)}, config implies {tuple(param.shape)}")
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device)

    def save_pretrained(self, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 << 30):
        """Write config.json + safetensors (sharded with an index above max_shard_bytes)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, t in self.state_dict().items():
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # HF stores a tied head once, as the embedding
            t = t.detach()
            state[_to_hf_key(name)] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
        save_dtype = next(iter(state.values())).dtype
        (out_dir / "config.json").write_text(json.dumps(self.config.to_hf_dict(save_dtype), indent=2) + "\n")
        shards = _shard(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / fname, metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _to_hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _from_hf_key(name: str) -> str:
    return name.removeprefix("model.")


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index_path}: malformed safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no *.safetensors weights found")
    state = {}
    for fname in files:
        try:
            state.update(load_file(model_dir / fname))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise InputError(f"{model_dir / fname}: cannot read safetensors file ({e})") from None
    return state


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    return shards
