# The single entry point for people and CI. `make run` and `make test` work on a
# fresh Linux machine with Python 3.11+: they create .venv/ when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/e2e/node/node_modules/.installed

.PHONY: run test test-fast lint format bench bench-smoke deploy-check system-tools clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

$(NODE_STAMP): tests/e2e/node/package.json
	cd tests/e2e/node && npm install --no-audit --no-fund --silent
	touch $(NODE_STAMP)

system-tools:
	bash scripts/ensure-system-tools.sh redis-server nginx haproxy chromium

run: $(STAMP)
	$(BIN)/broker serve

test: $(STAMP) system-tools $(NODE_STAMP)
	$(BIN)/pytest

# Unit and single-Redis tests only (no load balancers, no browsers).
test-fast: $(STAMP)
	bash scripts/ensure-system-tools.sh redis-server
	$(BIN)/pytest -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check broker api tests bench deploy
	$(BIN)/ruff format --check broker api tests bench deploy
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format broker api tests bench deploy
	$(BIN)/ruff check --fix broker api tests bench deploy

bench: $(STAMP)
	bash scripts/ensure-system-tools.sh redis-server
	$(BIN)/python -m bench

deploy-check: $(STAMP)
	bash scripts/ensure-system-tools.sh nginx haproxy
	$(BIN)/pytest tests/deploy

clean:
	rm -rf $(VENV) tests/e2e/node/node_modules .pytest_cache .mypy_cache .ruff_cache
