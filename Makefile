# One entry point for humans and CI. `make test` works on a fresh machine with python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint check schemas demo bench clean dashboard

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The web dashboard: npm installs the pinned packages of web/package-lock.json (no install
# scripts run), esbuild bundles the page into the Python package, which serves it.
DASH_OUT := src/pool_managerd/dashboard/static
DASH_STAMP := $(DASH_OUT)/.built
NPM ?= npm

web/node_modules/.installed: web/package.json web/package-lock.json
	cd web && $(NPM) ci --ignore-scripts --no-audit --no-fund
	touch $@

$(DASH_STAMP): web/node_modules/.installed web/build.mjs $(wildcard web/src/*) schemas/lifecycle.json
	cd web && node build.mjs
	touch $@

## dashboard: build the web page that `pool-managerd dashboard` and the demo serve
dashboard: $(DASH_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## test: lint, type-check, architecture contracts, then the whole suite
test: lint dashboard
	$(BIN)/pytest -q

schemas: $(STAMP)
	$(BIN)/pool-managerd schemas --out schemas

demo: $(STAMP) dashboard
	$(BIN)/pool-managerd demo

bench: $(STAMP) dashboard
	$(BIN)/python bench/lifecycle_latency.py
	$(BIN)/python bench/command_latency.py
	$(BIN)/python bench/replay_throughput.py
	$(BIN)/python bench/dashboard_render.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache web/node_modules $(DASH_OUT)
