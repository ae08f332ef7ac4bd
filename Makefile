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

.PHONY: test lint sysdeps demo bench reliability

# sysdeps first, so a missing system package stops make before it builds anything.
test: sysdeps $(TOX)
	$(TOX) run-parallel --parallel $(TOX_PARALLEL) --parallel-no-spinner
	$(TOX) run -e django-suite-sqlite,django-suite-postgres

# The reliability suite at full counts (tests/reliability, README "Reliability"):
# several minutes per database; the figures go to test-output/reliability/.
reliability: sysdeps $(TOX)
	ASYNCHRORMOUS_RELIABILITY=full $(TOX) run -e reliability-postgres,reliability-mariadb,reliability-sqlite
	$(TOOLS)/bin/python tests/reliability/report.py

lint: sysdeps $(TOX)
	$(TOX) run -e lint

# mysqlclient (the mariadb env, and lint through the dev extra) has no Linux wheel, so pip
# builds it, and its setup.py finds the client library only through pkg-config, under one
# of the names below. Without them that build fails minutes into `make test`, so check
# here: install them when this can (root with apt-get, as in CI), otherwise stop and say
# what to install. SYSDEPS_INSTALL=no never installs, only checks.
SYSDEPS_DEB := libmariadb-dev pkg-config
MYSQLCLIENT_PC := mysqlclient mariadb libmariadb perconaserverclient
SYSDEPS_INSTALL ?= auto
have_pkg_config = command -v pkg-config >/dev/null
have_mysqlclient_pc = { $(foreach n,$(MYSQLCLIENT_PC),pkg-config --exists $(n) ||) false; }
have_sysdeps = $(have_pkg_config) && $(have_mysqlclient_pc)

sysdeps:
	@$(have_sysdeps) && exit 0; \
	if [ "$(SYSDEPS_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing $(SYSDEPS_DEB): mysqlclient builds against them"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS_DEB); } || exit 1; \
		$(have_sysdeps) && exit 0; \
		echo "make sysdeps: installed $(SYSDEPS_DEB), but pkg-config still finds none of: $(MYSQLCLIENT_PC)" >&2; \
		exit 1; \
	fi; \
	if $(have_pkg_config); then missing="the MariaDB/MySQL client headers (pkg-config finds none of: $(MYSQLCLIENT_PC))"; \
	else missing="pkg-config (so the headers were not looked for)"; fi; \
	echo "make sysdeps: mysqlclient needs the MariaDB/MySQL client headers and pkg-config;" >&2; \
	echo "missing: $$missing. Install them, then run make again:" >&2; \
	echo "  Debian/Ubuntu:  sudo apt-get install $(SYSDEPS_DEB)" >&2; \
	echo "  Fedora/Red Hat: sudo dnf install mysql-devel pkgconfig" >&2; \
	echo "  macOS:          brew install mysql pkg-config" >&2; \
	echo "(make installs the Debian packages itself when run as root where apt-get exists.)" >&2; \
	exit 1

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
# .venv-bench-d with Python 3.12+ and Django 6.1 for django-async-backend, and
# .venv-bench-cache with this Python and Django, django-cachalot and django-cacheops
# for W7) and their own PostgreSQL database; W7 also needs Redis on 127.0.0.1:6379
# (databases 13 to 15). Writes benchmarks/RESULTS.md and benchmarks/results.png;
# run it on a quiet machine (see `uptime`). BENCH_ARGS=--quick for a short try.
BENCH := .venv-bench

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/run.py $(BENCH_ARGS)

$(BENCH)/.installed: pyproject.toml
	rm -rf $(BENCH)
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install --quiet -e '.[postgres]' matplotlib py-spy redis
	touch $@
