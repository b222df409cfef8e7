# Runwarden: `make run` serves the console, `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8000

# Tests use the machine's real PostgreSQL and Redis (never mocks); override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/runwarden
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run demo test test-unit test-sqlite test-e2e lint format bench bench-peers soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Embedded default (no DATABASE_URL/REDIS_URL): one process, SQLite under var/, in-process
# Celery worker and dispatcher. With both set: web, dispatcher, one worker pool per lane and
# beat as separate processes (Procfile), run from the project's virtualenv.
run: $(STAMP)
	@export DEBUG=$${DEBUG:-1}; \
	$(BIN)/python manage.py ensure_database && \
	$(BIN)/python manage.py migrate --noinput && \
	$(BIN)/python manage.py collectstatic --noinput -v0 && \
	$(BIN)/python manage.py seed_demo && \
	echo "" && echo "Runwarden console: http://127.0.0.1:$(PORT)/  (log in as operator / runwarden)" && \
	echo "Start demo runs from another shell (same DATABASE_URL/REDIS_URL, if any): make demo" && \
	echo "Or fill every page (lock waits, conflicts, an edited approval, a deadlock): make demo SCENARIO=contention" && echo "" && \
	if [ -n "$$DATABASE_URL" ] && [ -n "$$REDIS_URL" ]; then \
		rm -rf var/prometheus && mkdir -p var/prometheus && \
		PROMETHEUS_MULTIPROC_DIR="$(CURDIR)/var/prometheus" \
		PATH="$(CURDIR)/$(BIN):$$PATH" PORT=$(PORT) $(BIN)/honcho -f Procfile start; \
	else \
		PORT=$(PORT) $(BIN)/python manage.py serve --port $(PORT); \
	fi

# Demo traffic against the console `make run` serves (run it with the same DATABASE_URL and
# REDIS_URL, if any): SCENARIO=mix (RUNS runs of the demo workflows), contention, or outside (an
# agent outside Runwarden calling the console on PORT over HTTP).
SCENARIO ?= mix
RUNS ?= 50
demo: $(STAMP)
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py demo_traffic --tenant acme --scenario $(SCENARIO) --runs $(RUNS) \
		--url http://127.0.0.1:$(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Lint and the three suites below, side by side (scripts/test-all), each on its own database and
# Redis DB (core/settings_test.py).
test: $(STAMP)
	@bash scripts/ensure-chromium
	@DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} \
		bash scripts/test-all

# Over TEST_WORKERS pytest-xdist workers, a test file per worker at a time.
TEST_WORKERS ?= 2
test-unit: $(STAMP)
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} \
		$(BIN)/pytest -m "not e2e" -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# The engine's transition tests (marked both_dialects) again on SQLite, in the embedded default's
# shape: no DATABASE_URL or REDIS_URL (a SQLite file per run, made by pytest-django, the in-memory
# channel layer and Celery transport). Tests that need PostgreSQL are skipped with their reason.
test-sqlite: $(STAMP)
	env -u DATABASE_URL -u REDIS_URL $(BIN)/pytest -m "both_dialects and not e2e" -p no:cacheprovider

# Browser tests run in their own pytest process (sync Playwright and pytest-asyncio clash).
test-e2e: $(STAMP)
	@bash scripts/ensure-chromium
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} \
		RUNWARDEN_TEST_SUITE=browser $(BIN)/pytest -m e2e -p no:cacheprovider

# Side by side on this machine: Runwarden's pipeline vs raw Celery on the same Redis broker, with real
# worker processes (docs/BENCHMARKS.md). A fresh database each time, Redis DB 2 (emptied between
# phases: never point BENCH_REDIS_URL at a Redis DB anything else uses). Writes bench/results.json;
# BENCH_ARGS passes options, e.g. BENCH_ARGS=--markdown. Ends within 10 minutes.
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/runwarden_bench
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/2
BENCH_ARGS ?=
bench: $(STAMP)
	psql -q "$(BENCH_DATABASE_URL:/runwarden_bench=/postgres)" -c "DROP DATABASE IF EXISTS runwarden_bench WITH (FORCE)" \
		-c "CREATE DATABASE runwarden_bench"
	export DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) \
		SECRET_KEY=$${SECRET_KEY:-bench-only-not-a-secret} RUNWARDEN_WORKFLOW_MODULES=bench.workloads; \
		$(BIN)/python manage.py migrate -v0 && $(BIN)/python manage.py bench $(BENCH_ARGS) && \
		$(BIN)/python manage.py collectstatic --noinput -v0 && $(BIN)/python manage.py bench_pages

# Runwarden side by side with its peers (DBOS, procrastinate, Temporal, Restate) on the same four
# workloads, interleaved over rounds (bench/peers/run.py): prints Runwarden's speed against each as
# ratios and writes bench/peers.json. The peers are installed into .peers/ (never into .venv) by
# bench/peers/install.sh. PEERS_ARGS passes options, e.g. PEERS_ARGS="--rounds 1 --markdown".
PEERS_ARGS ?=
bench-peers: $(STAMP)
	bash bench/peers/install.sh
	.peers/venv/bin/python -m bench.peers.run $(PEERS_ARGS)

# The long soak (docs/guarantees.md): 2,000 mixed runs across two tenants on real workers, with
# random worker kills and racing approvals; make test runs a short one (300 runs). Figures go
# to bench/soak.json.
SOAK_RUNS ?= 2000
soak: $(STAMP)
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} \
	RUNWARDEN_SOAK_RUNS=$(SOAK_RUNS) RUNWARDEN_SOAK_TIMEOUT=3000 RUNWARDEN_SOAK_SETTLE_SECONDS=2400 \
	RUNWARDEN_SOAK_REPORT=bench/soak.json \
		$(BIN)/pytest -m "not e2e" -p no:cacheprovider -s tests/runs/test_soak.py

clean:
	rm -rf $(VENV) var/*.sqlite3 var/staticfiles .pytest_cache .mypy_cache .ruff_cache
