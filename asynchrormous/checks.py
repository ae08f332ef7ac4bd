"""System checks: a bad ASYNCHRORMOUS setting or a database the workers cannot share."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .conf import DEFAULTS, setting_errors

__all__ = ["check_databases", "check_settings", "database_messages"]

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
