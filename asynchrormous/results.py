"""Background jobs and the lazy values that stand for their results.

A job runs on the worker pool, or inline on the caller's thread when the caller is
inside a transaction on the job's database (read-your-writes) or is itself a worker
(no deadlock on a full pool). Either way its outcome lives in a
``concurrent.futures.Future`` and surfaces where the lazy result is first used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from django.db import connections
from django.utils.functional import Promise, SimpleLazyObject, lazy

from .conf import get_settings
from .exceptions import Cancelled, ResultTimeout
from .pool import get_pool, in_worker, pinned
from .signals import instrumented, job_finished

__all__ = [
    "Job",
    "LazyObjectResult",
    "await_job",
    "cancel",
    "is_background_queryset",
    "is_ready",
    "job_of",
    "lazy_result",
    "resolve",
    "submit",
    "wait",
]

logger = logging.getLogger("asynchrormous")

T = TypeVar("T")

# Marks "use the TIMEOUT setting"; None already means "wait forever".
DEFAULT: Any = object()


def _timeout(timeout: float | None) -> float | None:
    timeout = get_settings().timeout if timeout is DEFAULT else timeout
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be None or >= 0 seconds, not {timeout!r}.")
    return timeout


class Job:
    """One background evaluation: its Future, its name, whether its outcome was seen."""

    __slots__ = (
        "__weakref__",
        "description",
        "future",
        "observed",
        "running",
        "transform",
    )

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        description: str,
        transform: Callable[[Any], Any] | None = None,
        running: Running | None = None,
    ) -> None:
        self.future = future
        self.description = description
        self.transform = transform
        self.running = running
        self.observed = False

    def derive(self, transform: Callable[[Any], Any], description: str) -> Job:
        """A job whose value is ``transform(this job's value)``: count() of a fetch."""
        return Job(self.future, description, transform, self.running)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = DEFAULT) -> Any:
        """The value; raises the worker's exception with its type and traceback.

        Raises:
            ResultTimeout: not ready within ``timeout`` (default: the TIMEOUT setting).
            Cancelled: the job was cancelled before it ran.
        """
        timeout = _timeout(timeout)
        try:
            exc = self.future.exception(timeout)
        except concurrent.futures.CancelledError:
            message = f"{self.description} was cancelled before it ran."
            raise Cancelled(message) from None
        except concurrent.futures.TimeoutError:
            raise ResultTimeout(
                f"{self.description} was not ready after {timeout:.2f} s; raise "
                f"ASYNCHRORMOUS['TIMEOUT'] or pass resolve(..., timeout=...)."
            ) from None
        finally:
            self.observed = self.future.done()
        if exc is not None:
            raise exc
        value = self.future.result()
        return value if self.transform is None else self.transform(value)

    def __repr__(self) -> str:
        state = self.future._state.lower()  # PENDING, RUNNING, FINISHED, CANCELLED…
        return f"<Job {self.description} {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling a lazy result pickles its value, as pickling a QuerySet does.
        return (_finished_job, (self.result(), self.description))

    def __del__(self) -> None:
        # As asyncio does for "exception was never retrieved".
        future = self.future
        if self.observed or self.transform is not None or not future.done():
            return
        if not future.cancelled() and (exc := future.exception()) is not None:
            logger.error(
                "Exception in background %s was never retrieved",
                self.description,
                exc_info=exc,
            )


def _finished_job(value: Any, description: str) -> Job:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_result(value)
    return Job(future, description)


# -- Submission -----------------------------------------------------------------


