# Set-up is part of every target: a fresh machine needs only `make test` or `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch pinned: 2.13.0 is the CPU wheel these machines carry; an unpinned torch pulls a CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[serve,test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

demo: $(STAMP)
	$(BIN)/python -m dsv2.train.demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
