"""Instrumentation: ``job_finished`` reports each job's timing, thread and SQL.

Connect a receiver to draw timelines or log slow jobs; with no receivers connected
jobs are not instrumented at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connections
from django.dispatch import Signal

from .pool import in_worker

__all__ = ["cache_used", "instrumented", "job_finished"]

#: Sent from the thread that ran the job, once it ends, with keyword arguments
#: ``description`` (str), ``alias`` (str), ``thread`` (the name of the thread that
#: ran it), ``inline`` (bool: ran on a caller's thread: in a transaction, or taken
#: over by a caller that needed it first), ``started`` and ``finished``
#: (``time.perf_counter()`` values), ``sql`` (list of statements) and ``exception``
#: (the exception it raised, or None). The sender is None.
job_finished = Signal()

#: Sent from the thread that ran a cached queryset's statement, with keyword
#: arguments ``alias``, ``sql``, ``tables`` (the frozenset of table names it
#: depends on) and ``outcome``: ``"hit"`` (answered from the cache), ``"miss"``
#: (read from the database, and kept unless in a transaction or the cache is
#: down) or ``"bypass"`` (read from the database without looking: the open
#: transaction wrote one of its tables, an invalidation is still owed, or its
#: parameters cannot be pickled). The sender is None.
cache_used = Signal()


def instrumented(
    fn: Callable[..., Any], alias: str, description: str, inline: bool
) -> Callable[..., Any]:
    """``fn``, wrapped to send ``job_finished`` when it runs; ``fn`` itself when
    nobody listens (a plain list check: jobs then cost nothing more)."""
    if not job_finished.receivers:
        return fn

    def run(*args: Any) -> Any:
        statements: list[str] = []

        def record(
            execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
        ) -> Any:
            statements.append(sql)
            return execute(sql, params, many, context)

        started = time.perf_counter()
        error: BaseException | None = None
        # Not Django's execute_wrapper(): it pops the *last* wrapper on exit, and the
        # job may add one of its own (a write barrier, a connection_created hook).
        wrappers = connections[alias].execute_wrappers
        wrappers.append(record)
        try:
            return fn(*args)
        except BaseException as exc:
            error = exc
            raise
        finally:
            wrappers.remove(record)
            job_finished.send(
                sender=None,
                description=description,
                alias=alias,
                thread=threading.current_thread().name,
                inline=inline or not in_worker(),
                started=started,
                finished=time.perf_counter(),
                sql=statements,
                exception=error,
            )

    return run
