# flowgate: `make run` serves the gateway, `make test` runs the suite; both set up .venv from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint stress-test browser fuzz chaos bench stack deploy clean

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them (a file's
# Prefect server or gunicorn is started once), the files marked `long` first (tests/conftest.py), the rest in a
# random order (pytest-randomly prints its seed; rerun one order with `-p randomly --randomly-seed=<seed>`).
TEST_WORKERS ?= 3
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

run: $(VENV)/.runtime data/demo_shop.db
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(VENV)/.dev data/demo_shop.db browser lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

# The tier without external processes: no gunicorn, Prefect, PostgreSQL, browser or chaos (pytest.ini's markers).
test-fast: $(VENV)/.dev data/demo_shop.db
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not (gunicorn or prefect or postgres or browser or chaos)"

# ruff's lint and mypy's types on app, flows and connectors (both configured in pyproject.toml): pyflakes,
# pycodestyle, import order, bugbear, pyupgrade, then the types; `make test` runs it first and stops on a finding.
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole suite STRESS_ROUNDS times in a row (default 5), each beside one busy-looping process per core and
# in a new random order; stops at the first red round.
stress-test: $(VENV)/.dev data/demo_shop.db browser
	$(BIN)/python -m tests.support.stress -- $(PYTEST_PARALLEL)

# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download is not used):
# installed here when missing and we are root with apt; otherwise those tests skip and say why.
browser:
	@if [ -n "$$FLOWGATE_CHROMIUM" ] || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the browser tests (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "chromium could not be installed: the browser tests will skip"; \
	else echo "no chromium (apt-get install chromium chromium-driver as root): the browser tests will skip"; fi

# The schemathesis tier (every phase, keys off and on, a real gunicorn) with many more examples per operation
# than `make test` runs (5).
fuzz: $(VENV)/.dev data/demo_shop.db
	FLOWGATE_FUZZ_EXAMPLES=$${FLOWGATE_FUZZ_EXAMPLES:-200} $(BIN)/python -m pytest -o timeout=1800 tests/test_fuzz.py

# The chaos test (tests/test_chaos.py, in `make test` with 10 s of faults) for FLOWGATE_CHAOS_SECONDS (600) of them:
# two gateways, a Prefect server and worker, workers SIGKILLed, a gateway SIGTERMed, Prefect killed and slowed.
chaos: $(VENV)/.dev data/demo_shop.db
	FLOWGATE_CHAOS_SECONDS=$${FLOWGATE_CHAOS_SECONDS:-600} $(BIN)/python -m pytest -s tests/test_chaos.py

bench: $(VENV)/.dev data/demo_shop.db
	$(BIN)/python -m bench.trigger_throughput
	$(BIN)/python -m bench.prefect_latency
	$(BIN)/python -m bench.sql_throughput
	$(BIN)/python -m bench.workflow_latency

# Prefect server + deployments + process worker + gateway on one machine; Ctrl-C stops them all.
stack: $(VENV)/.runtime data/demo_shop.db
	$(BIN)/python -m flows.prefect.stack

# Register the connectors as Prefect deployments (PREFECT_API_URL must point at the server).
deploy: $(VENV)/.runtime
	$(BIN)/python -m flows.prefect.deploy

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flowgate needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

data/demo_shop.db: connectors/demo.py | $(VENV)/.runtime
	$(BIN)/python -m connectors.demo $@

clean:
	rm -rf $(VENV) var data/demo_shop.db .pytest_cache
