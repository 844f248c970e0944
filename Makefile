# make run   set up .venv and start the chat app on http://127.0.0.1:7860
# make test  set up .venv and run the linter and every CPU test (GPU tests run through the device tool)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin

.PHONY: run test lint bench-knowledge

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: pip then takes the local CPU build instead of a multi-GB CUDA one.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m assistant serve

lint: $(BIN)/.installed
	$(BIN)/ruff check .

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu" -q

bench-knowledge: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.retrieval_quality
