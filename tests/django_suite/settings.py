"""Settings for Django's own tests/runtests.py, modelled on its tests/test_sqlite.py.

run.py sets DJANGO_SUITE_DB (sqlite, postgres), DJANGO_SUITE_MODE (plain, async,
background) and DJANGO_SUITE_SUFFIX (keeps concurrent runs' test databases apart).
The patch is installed here because runtests.py imports settings before any model.
"""

from __future__ import annotations

import os
from typing import Any

DB = os.environ.get("DJANGO_SUITE_DB", "sqlite")
MODE = os.environ.get("DJANGO_SUITE_MODE", "plain")
SUFFIX = os.environ.get("DJANGO_SUITE_SUFFIX", "local")

if MODE not in ("plain", "async", "background"):
    raise RuntimeError(f"DJANGO_SUITE_MODE must be plain, async or background: {MODE}")
if MODE != "plain":
    from tests.django_suite.patch import install

    install()

if DB == "sqlite":
    # In-memory test databases, as in Django's own CI; Django names them
    # "file:memorydb_<alias>?mode=memory&cache=shared", so worker threads share them.
    DATABASES: dict[str, dict[str, Any]] = {
        "default": {"ENGINE": "django.db.backends.sqlite3"},
        "other": {"ENGINE": "django.db.backends.sqlite3"},
    }
elif DB == "postgres":
    DATABASES = {
        alias: {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("DJANGO_SUITE_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("DJANGO_SUITE_PG_PORT", "5432"),
            "USER": os.environ.get("DJANGO_SUITE_PG_USER", "postgres"),
            "NAME": "postgres",
            "TEST": {"NAME": f"test_django_suite_{alias}_{MODE}_{SUFFIX}"},
        }
        for alias in ("default", "other")
    }
else:
    raise RuntimeError(f"DJANGO_SUITE_DB must be sqlite or postgres, not {DB!r}")

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
TEST_RUNNER = "tests.django_suite.runner.SuiteRunner"
ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": 60.0}
