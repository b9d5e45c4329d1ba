"""pytest-benchmark suites: `make bench` (CPU sizes) or `pytest bench --real-sizes` on a GPU.

Each suite times our path and its naive baseline in the same run, so the ratio means something
on any machine; absolute times mean something only on a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_addoption(parser):
    parser.addoption("--real-sizes", action="store_true", help="DeepScaleR sizes (T=24,576, H=1536, V=151,936): GPU only")


@pytest.fixture
def real_sizes(request) -> bool:
    real = request.config.getoption("--real-sizes")
    if real and not torch.cuda.is_available():
        pytest.skip("--real-sizes needs a CUDA device")
    return real


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
