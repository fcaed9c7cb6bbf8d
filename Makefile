# Every install step lives here: CI runs `make test` on a clean clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CORE    := $(VENV)/.installed-core
TORCH   := torch==2.13.0

.PHONY: setup demo test bench fuzz lint clean browser

# the venv and the pinned PyTorch, shared by both installs below
define new_venv
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
endef

# make test, lint, bench, fuzz: the package with the dev extra (pytest, transformers, Torch-Pruning...)
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(new_venv)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(CORE)

# make demo: the package and what the README's quick start runs (its HTML page: the html extra)
$(CORE): pyproject.toml Makefile
	$(new_venv)
	$(BIN)/pip install -q -e '.[html]'
	touch $(CORE)

# the commands of the README's quick start on the sample MLP; `. .venv/bin/activate` then puts
# fitcli on PATH for the rest of the README
demo: $(CORE)
	$(BIN)/fitcli inspect sample_models/mlp.safetensors --arch sample_models/models.py:mlp
	$(BIN)/fitcli score sample_models/mlp.safetensors --arch sample_models/models.py:mlp \
		--data sample_models/mlp_data.safetensors --top 5
	$(BIN)/fitcli ablate sample_models/mlp.safetensors --arch sample_models/models.py:mlp \
		--data sample_models/mlp_data.safetensors --layer fc2 --top 5
	@echo
	@echo "fitcli is installed in .venv/: run  . .venv/bin/activate  to put it on PATH in this shell"

# headless Chromium for tests/test_html.py (CI runs as root with Debian's packages); where it
# cannot be installed the test says so and checks the pages by parsing instead
BROWSERS ?= chromium-headless-shell chromium chromium-browser
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1; } || \
		echo "note: could not install chromium-headless-shell: tests/test_html.py checks the pages by parsing only"; \
	else echo "note: no Chromium, and not root with apt-get: tests/test_html.py checks the pages by parsing only"; fi

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pip install -q -e '.[bench]' torch==2.13.0  # torch pinned in the same command: gguf must not move it
	$(BIN)/python bench/score.py --model cnn --batches 12
	$(BIN)/python bench/score.py --model mlp --batches 60 --batch-size 1024
	$(BIN)/python bench/ablation.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/blocks.py
	$(BIN)/python bench/html_size.py
	$(BIN)/python bench/tracker.py --threads 1 --rounds 9 --steps 3
	$(BIN)/python bench/tracker.py --threads 1 --rounds 9 --steps 3 --metric taylor
	$(BIN)/python bench/tracker.py --rounds 9 --steps 3
	$(BIN)/python bench/distributed.py --threads 1 --repeat 2
	$(BIN)/python bench/offload.py --arch opt
	$(BIN)/python bench/offload.py
	$(BIN)/python bench/offload.py --sets default --untied --batches 1 --batch-size 8 --tokens 32
	$(BIN)/python bench/llm.py --real --batches 4 --threads 1

fuzz: setup
	FITCLI_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider -q -s -W ignore::UserWarning

lint: setup
	$(BIN)/ruff check fitcli tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
