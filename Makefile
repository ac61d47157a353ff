# Every target builds .venv from the project's own files first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint,fast,bench]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf .demo-state
	$(BIN)/dialerd run --simulate -c examples/demo.yaml < examples/requests.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dialerd tests bench
	$(BIN)/ruff format --check dialerd tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
