# The two commands: `make train` (the embedded default run) and `make test` (the test suite).
# Both create or reuse .venv and install what is missing first.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# reinstall when the dependencies change
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test bench clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
