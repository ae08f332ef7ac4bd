"""Simulated network latency: one sleep per SQL statement, on every connection.

A local database answers in microseconds; a managed one in another zone takes a
millisecond or more per round trip, and that is where running queries side by side
pays most. ``DEMO_LATENCY_MS`` adds that round trip to every statement.

How: Django runs each statement through its connection's ``execute_wrappers``. A
connection belongs to one thread, and asynchrormous's workers open their own, so the
wrapper is added from the ``connection_created`` signal, which Django sends on the
thread that opened the connection, for the request thread and every worker alike.

It goes first in the list, not last: ``execute_wrapper()`` (Django's context manager,
which asynchrormous's instrumentation uses) removes the *last* wrapper on exit, and a
connection opened inside such a block would otherwise lose this wrapper instead.
First in the list is outermost: wrappers added later run inside the sleep. That is
harmless here: asynchrormous times whole jobs, sleep included, and the demo's timer
for plain statements puts itself first (see timeline.plain_statements).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

__all__ = ["active_on", "install", "install_from_settings", "seconds"]

# Read on every statement: a later install() also changes already wrapped connections.
_seconds = 0.0


def seconds() -> float:
    """The latency now added to each statement."""
    return _seconds


def _sleep_then_execute(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    if _seconds:
        time.sleep(_seconds)  # releases the GIL, as waiting on a socket does
    return execute(sql, params, many, context)


def _on_connection_created(
    sender: type, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    # Once per connection wrapper: Django keeps the list across reconnects.
    wrappers = connection.execute_wrappers
    if _sleep_then_execute not in wrappers:
        wrappers.insert(0, _sleep_then_execute)


def active_on(connection: BaseDatabaseWrapper) -> bool:
    """Whether statements on this connection get the latency (when it is not 0)."""
    return _sleep_then_execute in connection.execute_wrappers


def install(milliseconds: float) -> None:
    """Add ``milliseconds`` to every statement from now on; 0 turns it off."""
    global _seconds
    _seconds = max(0.0, milliseconds) / 1000
    connection_created.connect(
        _on_connection_created, dispatch_uid="bookshop-demo-latency"
    )


def install_from_settings() -> None:
    """``install(settings.DEMO_LATENCY_MS)``."""
    install(settings.DEMO_LATENCY_MS)
