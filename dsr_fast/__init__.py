"""dsr_fast: a small, fast GRPO trainer for reasoning LLMs (DeepScaleR-1.5B recipe)."""

__version__ = "0.1.0"
