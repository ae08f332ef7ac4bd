# `make test` builds everything from nothing: a bootstrap venv that holds tox, then one
# tox environment per row of the matrix in tox.ini.
PYTHON ?= python3.11
TOOLS := .venv-tools
TOX := $(TOOLS)/bin/tox
# Two cores: two envs at a time took 33-47 s against 50-68 s one at a time.
TOX_PARALLEL ?= 2

# pyenv's shims only run the globally selected version, so tox would not find 3.12/3.13.
# Their own bin directories go last on PATH, so `python3` still means what it meant.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null)
export PATH := $(PATH)$(foreach d,$(wildcard $(PYENV_ROOT)/versions/3.1[23].*/bin),:$(d))

.PHONY: test lint demo bench

test: $(TOX)
	$(TOX) run-parallel --parallel $(TOX_PARALLEL) --parallel-no-spinner
	$(TOX) run -e django-suite-sqlite,django-suite-postgres

lint: $(TOX)
	$(TOX) run -e lint

# The example project (example_project/README.md) on http://$(DEMO_HOST):$(DEMO_PORT)/,
# from its own venv: migrates, generates the sample catalogue unless it is there, serves
# all three pages with uvicorn. DATABASE_URL and DEMO_LATENCY_MS pass through.
DEMO_VENV := .venv-demo
DEMO_HOST ?= 127.0.0.1
DEMO_PORT ?= 8000

demo: $(DEMO_VENV)/.installed
	cd example_project && ../$(DEMO_VENV)/bin/python manage.py migrate --no-input
	cd example_project && ../$(DEMO_VENV)/bin/python manage.py generate_catalogue
	cd example_project && exec ../$(DEMO_VENV)/bin/uvicorn bookshop.asgi:application \
		--host $(DEMO_HOST) --port $(DEMO_PORT) --lifespan off

# Editable, so the demo runs this checkout's library; rebuilt when the requirements change.
$(DEMO_VENV)/.installed: pyproject.toml example_project/requirements.txt
	rm -rf $(DEMO_VENV)
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install --quiet -e '.[postgres]' -r example_project/requirements.txt
	touch $@

# Rebuilt when this file (and so the tox pin) changes.
$(TOX): Makefile
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet 'tox>=4.20,<5'

# Benchmarks (issue #8): their own virtualenvs (.venv-bench here; run.py makes
# .venv-bench-d with Python 3.12+ and Django 6.1 for django-async-backend) and their
# own PostgreSQL database. Writes benchmarks/RESULTS.md and benchmarks/results.png;
# run it on a quiet machine (see `uptime`). BENCH_ARGS=--quick for a short try.
BENCH := .venv-bench

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/run.py $(BENCH_ARGS)

$(BENCH)/.installed: pyproject.toml
	rm -rf $(BENCH)
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install --quiet -e '.[postgres]' matplotlib py-spy
	touch $@
