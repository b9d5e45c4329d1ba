"""Shared test setup.

- Where the DeepScaleR data lives: beside the repository (../shared/data), never copied into it;
  a clone elsewhere can point DSR_FAST_SHARED_DATA at it. Tests that need it skip when absent.
- Without a GPU, Triton kernels run under the interpreter. TRITON_INTERPRET must be set before
  any kernel module is imported, so it is set here, before test modules are collected.
"""

import os
from pathlib import Path

import torch

SHARED_DATA = Path(os.environ.get("DSR_FAST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when this is unset; 1 keeps the fusion behaviour of 3.6, the GPU machine's.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
