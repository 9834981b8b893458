# Newcomers: `make demo` (train on the bundled images, generate a picture) and `make test`.
PYTHON ?= python3
VENV := .venv
VENV_FLAX := .venv-flax
PIP_QUIET ?= -q
CLIP_VOCAB_WHEEL := clip-anytorch==2.6.0
DEMO_DIR ?= demo-output

.PHONY: setup setup-flax demo test test-torch test-flax bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements.txt -r requirements-dev.txt
	# Only the CLIP BPE vocabulary file is used from this wheel; its dependencies are not needed.
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps $(CLIP_VOCAB_WHEEL)
	touch $@

# The Flax trainer's environment: the last diffusers/transformers releases with Flax models.
setup-flax: $(VENV_FLAX)/.installed
$(VENV_FLAX)/.installed: requirements_flax.txt
	$(PYTHON) -m venv $(VENV_FLAX)
	$(VENV_FLAX)/bin/pip install $(PIP_QUIET) -r requirements_flax.txt
	$(VENV_FLAX)/bin/pip install $(PIP_QUIET) --no-deps $(CLIP_VOCAB_WHEEL)
	touch $@

demo: setup
	$(VENV)/bin/python tools/demo.py --output_dir $(DEMO_DIR)

.PHONY: lint
# Static checks (ruff.toml): unused and undefined names, pycodestyle errors, import order.
lint: setup
	$(VENV)/bin/ruff check .

test: test-torch test-flax

test-torch: setup
	$(VENV)/bin/python -m pytest -q --durations=20 tests --ignore=tests/flax

# Flax tests run in .venv-flax; one of them checks the outputs load in the PyTorch env (.venv).
test-flax: setup setup-flax
	$(VENV_FLAX)/bin/python -m pytest -q --durations=20 tests/flax

# Benchmarks (not part of `make test`): speed/memory ~60 min, up to ~19 GB RAM (Flax sd15 rows), ~4 GB disk for the
# sd15 pipeline; then the learning curves (bench-learning below, ~1 h on 2 cores).
# Narrow it with e.g. `make bench BENCH_ARGS="--only tiny"` or BENCH_ARGS="--skip flax".
BENCH_ARGS ?=
bench: setup setup-flax
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/learning_curves.py $(LEARNING_ARGS)

# Only the learning curves (bench/learning_curves.py: held-out concepts on the shapes model, both trainers,
# every training-control setting; ~1 h on 2 cores). Narrow with e.g. LEARNING_ARGS="--only default --seeds 1".
LEARNING_ARGS ?=
.PHONY: bench-learning
bench-learning: setup setup-flax
	$(VENV)/bin/python bench/learning_curves.py $(LEARNING_ARGS)

clean:
	rm -rf $(VENV) $(VENV_FLAX) $(DEMO_DIR) build