class Running:
    """Where a job runs: the worker's connection, so its statement can be cancelled."""

    __slots__ = ("alias", "connection", "mysql_thread_id")

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.connection: Any = None
        self.mysql_thread_id: int | None = None

    def track(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            wrapper = connections[self.alias]
            if wrapper.vendor == "mysql":
                # mysqlclient refuses thread_id() while another thread uses the
                # connection, so learn the session id before the statement starts.
                wrapper.ensure_connection()
                self.mysql_thread_id = wrapper.connection.thread_id()
            self.connection = wrapper
            try:
                return fn(*args)
            finally:
                self.connection = None

        return run

    def cancel(self) -> None:
        """Ask the database, from another thread, to stop the running statement.

        Not daemon threads: a cancel lost at interpreter exit would leave the
        statement running on the server.
        """
        wrapper = self.connection
        raw = getattr(wrapper, "connection", None)
        if raw is None:
            return
        if wrapper.vendor == "postgresql":
            # psycopg's cancel is thread-safe; cancel_safe() is its non-blocking form.
            cancel = getattr(raw, "cancel_safe", raw.cancel)
            threading.Thread(target=cancel).start()
        elif wrapper.vendor == "sqlite":
            raw.interrupt()  # thread-safe, by sqlite3's documentation
        elif wrapper.vendor == "mysql" and self.mysql_thread_id is not None:
            threading.Thread(
                target=_kill_mysql_query,
                args=(wrapper.get_connection_params(), self.mysql_thread_id),
            ).start()


def _kill_mysql_query(params: dict[str, Any], thread_id: int) -> None:
    # MySQL has no in-band cancel: KILL QUERY from a second connection.
    import MySQLdb

    try:
        conn = MySQLdb.connect(**params)
    except MySQLdb.Error:
        logger.warning("could not connect to cancel MySQL query %s", thread_id)
        return
    try:
        conn.cursor().execute(f"KILL QUERY {int(thread_id)}")
    except MySQLdb.Error:
        pass  # the statement already ended
    finally:
        conn.close()


_thread_writes = threading.local()
_task_writes: weakref.WeakKeyDictionary[Any, dict[str, list[Any]]] = (
    weakref.WeakKeyDictionary()
)
_task_writes_lock = threading.Lock()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None


def _caller_writes() -> dict[str, list[concurrent.futures.Future[Any]]]:
    """The calling thread's, or asyncio task's, own background writes by alias.

    Per task, not per event-loop thread: concurrent tasks never wait on each other.
    """
    task = _current_task()
    if task is None:
        writes: dict[str, list[Any]] = _thread_writes.__dict__.setdefault("writes", {})
        return writes
    with _task_writes_lock:
        return _task_writes.setdefault(task, {})


def _pending_writes(alias: str) -> list[concurrent.futures.Future[Any]]:
    """This caller's background writes on ``alias`` that may still be running."""
    pending = _caller_writes().setdefault(alias, [])
    pending[:] = [f for f in pending if not f.done()]
    return pending


class _WriteBarrier:
    """Execute wrapper on the caller's connection: pending writes finish first.

    Installed while the caller has background writes in flight, so a plain query it
    makes afterwards reads its own writes without calling ``resolve()``.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        self.drain()
        return execute(sql, params, many, context)

    def drain(self) -> None:
        pending = _pending_writes(self.alias)
        if pending:
            what = f"the pending background writes on {self.alias!r}"
            _wait_all(pending, DEFAULT, what)
        wrappers = connections[self.alias].execute_wrappers
        if self in wrappers:
            wrappers.remove(self)


def _track_write(alias: str, future: concurrent.futures.Future[Any]) -> None:
    _pending_writes(alias).append(future)
    wrappers = connections[alias].execute_wrappers
    if not any(isinstance(w, _WriteBarrier) for w in wrappers):
        wrappers.append(_WriteBarrier(alias))


def _run_after(
    prerequisites: list[concurrent.futures.Future[Any]],
    timeout: float | None,
    fn: Callable[..., Any],
    *args: Any,
) -> Any:
    # Earlier futures were queued first, so they are running or done: no deadlock.
    concurrent.futures.wait(prerequisites, timeout)
    return fn(*args)


def must_run_inline(alias: str) -> bool:
    """Whether work on ``alias`` must run on the caller's own thread and connection.

    Inside a transaction the caller's uncommitted rows are visible only to its own
    connection; inside a worker, waiting on the pool could deadlock it.
    """
    if in_worker():
        return True
    conn = connections[alias]
    return conn.in_atomic_block or (conn.connection is not None and not conn.autocommit)


def submit(
    fn: Callable[..., Any],
    *args: Any,
    alias: str,
    writes: bool,
    description: str,
) -> Job:
    """Run ``fn(*args)`` in the background for the caller, on database ``alias``.

    A caller's later work on ``alias`` waits for its earlier writes (``writes=True``).
    """
    future: concurrent.futures.Future[Any]
    inline = must_run_inline(alias)
    if job_finished.has_listeners():
        fn = instrumented(fn, alias, description, inline)
    if inline:
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return Job(future, description)
    running = Running(alias)
    fn = running.track(fn)
    pin = pinned(alias, _current_task())
    if pin is not None:
        # Inside the task's async atomic() block: on its worker, in order.
        return Job(pin.submit(fn, *args), description, running=running)
    pending = _pending_writes(alias)
    if pending:
        future = get_pool().submit(
            _run_after, list(pending), get_settings().timeout, fn, *args
        )
    else:
        future = get_pool().submit(fn, *args)
    if writes:
        _track_write(alias, future)
    return Job(future, description, running=running)


# -- Awaiting from asyncio -------------------------------------------------------


async def await_job(job: Job) -> Any:
    """The job's value; cancelling the awaiting task cancels the job.

    A queued job is dropped; a running statement is cancelled on the database, and
    the worker's connection stays usable (or is replaced before its next job).
    """
    try:
        await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.observed = True  # abandoned on purpose: nothing to report
        if not job.future.cancel() and job.running is not None:
            job.running.cancel()
        raise
    except BaseException:
        pass  # job.result() raises it, with the worker's traceback
    return job.result(0)


# -- Lazy results ---------------------------------------------------------------


def _value(job: Job) -> Any:
    return job.result()


def _await_proxy(proxy: Any) -> Any:
    return await_job(job_of(proxy)).__await__()  # type: ignore[arg-type]


def _awaitable_lazy(resultclass: type) -> Callable[[Job], Any]:
    """``lazy(_value, resultclass)``, whose proxies can also be awaited."""
    make = lazy(_value, resultclass)
    # lazy() made this proxy class for us alone, so it may gain __await__.
    type(make(None)).__await__ = _await_proxy  # type: ignore[arg-type]
    return make


# Built once per type: lazy() makes a new proxy class on every call.
_LAZY_TYPES: dict[type, Callable[[Job], Any]] = {
    cls: _awaitable_lazy(cls) for cls in (int, bool, dict, tuple, list, str)
}


class LazyObjectResult(SimpleLazyObject):
    """A model instance (or None) still being fetched; ``isinstance`` and ``==`` see it.

    ``is None`` cannot be proxied: use ``resolve()`` for that.
    """

    def __init__(self, job: Job) -> None:
        self.__dict__["_job"] = job
        super().__init__(job.result)

    def __await__(self) -> Any:
        return await_job(self.__dict__["_job"]).__await__()

    def __repr__(self) -> str:
        # Never blocks, as Django's SimpleLazyObject.__repr__ never evaluates; once
        # the value is there it shows as itself (Django puts reprs in its messages).
        job: Job = self.__dict__["_job"]
        if job.done() and not job.future.cancelled() and not job.future.exception():
            return repr(job.result(0))
        return f"<LazyObjectResult: {job!r}>"

    def __copy__(self) -> Any:
        return copy.copy(self.__dict__["_job"].result())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A copy is a new, independent object (setUpTestData relies on it), not a
        # second proxy of the same instance.
        return copy.deepcopy(self.__dict__["_job"].result(), memo)


def lazy_result(job: Job, resultclass: type | None) -> Any:
    """``job``'s value as a ``lazy()`` proxy of a builtin type, or an object proxy."""
    if resultclass is None:
        return LazyObjectResult(job)
    proxy = _LAZY_TYPES[resultclass](job)
    proxy._job = job
    return proxy


@runtime_checkable
class BackgroundEvaluable(Protocol):
    """What resolve() and friends need from a background QuerySet."""

    def _background_job(self) -> Job | None: ...

    def _resolve_background(self, timeout: float | None) -> None: ...

    def start(self) -> Any: ...


def is_background_queryset(value: Any) -> bool:
    """Whether ``value`` is an AsyncQuerySet; reads its type only: proxies stay lazy."""
    return issubclass(type(value), BackgroundEvaluable)


def job_of(value: Any) -> Job | None:
    # Only type(value), never isinstance(): on a miss isinstance() reads
    # value.__class__, which evaluates an object proxy.
    kind = type(value)
    if issubclass(kind, LazyObjectResult):
        return value.__dict__["_job"]
    if issubclass(kind, Promise):
        return vars(value).get("_job")
    if is_background_queryset(value):
        return value._background_job()
    return None


def resolve(value: T, timeout: float | None = DEFAULT) -> T:
    """The concrete value behind a lazy result; plain values pass through.

    A background QuerySet is waited for and returned with its result cache filled.

    Raises:
        ResultTimeout, Cancelled, or the exception the background job raised.
    """
    if is_background_queryset(value):
        value._resolve_background(_timeout(timeout))  # type: ignore[attr-defined]
        return value
    job = job_of(value)
    return value if job is None else job.result(timeout)


def _wait_all(
    futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None, what: str
) -> None:
    timeout = _timeout(timeout)
    futures = list(futures)
    _, not_done = concurrent.futures.wait(futures, timeout)
    if not_done:
        raise ResultTimeout(
            f"{len(not_done)} of {len(futures)} of {what} not ready after "
            f"{timeout:.2f} s."
        )


def wait(*values: Any, timeout: float | None = DEFAULT) -> None:
    """Block until every given lazy result or background QuerySet is ready.

    Starts background QuerySets that are not started yet. Does not raise the jobs'
    exceptions: those surface where each result is used.

    Raises:
        ResultTimeout: some were not ready within ``timeout``.
    """
    futures = []
    for value in values:
        if is_background_queryset(value) and value._background_job() is None:
            value.start()
        job = job_of(value)
        if job is not None:
            futures.append(job.future)
    _wait_all(futures, timeout, "the background results")


def is_ready(value: Any) -> bool:
    """Whether using ``value`` now would not block (plain values are always ready)."""
    job = job_of(value)
    if job is not None:
        return job.done()
    if is_background_queryset(value):
        return getattr(value, "_result_cache", None) is not None
    return True


def cancel(value: Any) -> bool:
    """Cancel the job behind ``value`` if it has not started; True if it is cancelled.

    Using a cancelled result raises ``Cancelled``.
    """
    job = job_of(value)
    return job is not None and job.future.cancel()
