"""Test settings: ASYNCHRORMOUS_TEST_DB picks sqlite (default), postgres or mariadb."""

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
OUTPUT_DIR = Path(os.environ.get("ASYNCHRORMOUS_TEST_OUTPUT", BASE_DIR / "test-output"))
OUTPUT_DIR.mkdir(parents=True, exist_ok=True)

DB = os.environ.get("ASYNCHRORMOUS_TEST_DB", "sqlite")
# Parallel tox environments share the servers: give each its own test database.
SUFFIX = os.environ.get("TOX_ENV_NAME", "local").replace("-", "_").replace(".", "_")

DATABASES: dict[str, dict[str, Any]]
if DB in ("sqlite", "sqlite-memory"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(OUTPUT_DIR / f"{SUFFIX}.sqlite3"),
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL;",
            },
            "TEST": {"NAME": str(OUTPUT_DIR / f"test_{SUFFIX}.sqlite3")},
        }
    }
    if DB == "sqlite-memory":
        # Django's own default: an in-memory, shared-cache test database.
        del DATABASES["default"]["TEST"]
elif DB in ("postgres", "postgres-pool"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "postgres",
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": 5432,
            "TEST": {"NAME": f"test_asynchrormous_{SUFFIX}"},
        }
    }
    if DB == "postgres-pool":
        # Django's own psycopg connection pool (OPTIONS["pool"]), under the workers.
        DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 0, "max_size": 8}}
elif DB == "postgres-pgbouncer":
    # PgBouncer in transaction mode, which tests/pgbouncer.py (pytest -p
    # tests.pgbouncer) starts on a free port: what its users must set (README).
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "postgres",
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": int(os.environ.get("ASYNCHRORMOUS_PGBOUNCER_PORT", 6432)),
            "DISABLE_SERVER_SIDE_CURSORS": True,
            "TEST": {"NAME": f"test_asynchrormous_{SUFFIX}"},
        }
    }
elif DB == "mariadb":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": "test",
            "USER": "root",
            "HOST": "127.0.0.1",
            "PORT": 3306,
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {"NAME": f"test_asynchrormous_{SUFFIX}", "CHARSET": "utf8mb4"},
        }
    }
else:
    raise RuntimeError(
        "ASYNCHRORMOUS_TEST_DB must be sqlite, sqlite-memory, postgres, postgres-pool, "
        "postgres-pgbouncer or mariadb, "
        f"not {DB!r}"
    )

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "asynchrormous",
    "tests.testapp",
]
SECRET_KEY = "tests"
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates"}]
ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": 30.0}

# The caches the caching tests use: tests/cache_helpers.py turn_on() points them at
# their servers and turns ASYNCHRORMOUS["CACHE"] on.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache"},
    "memcached": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache"},
    "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}
