# Everything a fresh machine needs: `make run` (demo gateway on :8080) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT := $(shell command -v apt-get 2>/dev/null)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test lint bench redis chromium prometheus nginx check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# A Redis on 127.0.0.1:6379 (tests also start private redis-server instances, so the binary must exist).
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp --logfile /tmp/redis-6379.log
	@for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 0.3; done; echo "redis did not start" >&2; exit 1

# Headless Chromium for the dashboard test.
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Prometheus and promtool for the scrape test (Debian's package).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

# nginx for the bench's overhead scenario (the reverse proxy the gateway's CPU per request is compared with).
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends nginx; }

run: install
	$(VENV)/bin/gateway demo

# Static checks first (cheap, and a type error fails fast): ruff on code and tests, mypy on the runtime package.
lint: install
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/mypy gateway

test: install redis chromium prometheus nginx lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: install redis nginx
	$(VENV)/bin/gateway bench

check: install
	$(VENV)/bin/gateway check-config config/compose.yaml

clean:
	rm -rf $(VENV) .bench build *.egg-info
