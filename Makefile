# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://apigw:apigw@127.0.0.1:5432/apigw
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: chromium run test bench install install-dev assets lint format

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt constraints.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

static/vendor/chart.umd.min.js: node_modules/.package-lock.json
	mkdir -p static/vendor
	cp node_modules/chart.js/dist/chart.umd.min.js static/vendor/

static/vendor/swagger-ui/swagger-ui-bundle.js: node_modules/.package-lock.json
	mkdir -p static/vendor/swagger-ui
	cp node_modules/swagger-ui-dist/swagger-ui-bundle.js \
	   node_modules/swagger-ui-dist/swagger-ui-standalone-preset.js \
	   node_modules/swagger-ui-dist/swagger-ui.css \
	   node_modules/swagger-ui-dist/favicon-32x32.png static/vendor/swagger-ui/

assets: static/vendor/chart.umd.min.js static/vendor/swagger-ui/swagger-ui-bundle.js

install: $(VENV)/.installed assets

install-dev: $(VENV)/.installed-dev assets

run: install
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py seeddemo
	@echo
	@echo "  Portal:        http://127.0.0.1:$${PORTAL_PORT:-8000}/"
	@echo "  Django admin:  http://127.0.0.1:$${PORTAL_PORT:-8000}/admin/  (user admin)"
	@echo "  Gateway:       http://127.0.0.1:8080/demo/anything  (send X-API-Key)"
	@echo "  Gateway ops:   http://127.0.0.1:9080/metrics  /healthz  /readyz  (loopback only)"
	@echo "  Demo upstream: http://127.0.0.1:$${DEMO_UPSTREAM_PORT:-9000}/"
	@echo "  Emails (verification links) are printed below by the portal process."
	@echo "  A key for scripts: $(PY) manage.py createapikey --email you@example.com --plan free"
	@echo "  Ctrl-C stops everything."
	@echo
	$(VENV)/bin/honcho start -f Procfile

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The suite runs twice: on the embedded defaults, then on PostgreSQL + Redis. Outside CI the
# second pass is skipped (with a message) when those servers are unreachable; with CI=true an
# unreachable server fails the run.
# Browser tests drive Debian's Chromium (never a downloaded browser): installed here when
# missing and we are root; otherwise the command is printed and those tests are skipped
# (outside CI; under CI=true a missing browser fails them).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "Chromium is missing; the browser tests need: sudo apt-get install -y chromium chromium-driver"; \
	  fi; }

test: install-dev lint chromium
	$(PY) manage.py collectstatic --noinput -v0
	@echo "=== pass 1/2: embedded defaults (SQLite, in-process counters, filesystem broker)"
	env -u DATABASE_URL -u REDIS_URL -u CELERY_BROKER_URL VAR_DIR=$(CURDIR)/var/test-embedded \
	  $(PY) -m pytest
	@if $(PY) tests/external_services.py "$(TEST_DATABASE_URL)" "$(TEST_REDIS_URL)"; then \
	  echo "=== pass 2/2: PostgreSQL + Redis (Redis is the Celery broker too)"; \
	  env -u CELERY_BROKER_URL DATABASE_URL="$(TEST_DATABASE_URL)" REDIS_URL="$(TEST_REDIS_URL)" \
	    VAR_DIR=$(CURDIR)/var/test-servers $(PY) -m pytest; \
	elif [ "$$CI" = "true" ]; then \
	  echo "CI=true and PostgreSQL/Redis are unreachable: failing (see .ci/run)"; exit 1; \
	else \
	  echo "=== pass 2/2 SKIPPED: PostgreSQL ($(TEST_DATABASE_URL)) or Redis ($(TEST_REDIS_URL)) unreachable; .ci/run starts them"; \
	fi

bench: install-dev
	$(PY) bench/run.py
	@echo "=== server x upstream client, a minimal proxy on each (bench/stacks.py)"
	@$(PY) bench/stacks.py
	@echo "=== 1 vs 2 gateway workers on Redis (bench/scaling.py)"
	@$(PY) bench/scaling.py
	@echo "=== snapshot and router at scale (bench/snapshot.py)"
	@env -u DATABASE_URL -u REDIS_URL $(PY) bench/snapshot.py
	@echo "=== 1 GiB streamed each way (bench/stream.py)"
	@env -u DATABASE_URL -u REDIS_URL $(PY) bench/stream.py
	@echo "=== ingest (bench/ingest.py)"
	@echo "| database | events | batch | events/s | rollup rows | redelivered batch |"
	@echo "| --- | ---: | ---: | ---: | ---: | --- |"
	@env -u DATABASE_URL $(PY) bench/ingest.py
	@if $(PY) tests/external_services.py "$(TEST_DATABASE_URL)" "$(TEST_REDIS_URL)" 2>/dev/null; then \
	  DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) bench/ingest.py && \
	  DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) bench/ingest.py --batch 10000 && \
	  echo && echo "=== raw -> rollups (bench/rebuild.py)" && \
	  echo "| database | raw events | took | events/s | rollup rows |" && \
	  echo "| --- | ---: | ---: | ---: | ---: |" && \
	  DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) bench/rebuild.py && \
	  echo && echo "=== dashboard queries (bench/dashboard.py)" && \
	  DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) bench/dashboard.py; \
	else echo "(PostgreSQL benches skipped: $(TEST_DATABASE_URL) unreachable)"; fi
