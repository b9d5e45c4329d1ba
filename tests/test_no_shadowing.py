"""The repository root never shadows an installed package.

Everything runs from the root (`python -m`, `python -m pytest`, `torchrun -m`), which puts the root
first on sys.path. transformers >= 5.25 imports Hugging Face's `kernels` whenever a model class
loads; a regular package named like an installed one at the root would be found first and break
it. Our kernels live in kernels/dsr_fast/kernels, so kernels/ is at most a namespace portion, which
loses to any installed regular package.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_root_folder_is_a_regular_package_named_like_an_installed_one():
    root_packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert root_packages == {"dsr_fast"}, f"regular packages at the repository root: {sorted(root_packages)}"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_from_the_root_finds_hugging_faces_package():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (it comes with transformers >= 5.25)")
    script = (
        "import json, kernels, dsr_fast.kernels as ours\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
        "print(json.dumps({'kernels': kernels.__file__, 'ours': ours.__file__,"
        " 'has_cuda_properties': hasattr(kernels, 'CUDAProperties')}))\n"
    )
    # cwd is the root, as for `python -c` / `python -m` there: sys.path[0] is the root.
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    installed_at = Path(dist.locate_file("kernels")).resolve()
    assert Path(found["kernels"]).resolve().parent == installed_at, found
    assert found["has_cuda_properties"], found
    assert Path(found["ours"]).resolve() == ROOT / "kernels" / "dsr_fast" / "kernels" / "__init__.py"
