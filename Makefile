# Every install step lives here: CI runs `make test` on a clean clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: setup demo test bench fuzz lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/fitcli inspect sample_models/mlp.safetensors --arch sample_models/models.py:mlp
	$(BIN)/fitcli score sample_models/mlp.safetensors --arch sample_models/models.py:mlp \
		--data sample_models/mlp_data.safetensors --top 8
	$(BIN)/fitcli ablate sample_models/mlp.safetensors --arch sample_models/models.py:mlp \
		--data sample_models/mlp_data.safetensors --layer fc2 --top 8

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/score.py --model cnn --batches 12
	$(BIN)/python bench/score.py --model mlp --batches 60 --batch-size 1024
	$(BIN)/python bench/ablation.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/blocks.py

fuzz: setup
	FITCLI_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider -q -s -W ignore::UserWarning

lint: setup
	$(BIN)/ruff check fitcli tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
