# The two commands of the README: `make run` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make run` installs what the relay needs to run; `make test` adds the test extra (pytest, Playwright, mypy, ...).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test setup run-setup system-deps lint typecheck unit js-test bench soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run-setup: $(RUN_STAMP)

setup: $(TEST_STAMP)

run: run-setup
	$(VENV)/bin/llm-relay $(ARGS)

system-deps:
	bash scripts/system-deps.sh

lint: setup
	$(VENV)/bin/ruff check server tests bench
	$(VENV)/bin/ruff format --check server tests bench

typecheck: setup
	$(VENV)/bin/mypy

unit: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The JS clients (openai, ai) are pinned by tests/js/package-lock.json; npm ci runs again when the lock changes.
tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund

js-test: setup system-deps tests/js/node_modules/.package-lock.json
	PYTHON=$(abspath $(PY)) node --test tests/js/

test: lint typecheck unit js-test

# The peers (aiohttp-sse, sse-starlette, uvicorn, FastAPI, Flask, gunicorn) come with the bench extra.
bench: run-setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(ARGS)

# SOAK_SECONDS=120 by default; -s shows the figures.
soak: setup
	$(PY) -m pytest -m soak -s tests/soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
