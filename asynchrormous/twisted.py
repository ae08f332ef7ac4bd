"""Twisted interop: background results as Deferreds fired on the reactor thread.

Twisted programs (and Scrapy pipelines, Buildbot, Crossbar) call the ORM from the
reactor thread, where blocking stalls everything; here the query runs on the pool and
the Deferred fires back on the reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from .results import Job, is_background_queryset, job_of

__all__ = ["deferred"]


def deferred(value: Any) -> defer.Deferred[Any]:
    """A Deferred for a lazy result or a queryset, fired on the reactor thread.

    A queryset is started (background mode) and fires with its list of rows; a lazy
    result (``count()``, ``get()``, …) fires with its value; a failure fires the
    errback with the worker's exception. Call it from the reactor thread.
    """
    result: defer.Deferred[Any] = defer.Deferred()
    if is_background_queryset(value):
        queryset = value.start()
        job = job_of(queryset)
        if job is None:  # already evaluated: nothing to wait for
            result.callback(list(queryset))
            return result

        def settle() -> Any:
            queryset._resolve_background(0)
            return list(queryset)
    else:
        job = job_of(value)
        if job is None:
            result.callback(value)
            return result
        found: Job = job

        def settle() -> Any:
            return found.result(0)

    def fire() -> None:
        try:
            outcome = settle()
        except BaseException:
            result.errback(Failure())
        else:
            result.callback(outcome)

    job.future.add_done_callback(lambda _: reactor.callFromThread(fire))
    return result
