"""`import dsr_fast.kernels` needs only torch and triton.

A fresh interpreter hides, with a meta-path finder placed before every other finder, the rest of
dsr_fast's dependencies (transformers, vllm, sympy, tqdm, safetensors, pyarrow, pylatexenc), numpy
(torch imports it only if present) and every dsr_fast module outside dsr_fast.kernels; then it
imports the kernels, runs a tiny forward and backward through every public function, and reports
what was imported and what it tried to import. Run from a temporary directory, so that the package
is found the way a user finds it (installed), not through the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HIDDEN_PACKAGES = ["transformers", "vllm", "sympy", "tqdm", "safetensors", "pyarrow", "pylatexenc", "numpy"]

SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, json, os, sys, tempfile, warnings

    HIDDEN = set(json.loads(sys.argv[1]))
    attempts = []

    def is_hidden(name):
        if name.split(".")[0] in HIDDEN:
            return True
        return name.startswith("dsr_fast.") and not (name == "dsr_fast.kernels" or name.startswith("dsr_fast.kernels."))

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if is_hidden(name):
                # The module whose code asked: the first frame outside the import machinery.
                frame = sys._getframe(1)
                while frame.f_code.co_filename.startswith("<frozen") or frame.f_globals.get("__name__") == "__main__":
                    frame = frame.f_back
                attempts.append([name, frame.f_globals.get("__name__", "?")])
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the isolation test)", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

    import torch
    import torch.distributed as dist
    import dsr_fast.kernels as K

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 10, 0])
    logprobs, entropy = K.fused_logprobs(hidden, weight, labels, temperature=0.7, return_entropy=True)
    loss, metrics = K.grpo_loss(
        logprobs, logprobs.detach() + 0.1, torch.randn(6), torch.tensor([0, 2, 6]),
        entropy=entropy, entropy_coef=0.01, loss_mask=labels != -100,
    )
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 8)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return (self.embed(input_ids),)

    class DuckLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = Body(), torch.nn.Linear(8, 11, bias=False)

    lm = DuckLM()
    hf_lp, _ = K.hf_logprobs(lm, torch.tensor([[1, 2, 3, 4]]))
    hf_lp.sum().backward()
    assert lm.lm_head.weight.grad is not None

    dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "init"), rank=0, world_size=1)
    vp_lp, _ = K.vocab_parallel_logprobs(hidden, weight, labels, vocab_start=0, temperature=0.7)
    vp_lp.sum().backward()
    dist.destroy_process_group()

    print(json.dumps({
        "version": K.__version__,
        "all": sorted(K.__all__),
        "missing": [name for name in K.__all__ if not hasattr(K, name)],
        "loaded_hidden": sorted(m for m in sys.modules if is_hidden(m)),
        "dsr_fast_modules": sorted(m for m in sys.modules if m == "dsr_fast" or m.startswith("dsr_fast.")),
        "attempts": sorted(set(map(tuple, attempts))),
        "backend": K.resolve_backend("auto", hidden.device),
    }))
    """
)


def test_kernels_import_with_only_torch_and_triton(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(HIDDEN_PACKAGES)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded_hidden"] == []
    assert report["missing"] == []
    assert {"fused_logprobs", "grpo_loss", "hf_logprobs", "vocab_parallel_logprobs", "resolve_backend"} <= set(report["all"])
    assert report["version"].count(".") == 2
    # Nothing of dsr_fast beyond the package root and its kernels.
    assert all(m in ("dsr_fast", "dsr_fast.kernels") or m.startswith("dsr_fast.kernels.") for m in report["dsr_fast_modules"])
    # The kernels did not even try: the hidden imports that were attempted all came from torch's
    # own optional imports (numpy, tqdm, and sympy under torch.distributed.tensor, which
    # fused_logprobs probes for FSDP2 weights and skips when it cannot be imported).
    attempts = [tuple(a) for a in report["attempts"]]
    assert attempts, "the finder saw nothing: it is not hiding anything"
    assert all(importer.split(".")[0] == "torch" for _, importer in attempts), attempts
    assert not {name.split(".")[0] for name, _ in attempts} & {"transformers", "vllm", "safetensors", "pyarrow", "pylatexenc"}
    assert report["backend"] == ("triton" if _cuda() else "torch")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
