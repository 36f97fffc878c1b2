# Set-up on a fresh machine is `make demo` or `make test`: each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JETSTREAM := google-jetstream==0.2.2

.PHONY: demo test test-fast venv clean-venv bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,serve,tpu-aot]'
	$(BIN)/pip install --quiet --no-deps $(JETSTREAM)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowrl-jax demo --out runs/demo

# --max-worker-restart=0: pytest-xdist 3.8 with --dist loadfile can hang for good after a worker
# crash (pytest-xdist#784, #1378); stopping at once names the test instead. MALLOC_ARENA_MAX=2
# keeps glibc from holding one arena per XLA thread in each worker.
test: $(STAMP)
	MALLOC_ARENA_MAX=2 $(BIN)/python -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 --durations=30 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/flowrl-jax bench all

clean-venv:
	rm -rf $(VENV)
