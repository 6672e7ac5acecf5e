# The README's Quickstart: `make demo` and `make test`. Both create .venv and install into it.
# Without an NVIDIA GPU, torch is installed as the CPU build first (a bare `torch` requirement
# would pull a multi-GB CUDA build); override with `make TORCH=... demo`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mimood-installed

.PHONY: demo test install bundle clean-venv

demo: $(STAMP)
	$(BIN)/mimood-demo -o mimood_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the bundled model (mimood/assets/model): about 1.5 h on 2 CPU cores, resumable; needs ../shared/data
bundle: $(STAMP)
	PY=$(BIN)/python scripts/bundle.sh

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
