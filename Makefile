# The two set-up commands of the README: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed
STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the runtime dependencies (no torch: ~1 minute less on a fresh machine).
$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(BASE)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(BASE) $(STAMP)

demo: $(BASE)
	$(BIN)/seed-story demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout 3600

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
