# The two commands a newcomer runs: `make demo` and `make test`. Both create or refresh the
# project's virtual environment first (scripts/setup.sh; a no-op when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-unit test-integration test-e2e test-slow bench clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/rayllm run pipelines/rlhf_tiny.py $(ARGS)

test: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q --timeout=900 --durations=10 $(ARGS)

test-unit: setup
	$(PY) -m pytest -q -m unit $(ARGS)

test-integration: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m integration --timeout=900 $(ARGS)

test-e2e: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "e2e and not slow" --timeout=900 $(ARGS)

test-slow: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m slow --timeout=2400 $(ARGS)

bench: setup
	RAY_AUTH_MODE=disabled $(PY) bench/train_step.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
