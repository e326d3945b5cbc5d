# `make test` builds .venv from scratch when needed, installs everything and runs lint + the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: venv test lint golden demo train-toy eval-toy clean

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python scripts/demo.py

train-toy: venv
	bash scripts/train_toy.sh

eval-toy: venv
	$(BIN)/python scripts/eval_toy.py --narratives 100 --roundtrip

golden: venv
	$(BIN)/python scripts/check_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
