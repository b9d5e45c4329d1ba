"""dsr_fast.kernels: the fused logprob/entropy head and the GRPO loss, for any trainer.

Needs only torch (and triton for the CUDA kernels); importing it loads nothing else from dsr_fast
and no transformers, vllm, sympy, tqdm or numpy of its own. Reference: docs/kernels.md.

    fused_logprobs(hidden [T, H], weight [V, H], labels [T]) -> (logprobs [T], entropy [T] | None)
    grpo_loss(logprobs, old_logprobs, advantages, cu_seqlens, ...) -> (loss, metrics)
    hf_logprobs(model, input_ids, labels, ...) -> per-token logprobs of a transformers causal LM
    vocab_parallel_logprobs(hidden, weight_shard, labels, vocab_start=..., group=...) -> as fused_logprobs,
        for an lm_head split along the vocabulary across a process group
    paged_decode_attention(q [B, Hq, D], k_cache, v_cache, block_table, seq_lens) -> [B, Hq, D],
        one decode token per sequence over a paged KV pool (Triton on CUDA, torch on CPU)
    resolve_backend(backend, device) -> the backend ("triton" | "torch") a call with backend=... runs

Every public function takes keyword-only options after its tensors; `backend=` ("auto", "triton",
"torch") picks the implementation explicitly where there is more than one.

__version__ is the version of this API, not of the dsr_fast package: the major number changes
when a name in __all__ changes its signature, semantics or numerics incompatibly; the minor when
something is added.
"""

from .grpo_loss import grpo_loss
from .hf_logprobs import hf_logprobs, next_token_labels
from .logprobs import BACKENDS, fused_logprobs, resolve_backend
from .paged_attention import paged_decode_attention
from .vocab_parallel import vocab_parallel_logprobs

__version__ = "1.1.0"

__all__ = [
    "BACKENDS",
    "__version__",
    "fused_logprobs",
    "grpo_loss",
    "hf_logprobs",
    "next_token_labels",
    "paged_decode_attention",
    "resolve_backend",
    "vocab_parallel_logprobs",
]
