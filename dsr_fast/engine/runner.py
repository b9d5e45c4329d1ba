"""The model over the paged KV pool: packed prefill and one-token decode.

Pools: k_pool, v_pool [layers, num_blocks, block_size, Hkv, D] (the kernel's layout; the CPU gather
path keeps [layers, Hkv, num_blocks, block_size, D]); token t of a sequence lives at
slot blocks[t // block_size] * block_size + t % block_size of every layer. Both passes write the
new tokens' K/V there before attending.

- prefill: the new sequences packed end to end (no padding), varlen attention over their own
  tokens (a prefill always starts a sequence from position 0), logits of each last token only.
- decode: one token per sequence. CUDA: the paged decode attention kernel, reading each row's
  live length and block table from device tensors, so the step can be captured in a CUDA graph
  (graphs.py) and replayed for any lengths. CPU: each KV head's live blocks gathered (one
  index_select per pool per layer, into reused buffers) into [Hkv * B, S, D], S the longest live
  length in the batch, and two batched GEMMs per (KV head, sequence) for its group of query
  heads. The gathered K/V stay staged for the next step: while the batch (same sequences, same
  block-table width) does not change, a step only appends its token there; a prefill, a block copy
  or any change of the batch gathers again. The pool stays the K/V's home and the budget's unit.
  The work follows the live tokens, never the pool's capacity.

Both run the layer code in this file (`_layer`), not Qwen2.forward: it uses the fused q/k/v and
gate/up weights when the engine has its own copy (weights.py), one rope over q and k together and
a rope table: fewer, larger ops per decode step than the trainer's module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import Qwen2, apply_rope, rope_cos_sin
from ..packing import pack, varlen_attention
from .blocks import blocks_for
from .graphs import DecodeGraphs
from .scheduler import Sequence
from .weights import FusedLayer

ATTENTION = ("auto", "kernel", "gather")


def gather_decode_attention(q, k_pool, v_pool, flat_table, past, scale: float, buffers=None, gathered=False):
    """q [B, Hq, D]; head-major pools [Hkv, num_blocks, bs, D]; flat_table [B * W] block ids;
    past [B, W * bs] True past the row's length. buffers: two [Hkv, B * W, bs * D] tensors to
    gather into (a fresh multi-MB tensor per gather costs page faults on a CPU); gathered: they
    already hold these blocks (the staged K/V of the previous step plus this step's token), so
    nothing is copied. Scores and softmax in fp32."""
    B, Hq, D = q.shape
    Hkv, num_blocks = k_pool.shape[:2]
    k_buf, v_buf = buffers if buffers is not None else (None, None)
    if gathered:
        keys, values = k_buf.view(Hkv * B, -1, D), v_buf.view(Hkv * B, -1, D)
    else:
        keys = torch.index_select(k_pool.view(Hkv, num_blocks, -1), 1, flat_table, out=k_buf).view(Hkv * B, -1, D)  # [Hkv*B, S, D]
        values = torch.index_select(v_pool.view(Hkv, num_blocks, -1), 1, flat_table, out=v_buf).view(Hkv * B, -1, D)
    q = q.view(B, Hkv, Hq // Hkv, D).transpose(0, 1).reshape(Hkv * B, Hq // Hkv, D)
    # q·k accumulated and kept in fp32 whatever the pool's dtype: bf16 scores would move the
    # engine's logprobs, the importance ratio's baseline, away from the trainer's.
    if q.dtype != torch.float32:
        q, keys = q.float(), keys.float()
    scores = torch.bmm(q, keys.transpose(1, 2)).mul_(scale).view(Hkv, B, Hq // Hkv, -1)
    probs = scores.masked_fill_(past[None, :, None, :], float("-inf")).softmax(-1).view(Hkv * B, Hq // Hkv, -1)
    out = torch.bmm(probs.to(values.dtype), values).view(Hkv, B, Hq // Hkv, D)
    return out.transpose(0, 1).reshape(B, Hq, D)


class ModelRunner:
    def __init__(self, model: Qwen2, fused: list[FusedLayer] | None, *, num_blocks: int, block_size: int,
                 max_seqs: int, device: torch.device, cuda_graph: bool, attention: str = "auto"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        cfg = model.config
        self.model, self.fused, self.device = model, fused, device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.max_blocks_per_seq = blocks_for(cfg.max_position_embeddings, block_size)
        self.use_kernel = attention == "kernel" or (attention == "auto" and device.type == "cuda")
        # the kernel reads [num_blocks, block_size, Hkv, D] per layer; the CPU gather wants one
        # slab per KV head, so that a gather yields each head's keys contiguous (no transposes)
        self.block_axis = 1 if self.use_kernel else 2
        if self.use_kernel:
            shape = (cfg.num_hidden_layers, num_blocks, block_size, self.n_kv, self.head_dim)
        else:
            shape = (cfg.num_hidden_layers, self.n_kv, num_blocks, block_size, self.head_dim)
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=device)
        positions = torch.arange(cfg.max_position_embeddings, device=device)
        self.rope_cos, self.rope_sin = rope_cos_sin(positions, self.head_dim, cfg.rope_theta, self.dtype)
        self._buffers = [torch.empty(0, dtype=self.dtype, device=device)] * 2
        # CPU gather path: the last decode step's batch (its sequences, lengths and width), whose
        # gathered K/V stay in _buffers, one slab per layer. The next step over the same sequences
        # at the same width only appends its token there, instead of gathering every live block
        # of every layer again; a prefill, a block copy, a changed batch or width gathers anew.
        self._staged: tuple | None = None
        self._reuse_staged = False
        self.graphs = None
        if cuda_graph and device.type == "cuda":
            self.graphs = DecodeGraphs(self.decode_step, max_seqs, self.max_blocks_per_seq, device)

    @property
    def pool_bytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    # ---- the layers

    def _norm(self, norm, x):
        if x.dtype == torch.float32:  # one op; same math as RMSNorm.forward in fp32
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
        return norm(x)

    def _layer(self, i: int, x, cos, sin, attend):
        block = self.model.layers[i]
        N, Hq, Hkv, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        h = self._norm(block.input_layernorm, x)
        if self.fused is not None:
            qkv = F.linear(h, self.fused[i].qkv_weight, self.fused[i].qkv_bias)
        else:
            a = block.self_attn
            qkv = torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], -1)
        qkv = qkv.view(N, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, : Hq + Hkv], cos, sin)
        y = attend(i, qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :])  # [N, Hq, D]
        x = x + F.linear(y.reshape(N, Hq * D), block.self_attn.o_proj.weight)
        h = self._norm(block.post_attention_layernorm, x)
        m = block.mlp
        if self.fused is not None:
            gate, up = F.linear(h, self.fused[i].gate_up_weight).chunk(2, -1)
        else:
            gate, up = m.gate_proj(h), m.up_proj(h)
        return x + F.linear(F.silu(gate) * up, m.down_proj.weight)

    def _write(self, i: int, slots, k, v) -> None:
        if self.use_kernel:
            self.k_pool[i].view(-1, self.n_kv, self.head_dim).index_copy_(0, slots, k)
            self.v_pool[i].view(-1, self.n_kv, self.head_dim).index_copy_(0, slots, v)
        else:
            self.k_pool[i].view(self.n_kv, -1, self.head_dim).index_copy_(1, slots, k.transpose(0, 1))
            self.v_pool[i].view(self.n_kv, -1, self.head_dim).index_copy_(1, slots, v.transpose(0, 1))

    def _logits(self, hidden):
        return self.model.lm_head(self._norm(self.model.norm, hidden)).float()

    # ---- prefill

    def slots_of(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        blocks = torch.tensor(seq.blocks[start // self.block_size : blocks_for(stop, self.block_size)], dtype=torch.long)
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        offset = start - start // self.block_size * self.block_size
        return slots[offset : offset + stop - start]

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), V] fp32 after each sequence's whole token list, its K/V written."""
        self._staged = None
        batch = pack([s.tokens for s in seqs]).to(self.device)
        slots = torch.cat([self.slots_of(s, 0, len(s.tokens)) for s in seqs]).to(self.device)
        cos, sin = self.rope_cos[batch.position_ids], self.rope_sin[batch.position_ids]

        def attend(i, q, k, v):
            self._write(i, slots, k, v)
            # q, k, v are head slices of one tensor: the varlen backends want them dense
            return varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), batch.cu_seqlens, batch.max_seqlen, causal=True)

        x = self.model.embed_tokens(batch.input_ids)
        for i in range(len(self.model.layers)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x[batch.cu_seqlens[1:].long() - 1])

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks in every layer (a prompt's partial last block to a new sample)."""
        self._staged = None
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        if self.use_kernel:
            self.k_pool[:, d] = self.k_pool[:, s]
            self.v_pool[:, d] = self.v_pool[:, s]
        else:
            self.k_pool[:, :, d] = self.k_pool[:, :, s]
            self.v_pool[:, :, d] = self.v_pool[:, :, s]

    # ---- decode

    def _gather_buffer(self, which: int, blocks: int) -> torch.Tensor:
        """A [layers, Hkv, blocks, block_size * D] view of a grow-only buffer (CPU gather path)."""
        L, row = len(self.model.layers), self.block_size * self.head_dim
        numel = L * self.n_kv * blocks * row
        buf = self._buffers[which]
        if buf.numel() < numel:
            buf = self._buffers[which] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel].view(L, self.n_kv, blocks, row)

    def decode_step(self, input_ids: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """input_ids [B], seq_lens [B] int32 (with this token; 0 = padding row), block_table
        [B, W] int32 -> logits [B, V] fp32. No host sync on the kernel path (CUDA graphs)."""
        B, bs = input_ids.shape[0], self.block_size
        reuse, self._reuse_staged = self._reuse_staged, False
        self._staged = None  # decode() records the batch after the step; a direct call leaves nothing staged
        positions = (seq_lens.long() - 1).clamp_(min=0)
        slots = block_table.gather(1, (positions // bs)[:, None])[:, 0].long() * bs + positions % bs
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        scale = self.head_dim**-0.5
        if self.use_kernel:
            from ..kernels.paged_attention import paged_decode_attention

            def attend(i, q, k, v):
                self._write(i, slots, k, v)
                # splits from shapes only: under a graph, the bucket's static table fixes them
                return paged_decode_attention(q, self.k_pool[i], self.v_pool[i], block_table, seq_lens, scale=scale)
        else:
            S = block_table.shape[1] * bs
            # a padding row (length 0) attends to its own slot in the null block: a NaN there
            # would reach every row whose last block is partial, through 0 * NaN in probs @ V
            past = torch.arange(S, device=self.device)[None, :] >= seq_lens.clamp(min=1)[:, None]  # [B, S]
            flat = block_table.reshape(-1).long()
            k_buf, v_buf = (self._gather_buffer(w, flat.numel()) for w in (0, 1))
            if reuse:  # this token's slot in each row of the staged [Hkv, B * S, D] K/V
                staged = torch.arange(B, device=self.device) * S + positions

            def attend(i, q, k, v):
                self._write(i, slots, k, v)
                if reuse:
                    k_buf[i].view(self.n_kv, -1, self.head_dim).index_copy_(1, staged, k.transpose(0, 1))
                    v_buf[i].view(self.n_kv, -1, self.head_dim).index_copy_(1, staged, v.transpose(0, 1))
                return gather_decode_attention(q, self.k_pool[i], self.v_pool[i], flat, past, scale,
                                               (k_buf[i], v_buf[i]), gathered=reuse)

        x = self.model.embed_tokens(input_ids)
        for i in range(len(self.model.layers)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x)

    def decode(self, seqs: list[Sequence], table: torch.Tensor) -> torch.Tensor:
        """Logits [len(seqs), V] for each sequence's last token (not yet in the cache).

        table: the scheduler's host block table [rows, max_blocks]; only the columns the
        longest live sequence uses are sent, so a step's work follows live tokens."""
        lens = [s.num_cached + 1 for s in seqs]
        width = blocks_for(max(lens), self.block_size)
        rows = torch.tensor([s.row for s in seqs])
        block_table = table[:, :width].index_select(0, rows).to(self.device, non_blocking=True)
        input_ids = torch.tensor([s.tokens[-1] for s in seqs]).to(self.device, non_blocking=True)
        seq_lens = torch.tensor(lens, dtype=torch.int32).to(self.device, non_blocking=True)
        if self.graphs is not None:
            return self.graphs.run(input_ids, seq_lens, block_table)
        if self.use_kernel:
            return self.decode_step(input_ids, seq_lens, block_table)
        last = self._staged
        self._reuse_staged = (last is not None and last[1] == width and len(last[0]) == len(seqs)
                              and all(a is b and n == m + 1 for a, b, n, m in zip(seqs, last[0], lens, last[2])))
        logits = self.decode_step(input_ids, seq_lens, block_table)
        self._staged = (list(seqs), width, lens)
        return logits
