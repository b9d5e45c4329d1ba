"""dsr_fast.kernels: fused logprob/entropy head and GRPO loss.

Needs only torch (and triton on CUDA); importable without the rest of dsr_fast.
"""

from .grpo_loss import grpo_loss
from .logprobs import fused_logprobs

__all__ = ["fused_logprobs", "grpo_loss"]
