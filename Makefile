# `make demo`: create .venv if missing, install, run the embedded CPU default.
# `make demo-real`: the same install, then a real chat model (SmolLM2-135M-Instruct) end to end on the CPU.
# `make test`: the same install, then the linter (ruff) and the default test suite (slow tests: `make test-slow`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-real test test-slow lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lisa demo

demo-real: $(STAMP)
	$(BIN)/lisa demo --real

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
