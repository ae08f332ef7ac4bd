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
        "passed": exitstatus == 0,
        "scenarios": _FIGURES,
    }
    (out / f"{db}-{SCALE}.json").write_text(
        json.dumps(report, indent=2, sort_keys=True)
    )
