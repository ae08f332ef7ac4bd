"""System checks: a bad ASYNCHRORMOUS setting or a database the workers cannot share."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .conf import DEFAULTS, setting_errors

__all__ = [
    "cache_messages",
    "check_cache",
    "check_databases",
    "check_settings",
    "database_messages",
]

SUPPORTED_VENDORS = ("sqlite", "postgresql", "mysql")


@register(Tags.compatibility)
def check_settings(**kwargs: Any) -> list[CheckMessage]:
    return [
        Error(
            message,
            hint=f"The defaults are {DEFAULTS}; see the README's settings table.",
            id=check_id,
        )
        for check_id, message in setting_errors()
    ]


@register(Tags.database, Tags.compatibility)
def check_databases(**kwargs: Any) -> list[CheckMessage]:
    return database_messages(settings.DATABASES)


def database_messages(databases: dict[str, dict[str, Any]]) -> list[CheckMessage]:
    """What check_databases reports for a DATABASES setting."""
    messages: list[CheckMessage] = []
    for alias, conf in databases.items():
        engine = conf.get("ENGINE", "")
        vendor = engine.rsplit(".", 1)[-1]
        if vendor == "sqlite3":
            messages.extend(_check_sqlite(alias, conf))
        elif not any(v in engine for v in SUPPORTED_VENDORS):
            messages.append(
                Warning(
                    f"Database {alias!r} uses {engine!r}, which asynchrormous is not "
                    f"tested with.",
                    hint="Supported: SQLite, PostgreSQL (psycopg 3), MariaDB/MySQL.",
                    id="asynchrormous.W002",
                )
            )
    return messages


def _check_sqlite(alias: str, conf: dict[str, Any]) -> list[CheckMessage]:
    name = str(conf.get("NAME", ""))
    private_memory = "mode=memory" in name and "cache=shared" not in name
    if name in ("", ":memory:") or private_memory:
        return [
            Error(
                f"Database {alias!r} is a private in-memory SQLite database: each "
                f"worker thread would see its own empty database.",
                hint="Use a file, or a shared-cache URI "
                "('file:name?mode=memory&cache=shared').",
                id="asynchrormous.E007",
            )
        ]
    options = conf.get("OPTIONS", {})
    missing = []
    if "timeout" not in options:
        missing.append("'timeout' (e.g. 20)")
    if "journal_mode=wal" not in str(options.get("init_command", "")).lower().replace(
        " ", ""
    ):
        missing.append("'init_command': 'PRAGMA journal_mode=WAL;'")
    if missing:
        return [
            Warning(
                f"SQLite database {alias!r} has no {' and no '.join(missing)} in "
                f"OPTIONS; concurrent background writes may fail with 'database is "
                f"locked'.",
                hint="OPTIONS = {'timeout': 20, 'transaction_mode': 'IMMEDIATE', "
                "'init_command': 'PRAGMA journal_mode=WAL;'}",
                id="asynchrormous.W001",
            )
        ]
    return []


@register(Tags.caches, Tags.compatibility)
def check_cache(**kwargs: Any) -> list[CheckMessage]:
    raw = getattr(settings, "ASYNCHRORMOUS", {})
    alias = raw.get("CACHE") if isinstance(raw, dict) else None
    caches = getattr(settings, "CACHES", {})
    if alias is None:
        return _managers_without_a_cache()
    if alias not in caches:
        return []  # check_settings reports an unknown alias
    return cache_messages(alias, caches[alias])


def _managers_without_a_cache() -> list[CheckMessage]:
    from django.apps import apps

    caching = sorted(
        f"{model._meta.label}.{manager.name}"
        for model in apps.get_models()
        for manager in model._meta.managers
        if getattr(manager, "_cache", False) is not False
    )
    if not caching:
        return []
    return [
        Warning(
            f"{', '.join(caching)} cache their querysets (AsyncManager(cache=...)), "
            f"but ASYNCHRORMOUS['CACHE'] is not set: they read the database.",
            hint="Set ASYNCHRORMOUS['CACHE'] to an alias of settings.CACHES, or "
            "leave it unset to turn caching off on purpose.",
            id="asynchrormous.W005",
        )
    ]


# Where each backend takes the socket timeouts that bound a call to a server that
# hangs (README, Caching): Django passes OPTIONS on to the client.
_TIMEOUT_OPTIONS = {
    "RedisCache": ("socket_timeout", "socket_connect_timeout"),
    "PyMemcacheCache": ("timeout", "connect_timeout"),
}


def cache_messages(alias: str, conf: dict[str, Any]) -> list[CheckMessage]:
    """What check_cache reports for the cache ASYNCHRORMOUS['CACHE'] names."""
    backend = str(conf.get("BACKEND", "")).rsplit(".", 1)[-1]
    if backend in ("LocMemCache", "DummyCache"):
        what = (
            "keeps nothing"
            if backend == "DummyCache"
            else "is private to each process: a write in one process cannot "
            "invalidate what another process cached"
        )
        return [
            Warning(
                f"ASYNCHRORMOUS['CACHE'] names {alias!r}, a {backend}, which {what}.",
                hint="Use Redis or Memcached when more than one process serves the "
                "site (README, Caching); LocMemCache suits one process and tests.",
                id="asynchrormous.W003",
            )
        ]
    options = conf.get("OPTIONS", {})
    wanted = _TIMEOUT_OPTIONS.get(backend, ())
    missing = [name for name in wanted if name not in options]
    if missing:
        return [
            Warning(
                f"Cache {alias!r} ({backend}) has no {', '.join(missing)} in OPTIONS: "
                f"a cache server that stops answering would hold every cached query "
                f"(and every write's invalidation) for the client's default timeout.",
                hint="e.g. OPTIONS = {"
                + ", ".join(f"{name!r}: 0.25" for name in wanted)
                + "} (README, Caching).",
                id="asynchrormous.W004",
            )
        ]
    return []
