"""``DATABASE_URL`` to a ``DATABASES`` entry, for the two schemes the demo needs.

A dependency (dj-database-url) would do more, but the demo only ever points at SQLite
or PostgreSQL, and twenty lines keep the demo's environment to Django and uvicorn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

__all__ = ["SQLITE_OPTIONS", "database_from_url", "sqlite_database"]

#: What asynchrormous's README asks of SQLite: background readers and writers wait for
#: each other (busy timeout) instead of failing, and readers never block (WAL).
SQLITE_OPTIONS: dict[str, Any] = {
    "timeout": 20,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL;",
}


def sqlite_database(path: str | Path) -> dict[str, Any]:
    """A file SQLite database that the worker threads can share."""
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": dict(SQLITE_OPTIONS),
    }


def database_from_url(url: str) -> dict[str, Any]:
    """``sqlite:///relative.sqlite3``, ``sqlite:////absolute.sqlite3`` or
    ``postgres://user:password@host:port/name?option=value``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///x -> path "/x" (relative), sqlite:////x -> "//x" (absolute).
        return sqlite_database(unquote(parts.path[1:]))
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": parts.port or "",
            "OPTIONS": dict(parse_qsl(parts.query)),
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL must start with sqlite:// or postgres://, not {url!r}."
    )
