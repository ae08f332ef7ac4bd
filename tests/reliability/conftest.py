"""The reliability suite: scenarios under load and faults, each printing its figures.

Run with ``make reliability`` (the full counts) or as part of ``make test`` (the
short form, ``ASYNCHRORMOUS_RELIABILITY=short``). Each scenario records its
figures with the ``figures`` fixture; at the end of the session they are written
to ``test-output/reliability/<database>-<scale>.json``, which
``tests/reliability/report.py`` turns into the README's "Reliability" section.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings
from django.db import connection

import asynchrormous

SCALE = os.environ.get("ASYNCHRORMOUS_RELIABILITY", "short")
if SCALE not in ("short", "full"):
    raise RuntimeError(
        f"ASYNCHRORMOUS_RELIABILITY must be short or full, not {SCALE!r}"
    )


def scaled(short: int, full: int) -> int:
    """A count for this run: ``short`` in CI, ``full`` under ``make reliability``."""
    return full if SCALE == "full" else short


_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict of this scenario's figures (counts, seconds, ...), printed and kept.

    The scenario's name is its test's name; fill the dict as the scenario runs.
    """
    name = request.node.name
    found: dict[str, Any] = {}
    _FIGURES[name] = found
    yield found
    print(f"\n[reliability] {name}: {json.dumps(found, sort_keys=True)}")


#: What else the session saw: the server's version, the machine's load, and each
#: test's outcome and scenario (its module and the first line of its docstring).
_ENV: dict[str, Any] = {"load_at_start": os.getloadavg()}
_OUTCOMES: dict[str, str] = {}
_MODULES: dict[str, str] = {}
_TITLES: dict[str, str] = {}


def server_version() -> str:
    """The database server's name and version, e.g. ``PostgreSQL 15.14``."""
    if connection.vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW server_version")
            return f"PostgreSQL {cursor.fetchone()[0].split()[0]}"
        cursor.execute("SELECT VERSION()")
        version = cursor.fetchone()[0]
    if "MariaDB" in version:
        return f"MariaDB {version.split('-')[0]}"
    return f"MySQL {version}"


@pytest.fixture(scope="session", autouse=True)
def _server_version(django_db_setup: None, django_db_blocker: Any) -> None:
    with django_db_blocker.unblock():
        try:
            _ENV["server"] = server_version()
        except Exception as exc:  # a figure, never a reason to fail a scenario
            _ENV["server"] = f"{connection.vendor} (version unknown: {exc})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.when == "teardown" and report.failed:
            outcome = "error"
        else:
            outcome = report.outcome
        _OUTCOMES.setdefault(item.name, outcome)
        if outcome in ("failed", "error"):
            _OUTCOMES[item.name] = outcome
        module = getattr(item, "module", None)
        if module is not None:
            name = module.__name__.rsplit(".", 1)[-1]
            _MODULES[item.name] = name
            doc = (module.__doc__ or name).strip().splitlines()[0]
            _TITLES[name] = doc
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _FIGURES:
        return
    out = Path(settings.OUTPUT_DIR) / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    db = os.environ.get("ASYNCHRORMOUS_TEST_DB", "sqlite")
    report = {
        "database": db,
        "vendor": connection.vendor,
        "scale": SCALE,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "django": django.get_version(),
        "asynchrormous": getattr(asynchrormous, "__version__", "0.1.0"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {sys.platform}",
        "server": _ENV.get("server", connection.vendor),
        "load_average": {
            "start": [round(x, 2) for x in _ENV["load_at_start"]],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "outcomes": _OUTCOMES,
        "modules": _MODULES,
        "titles": _TITLES,
        "passed": exitstatus == 0,
        "scenarios": _FIGURES,
    }
    text = json.dumps(report, indent=2, sort_keys=True)
    (out / f"{db}-{SCALE}.json").write_text(text)
