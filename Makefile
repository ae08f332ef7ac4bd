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

.PHONY: test lint demo

test: $(TOX)
	$(TOX) run-parallel --parallel $(TOX_PARALLEL) --parallel-no-spinner
	$(TOX) run -e django-suite-sqlite,django-suite-postgres

lint: $(TOX)
	$(TOX) run -e lint

demo:
	@echo "the demo arrives with the example_project issue" >&2
	@exit 1

# Rebuilt when this file (and so the tox pin) changes.
$(TOX): Makefile
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet 'tox>=4.20,<5'
