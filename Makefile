# One entry point for humans and CI. `make test` works on a fresh machine with python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint check schemas asyncapi demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

ASYNCAPI := tools/asyncapi
ASYNCAPI_STAMP := $(ASYNCAPI)/node_modules/.installed

# The official AsyncAPI parser, installed exactly as package-lock.json pins it (no install scripts).
$(ASYNCAPI_STAMP): $(ASYNCAPI)/package.json $(ASYNCAPI)/package-lock.json
	@command -v npm >/dev/null || { echo "make asyncapi needs node and npm (the AsyncAPI parser is a node package)"; exit 1; }
	cd $(ASYNCAPI) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(ASYNCAPI_STAMP)

## asyncapi: schemas/asyncapi.json must pass the official AsyncAPI parser (@asyncapi/parser 3.x)
asyncapi: $(ASYNCAPI_STAMP)
	node $(ASYNCAPI)/check.mjs schemas/asyncapi.json

## test: lint, type-check, architecture contracts, the AsyncAPI parser, then the whole suite
test: lint asyncapi
	$(BIN)/pytest -q

schemas: $(STAMP)
	$(BIN)/pool-managerd schemas --out schemas

demo: $(STAMP)
	$(BIN)/pool-managerd demo

bench: $(STAMP)
	$(BIN)/python bench/lifecycle_latency.py
	$(BIN)/python bench/command_latency.py
	$(BIN)/python bench/replay_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(ASYNCAPI)/node_modules
