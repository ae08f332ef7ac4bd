"""Background jobs and the lazy values that stand for their results.

A job runs on the worker pool, or inline on the caller's thread when the caller is
inside a transaction on the job's database (read-your-writes) or is itself a worker
(no deadlock on a full pool). A sync caller that needs a result no worker has picked
up yet runs the job itself (caller-runs), on its own open connection. Either way its
outcome lives in a ``concurrent.futures.Future`` and surfaces where it is first used.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import copy
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from django.db import InterfaceError, OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils.functional import Promise, SimpleLazyObject, lazy

from . import outages
from .conf import get_settings
from .exceptions import Cancelled, ResultTimeout
from .pins import dropped_blocks, pinned
from .pool import PoolClosed, WorkItem, _ended_by_server, get_pool, in_job, in_worker
from .signals import instrumented

__all__ = [
    "Job",
    "LazyObjectResult",
    "await_future",
    "await_job",
    "cancel",
    "is_background_queryset",
    "is_ready",
    "job_of",
    "lazy_result",
    "prerequisites",
    "read_own_writes",
    "resolve",
    "run_after",
    "submit",
    "track_pending",
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
    """One background evaluation: its Future, its name, whether its outcome was seen.

    Jobs derived from one another (``count()`` of a started fetch) share one
    Future, and one record of whether its outcome was seen: an exception raised to
    any of them is not reported again. One nobody saw is logged once, when the
    last of them is gone, or when the job ends if that is later (as asyncio logs
    "exception was never retrieved").
    """

    __slots__ = (
        "__weakref__",
        "after",
        "alias",
        "cancelled",
        "description",
        "future",
        "running",
        "transform",
        "work",
    )

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        description: str,
        transform: Callable[[Any], Any] | None = None,
        running: Running | None = None,
        work: WorkItem | None = None,
        alias: str | None = None,
        after: list[concurrent.futures.Future[Any]] | None = None,
    ) -> None:
        self.future = future
        self.description = description
        self.transform = transform
        self.running = running
        #: The queued pool item, which a waiting caller may take over; its database,
        #: and the caller's earlier jobs it must come after.
        self.work = work
        self.alias = alias
        self.after = after
        #: Cancelled by ``cancel()`` while its Future served others too: only this
        #: result raises Cancelled; the job goes on for them.
        self.cancelled = False
        with _handles_lock:
            future.handles = getattr(future, "handles", 0) + 1  # type: ignore[attr-defined]
            # Handles not cancelled: at none, nobody is left to use the job.
            future.live = getattr(future, "live", 0) + 1  # type: ignore[attr-defined]

    @property
    def observed(self) -> bool:
        return getattr(self.future, "observed", False)

    @observed.setter
    def observed(self, value: bool) -> None:
        self.future.observed = value  # type: ignore[attr-defined]

    def derive(self, transform: Callable[[Any], Any], description: str) -> Job:
        """A job whose value is ``transform(this job's value)``: count() of a fetch."""
        inner = self.transform
        if inner is not None:  # count() of a slice of a fetch
            outer = transform

            def transform(value: Any) -> Any:
                return outer(inner(value))

        return Job(
            self.future,
            description,
            transform,
            self.running,
            self.work,
            self.alias,
            self.after,
        )

    def abandon(self) -> None:
        """Nobody will use this job's outcome (a write made its rows stale)."""
        self.observed = True

    def cancel(self) -> bool:
        """Cancel this result if its job has not started; True if it is cancelled.

        A job that other results share (a started fetch and the count() derived
        from it) goes on for them: only this result is cancelled. Once every one
        of them is, the job itself is dropped.
        """
        future = self.future
        with _handles_lock:
            if self.cancelled or future.cancelled():
                return True
            if future.running() or future.done():
                return False
            self.cancelled = True
            future.live -= 1  # type: ignore[attr-defined]
            if future.live:  # type: ignore[attr-defined]
                return True
        if future.cancel():
            return True
        with _handles_lock:  # a worker took it meanwhile: this result stands
            self.cancelled = False
            future.live += 1  # type: ignore[attr-defined]
        return False

    def done(self) -> bool:
        return self.cancelled or self.future.done()

    def result(self, timeout: float | None = DEFAULT) -> Any:
        """The value; raises the worker's exception with its type and traceback.

        A job no worker has picked up yet is run here, on this thread's open
        connection, instead of waited for (see ``take_over``), unless an explicit
        ``timeout`` bounds the wait.

        Raises:
            ResultTimeout: not ready within ``timeout`` (default: the TIMEOUT setting).
                The job goes on; the next call waits for the same job. (A job
                that never ran, because the caller's earlier jobs it comes after
                outlasted TIMEOUT, raises its own ResultTimeout for good.)
            Cancelled: the job was cancelled before it ran.
        """
        if self.cancelled:
            raise Cancelled(f"{self.description} was cancelled before it ran.")
        if self.work is not None and (timeout is DEFAULT or timeout is None):
            self.take_over()
        timeout = _timeout(timeout)
        try:
            exc = self.future.exception(timeout)
        except concurrent.futures.CancelledError:
            self.observed = True
            message = f"{self.description} was cancelled before it ran."
            raise Cancelled(message) from None
        except concurrent.futures.TimeoutError:
            raise ResultTimeout(
                f"{self.description} was not ready after {timeout:.2f} s; raise "
                f"ASYNCHRORMOUS['TIMEOUT'] or pass resolve(..., timeout=...)."
            ) from None
        self.observed = True
        if exc is not None:
            raise exc
        value = self.future.result()
        return value if self.transform is None else self.transform(value)

    def take_over(self) -> bool:
        """Run the job on this thread if no worker has picked it up; True if it did.

        The caller-runs policy of fork/join pools: a saturated pool then costs a
        caller no more than running the query itself, and a result used right after
        it was started needs no hand-off to a worker and back. The claim is atomic:
        a job runs once, on a worker or here, never on both.
        """
        work = self.work
        if work is None or work.claimed or not get_settings().caller_runs:
            return False
        if self.after and self.alias is not None:
            # The caller's own earlier jobs this one comes after: run those no
            # worker has picked up here first, in order, rather than wait for them.
            _run_own_jobs_here(self.alias, self.after)
        if not _may_run_here(self.alias, self.after):
            return False
        self.work = None
        with _as_on_a_worker(self.alias):
            return work.run_here()

    def __repr__(self) -> str:
        state = self.future._state.lower()  # PENDING, RUNNING, FINISHED, CANCELLED…
        return f"<Job {self.description} {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling a lazy result pickles its value, as pickling a QuerySet does.
        return (_finished_job, (self.result(), self.description))

    def __del__(self) -> None:
        future = self.future
        with _handles_lock:
            future.handles -= 1  # type: ignore[attr-defined]
            if not self.cancelled:
                future.live -= 1  # type: ignore[attr-defined]
            left, live = future.handles, future.live  # type: ignore[attr-defined]
        if left:
            if not live:  # only cancelled results hold it: nobody can use the job
                future.cancel()
            return
        if not self.observed:
            future.add_done_callback(_reporter(self.description))


# Reentrant: a garbage collection while it is held may run another Job's __del__.
_handles_lock = threading.RLock()


def _new_handles_lock() -> None:
    # A forked child has no thread that could release the parent's.
    global _handles_lock
    _handles_lock = threading.RLock()


os.register_at_fork(after_in_child=_new_handles_lock)


def _reporter(description: str) -> Callable[[concurrent.futures.Future[Any]], None]:
    def report(future: concurrent.futures.Future[Any]) -> None:
        if getattr(future, "observed", False) or future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            logger.error(
                "Exception in background %s was never retrieved",
                description,
                exc_info=exc,
            )

    return report


def _may_run_here(
    alias: str | None, after: list[concurrent.futures.Future[Any]] | None
) -> bool:
    """Whether this thread may run a job on ``alias`` that comes ``after`` those
    jobs itself, rather than wait for a worker.

    Not on an event loop's thread (a query would block the loop); only on a
    connection the thread already holds, outside a transaction (the job is not
    part of it), so a caller never opens a connection of its own for this; not on
    one it shares with another thread, nor on one the server has ended; and
    only once the caller's earlier jobs that it comes after are done, so writes
    keep their order.
    """
    if asyncio._get_running_loop() is not None or alias not in connections.settings:
        return False
    conn = connections[alias]
    if conn.connection is None and in_worker() and not conn.in_atomic_block:
        # A worker may open one: it is one of the WORKERS a job may hold.
        return not after or all(f.done() for f in after)
    if conn.connection is None or conn.in_atomic_block or not conn.autocommit:
        return False
    if conn.allow_thread_sharing:
        return False  # shared (LiveServerTestCase): another thread may be using it
    if not after or all(f.done() for f in after):
        # Not on a connection the server ended while it sat idle: a worker notices
        # that before its job, and a write must not fail for it.
        return not _ended_by_server(conn.connection)
    return False


def _run_own_jobs_here(
    alias: str, futures: list[concurrent.futures.Future[Any]]
) -> None:
    """Before a caller's plain query waits for its own pending jobs, run those no
    worker has picked up yet here, each once the jobs it comes after are done.

    The jobs those come after are the caller's own too (a write after a queued
    read): they run here first, in order, rather than leave the query waiting for
    a worker.
    """
    if not get_settings().caller_runs:
        return
    futures = _with_prerequisites(futures)
    progress = True
    while progress:
        progress = False
        for future in futures:
            ref = getattr(future, "work", None)
            work = ref() if ref is not None else None
            if (
                work is not None
                and not work.claimed
                and _may_run_here(alias, getattr(future, "after", None))
            ):
                with _as_on_a_worker(alias):
                    progress = work.run_here() or progress


@contextlib.contextmanager
def _as_on_a_worker(alias: str | None) -> Any:
    """While the caller runs a job on its connection, the job's statements are not
    the caller's: its ``execute_wrapper()`` blocks (a query blocker, a counter) and
    its captured queries (``assertNumQueries``, ``connection.queries``) see none of
    them, as when a worker runs the job. Whoever runs a job, it behaves the same.
    """
    if alias is None or alias not in connections.settings:
        yield
        return
    conn = connections[alias]
    # A job of this thread that runs another lends it its connection: a cancel of
    # the lender must not stop the borrower's statements (it sends none meanwhile).
    lender = getattr(_this_thread, "job", None)
    lent = lender.lend() if lender is not None else None
    state = (conn.execute_wrappers, conn.force_debug_cursor, conn.queries_log)
    # The library's own (a write's cache invalidation) stay.
    conn.execute_wrappers = [
        wrapper
        for wrapper in conn.execute_wrappers
        if getattr(wrapper, "on_every_connection", False)
    ]
    conn.force_debug_cursor = False
    conn.queries_log = collections.deque(maxlen=conn.queries_log.maxlen)
    try:
        yield
    finally:
        conn.execute_wrappers, conn.force_debug_cursor, conn.queries_log = state
        if lender is not None:
            lender.take_back(lent)


def _with_prerequisites(
    futures: list[concurrent.futures.Future[Any]],
) -> list[concurrent.futures.Future[Any]]:
    """``futures`` and, transitively, the not yet done jobs each comes after."""
    found: dict[int, concurrent.futures.Future[Any]] = {}
    stack = list(futures)
    while stack:
        future = stack.pop()
        if id(future) in found or future.done():
            continue
        found[id(future)] = future
        stack.extend(getattr(future, "after", None) or ())
    return list(found.values())


def _finished_job(value: Any, description: str) -> Job:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_result(value)
    return Job(future, description)


# -- Submission -----------------------------------------------------------------


class Running:
    """Where a job runs: the worker's connection, so its statement can be cancelled.

    A cancel is delivered under ``lock``, and the job ends only under it: so a
    cancel reaches the server while this job's statement runs, never after the
    worker has moved on to its next job on the same connection. A server ignores
    a cancel that finds no statement running, so once cancelled the job sends no
    further statement, and a job that has sent one is cancelled again until it ends.
    """

    __slots__ = (
        "alias",
        "cancelled",
        "connection",
        "lock",
        "mysql_thread_id",
        "sent",
    )

    #: Seconds between two cancels of a statement that has not ended yet.
    RESEND = 0.1

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.cancelled = False
        self.connection: Any = None
        self.lock = threading.Lock()
        self.mysql_thread_id: int | None = None
        self.sent = False  # a statement of the job has gone to the server

    def track(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            since = outages.epoch
            wrapper = connections[self.alias]
            # The job's own record of the jobs it submits (with CALLER_RUNS): they
            # come after nothing of its caller's, since the job itself came after it.
            outer = _pending.set(None)
            lender = getattr(_this_thread, "job", None)
            try:
                if wrapper.vendor == "mysql":
                    # mysqlclient refuses thread_id() while another thread uses the
                    # connection, so learn the session id before the statement starts.
                    wrapper.ensure_connection()
                    self.mysql_thread_id = wrapper.connection.thread_id()
                with self.lock:
                    self._refuse_if_cancelled()
                    self.connection = wrapper
                _this_thread.job = self
                wrapper.execute_wrappers.append(self._guard)
                try:
                    result = fn(*args)
                finally:
                    self._ended(wrapper)
            except (OperationalError, InterfaceError) as exc:
                if outages.lost(wrapper):
                    outages.failed(self.alias, exc, since)
                raise
            finally:
                _pending.reset(outer)
                _this_thread.job = lender
            if outages.down:  # a plain check: nothing more while no alias is down
                outages.succeeded(self.alias, since)
            return result

        return run

    def _ended(self, wrapper: Any) -> None:
        """The job sends no more statements: a cancel of it reaches none of them."""
        wrapper.execute_wrappers.remove(self._guard)
        with self.lock:
            self.connection = None

    def lend(self) -> Any:
        """This thread runs another job on the connection: a cancel of this one,
        which sends no statement meanwhile, must not reach that job's."""
        with self.lock:
            lent, self.connection = self.connection, None
        return lent

    def take_back(self, lent: Any) -> None:
        with self.lock:
            if self.connection is None:
                self.connection = lent

    def _refuse_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("the job was cancelled before its statement ran.")

    def _guard(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        with self.lock:
            self._refuse_if_cancelled()
            self.sent = True
        return execute(sql, params, many, context)

    def cancel(self) -> None:
        """Ask the database to stop this job's statement, if it is still running.

        From a new thread (a cancel request may take a round trip), and not a
        daemon one: a cancel lost at interpreter exit would leave the statement
        running on the server.
        """
        with self.lock:
            self.cancelled = True
            running = self.sent
        if running:
            threading.Thread(target=self._deliver_cancel).start()

    def _deliver_cancel(self) -> None:
        # A cancel that reaches the server before the statement does is ignored
        # there: send it again until the job ends, at most TIMEOUT seconds.
        timeout = get_settings().timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with self.lock:
                wrapper = self.connection
                raw = getattr(wrapper, "connection", None)
                if raw is None:
                    return  # the job has ended
                self._send_cancel(wrapper, raw)
            time.sleep(self.RESEND)

    def _send_cancel(self, wrapper: Any, raw: Any) -> None:
        if wrapper.vendor == "postgresql":
            # Returns once the server has the request, so it cannot reach the
            # worker's next statement.
            getattr(raw, "cancel_safe", raw.cancel)()
        elif wrapper.vendor == "sqlite":
            raw.interrupt()  # thread-safe, by sqlite3's documentation
        elif wrapper.vendor == "mysql" and self.mysql_thread_id is not None:
            _kill_mysql_query(wrapper.get_connection_params(), self.mysql_thread_id)


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


# The job this thread is running (a worker's, or one it took over), if any.
_this_thread = threading.local()


class _Pending:
    """One caller's background jobs that may still run, by alias.

    A caller is a thread or an asyncio task. ``parent`` is the caller whose
    context this one inherited (a task's creator; the sync thread an
    ``async_to_sync`` helper runs for): its earlier jobs come first too.
    """

    __slots__ = ("owner", "parent", "pid", "reads", "writes")

    def __init__(self, owner: Any, parent: _Pending | None) -> None:
        self.owner = owner
        self.parent = parent
        self.pid = os.getpid()
        self.reads: dict[str, list[concurrent.futures.Future[Any]]] = {}
        self.writes: dict[str, list[concurrent.futures.Future[Any]]] = {}


_pending: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "asynchrormous_pending", default=None
)


def current_task() -> asyncio.Task[Any] | None:
    # Without raising and catching RuntimeError in a thread with no event loop.
    loop = asyncio._get_running_loop()
    return None if loop is None else asyncio.current_task(loop)


def _callers_pending() -> _Pending:
    """The calling thread's, or asyncio task's, own record of background jobs.

    Per task, not per event-loop thread: concurrent tasks never wait on each other.
    A forked child starts with none: its parent's jobs are not its own.
    """
    return _pending_of(current_task())


def _pending_of(task: asyncio.Task[Any] | None) -> _Pending:
    owner = threading.current_thread() if task is None else task
    pending = _pending.get()
    if pending is None or pending.owner is not owner or pending.pid != os.getpid():
        # A job's nested work does not come after its caller's: the job did.
        inherits = pending is not None and pending.pid == os.getpid() and not in_job()
        parent = pending if inherits else None
        pending = _Pending(owner, parent)
        _pending.set(pending)
    return pending


def prerequisites(alias: str, *, writes: bool) -> list[concurrent.futures.Future[Any]]:
    """What this caller's next job on ``alias`` must wait for, as in plain code.

    Every job waits for the caller's earlier writes (it reads them); a write also
    waits for the caller's earlier reads (they read the rows as they were).
    """
    return _prerequisites(_callers_pending(), alias, writes)


def _prerequisites(
    record: _Pending | None, alias: str, writes: bool
) -> list[concurrent.futures.Future[Any]]:
    kinds = ("writes", "reads") if writes else ("writes",)
    for kind in ("writes", "reads"):
        own = getattr(record, kind).get(alias)
        if own:
            own[:] = [f for f in own if not f.done()]
    found: list[concurrent.futures.Future[Any]] = []
    while record is not None:
        for kind in kinds:
            found.extend(
                f for f in getattr(record, kind).get(alias, ()) if not f.done()
            )
        record = record.parent
    return found


class _Barrier:
    """Execute wrapper on a caller's connection: its pending jobs come first.

    Installed while the caller has background jobs in flight, so a plain query it
    makes afterwards reads its own writes without calling ``resolve()``, and a
    plain write comes after its earlier reads. It goes first in the list, so a
    user's ``execute_wrapper()`` block still pops its own. Another thread sharing
    the connection (LiveServerTestCase) waits for its own jobs only, and never
    removes it.
    """

    def __init__(self, alias: str, owner: _Pending) -> None:
        self.alias = alias
        self.owner = owner

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        self.drain(writes=not _is_read(sql))
        return execute(sql, params, many, context)

    def drain(self, *, writes: bool = True) -> None:
        pending = prerequisites(self.alias, writes=writes)
        if pending:
            _run_own_jobs_here(self.alias, pending)
            what = f"the pending background jobs on {self.alias!r}"
            _wait_all(pending, DEFAULT, what)
        owner = self.owner
        if owner.pid != os.getpid():
            owner = _callers_pending()  # a forked child's: the parent's jobs are not
        # Its caller's (or another context's of this thread, once that is over):
        # a thread sharing the connection must not remove it under its caller.
        mine = _callers_pending() is owner or owner.owner is threading.current_thread()
        if mine and not _prerequisites(owner, self.alias, True):
            wrappers = connections[self.alias].execute_wrappers
            if self in wrappers:
                wrappers.remove(self)


def read_own_writes(alias: str) -> None:
    """Wait for (or run) the caller's pending background writes on ``alias``.

    What its ``_Barrier`` does before a statement, for a read answered without
    one (from the cache).
    """
    for wrapper in list(connections[alias].execute_wrappers):
        if isinstance(wrapper, _Barrier):
            wrapper.drain(writes=False)


def _is_read(sql: str) -> bool:
    return sql.lstrip()[:6].upper() == "SELECT"


def track_pending(
    alias: str,
    future: concurrent.futures.Future[Any],
    *,
    writes: bool,
    pending: _Pending | None = None,
) -> None:
    if pending is None:
        pending = _callers_pending()
    (pending.writes if writes else pending.reads).setdefault(alias, []).append(future)
    wrappers = connections[alias].execute_wrappers
    if not any(isinstance(w, _Barrier) and w.owner is pending for w in wrappers):
        wrappers.insert(0, _Barrier(alias, pending))


def _join_nested() -> None:
    """End a job with the jobs it submitted: run those no worker has picked up,
    and wait for the rest (at most TIMEOUT), as a plain call ends with its work.

    So a caller that used the job's result reads the nested jobs' writes. Those
    still running after TIMEOUT go on, and are logged: the job's own outcome
    stands (its write landed; a ResultTimeout would invite a retry).
    """
    record = _pending.get()
    if record is None or record.owner is not threading.current_thread():
        return
    for alias in {*record.reads, *record.writes}:
        futures = _prerequisites(record, alias, True)
        if futures:
            _run_own_jobs_here(alias, futures)
            _, not_done = concurrent.futures.wait(futures, _timeout(DEFAULT))
            if not_done:
                logger.warning(
                    "a background job ended with %d of the jobs it started on %r "
                    "still running after TIMEOUT; they go on",
                    len(not_done),
                    alias,
                )


def _jobs_first(set_autocommit: Callable[..., Any]) -> Callable[..., Any]:
    """A worker's job that begins a transaction first ends the nested jobs it
    submitted on that database, as plain code ran them before the block.

    Inside the block they cannot run on its connection (a rollback would undo
    them), and with every worker busy, none other would run them before TIMEOUT.
    """

    @functools.wraps(set_autocommit)
    def begin(self: Any, autocommit: bool, *args: Any, **kwargs: Any) -> Any:
        if not autocommit and in_worker() and not self.in_atomic_block:
            for wrapper in list(self.execute_wrappers):
                if isinstance(wrapper, _Barrier):
                    wrapper.drain()
        return set_autocommit(self, autocommit, *args, **kwargs)

    return begin


BaseDatabaseWrapper.set_autocommit = _jobs_first(  # type: ignore[method-assign]
    BaseDatabaseWrapper.set_autocommit
)


def _ending_with_nested(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, which ends with the jobs it submitted (``_join_nested``)."""

    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        finally:
            _join_nested()

    return run


def run_after(
    prerequisites: list[concurrent.futures.Future[Any]],
    timeout: float | None,
    description: str,
    fn: Callable[..., Any],
    *args: Any,
) -> Any:
    """Run ``fn(*args)`` once the caller's earlier jobs are done, as in plain code.

    Earlier futures were queued first, so they are running or done: no deadlock.
    Still running after ``timeout``, they are not overtaken (a read would see the
    rows as they were before the caller's own write): this job fails instead.
    """
    _, not_done = concurrent.futures.wait(prerequisites, timeout)
    if not_done:
        raise ResultTimeout(
            f"{description} did not run: {len(not_done)} of the caller's earlier "
            f"background jobs it comes after were not done after {timeout:.2f} s; "
            f"raise ASYNCHRORMOUS['TIMEOUT']."
        )
    return fn(*args)


def must_run_inline(alias: str) -> bool:
    """Whether work on ``alias`` must run on the caller's own thread and connection.

    Inside a transaction the caller's uncommitted rows are visible only to its own
    connection. Inside a job, waiting on the pool could deadlock it, unless waits
    help: with CALLER_RUNS a worker's job submits its nested work, and runs itself
    whatever of it no other worker has picked up when it needs it (at the latest
    when the job ends, ``_join_nested``). A job a caller took over runs it inline.
    """
    if in_job() and not (in_worker() and get_settings().caller_runs):
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
    # A job run on the pool ends with its nested jobs, and is reported after them.
    fn = instrumented(
        fn if inline else _ending_with_nested(fn), alias, description, inline
    )
    if inline:
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return Job(future, description)
    # Every job: its statement may be cancelled, and its failure may be an outage.
    running = Running(alias)
    fn = running.track(fn)
    task = current_task()
    pin = pinned(alias, task)
    if pin is not None:
        # Inside the task's async atomic() block: on its worker, in order.
        return Job(pin.submit(fn, *args), description, running=running)
    for dropped in dropped_blocks(alias, task):
        if not dropped.awaited:
            dropped.awaited = True
            track_pending(alias, dropped.served, writes=True)
    pending = _pending_of(task)
    before = _prerequisites(pending, alias, writes)
    # A job's nested work is run to its end at shutdown, as a write is: the job
    # that waits for it is running.
    keep = writes or in_job()
    if before:
        work = _on_the_pool(
            keep,
            description,
            run_after,
            before,
            get_settings().timeout,
            description,
            fn,
            *args,
        )
    else:
        work = _on_the_pool(keep, description, fn, *args)
    track_pending(alias, work.future, writes=writes, pending=pending)
    # For a plain query of the caller that must wait for it (_run_own_jobs_here).
    work.future.work = weakref.ref(work)  # type: ignore[attr-defined]
    work.future.after = before  # type: ignore[attr-defined]
    return Job(
        work.future, description, running=running, work=work, alias=alias, after=before
    )


def _on_the_pool(
    writes: bool, description: str, fn: Callable[..., Any], *args: Any
) -> WorkItem:
    while True:
        pool = get_pool()
        try:
            return pool.submit_job(fn, args, writes=writes, description=description)
        except PoolClosed:
            continue  # shutdown() won the race: the next get_pool() is a new pool


# -- Awaiting from asyncio -------------------------------------------------------


async def await_job(job: Job, *, owned: bool = True) -> Any:
    """The job's value, waited for at most TIMEOUT; raises as ``Job.result()``.

    Cancelling the awaiting task cancels the job only if it is ``owned``: made for
    this await alone (a shared fetch or lazy result goes on for its other users).
    A queued job is dropped; a running statement is cancelled on the database, and
    the worker's connection stays usable (or is replaced before its next job).

    Raises:
        ResultTimeout: not ready within TIMEOUT; the job goes on.
        Cancelled: someone else cancelled the job (``cancel()``, ``shutdown()``).
    """

    def abandon() -> None:
        if owned:
            job.observed = True  # abandoned on purpose: nothing to report
            if not job.future.cancel() and job.running is not None:
                job.running.cancel()

    if not job.cancelled:
        await _until_done(job.future, job.description, abandon)
    return job.result(0)


async def await_future(future: concurrent.futures.Future[T], description: str) -> T:
    """A future's value (a pin's job), waited for at most TIMEOUT.

    Cancelling the awaiting task drops the job if it is still queued.

    Raises:
        ResultTimeout: not ready within TIMEOUT; the job goes on.
        Cancelled: the job was cancelled (``shutdown()``) before it ran.
    """
    await _until_done(future, description, future.cancel)
    if future.cancelled():
        raise Cancelled(f"{description} was cancelled before it ran.")
    return future.result(0)


async def _until_done(
    future: concurrent.futures.Future[Any],
    description: str,
    on_cancel: Callable[[], Any],
) -> None:
    """Wait for ``future`` without a thread of our own, at most TIMEOUT.

    Only a cancel of the awaiting task raises CancelledError here: a future that
    someone else cancelled is done, and its outcome is the caller's to raise.
    """
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake(_: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_set_ready, ready)

    future.add_done_callback(wake)
    timeout = _timeout(DEFAULT)
    try:
        done, _ = await asyncio.wait((ready,), timeout=timeout)
    except asyncio.CancelledError:
        on_cancel()
        raise
    if not done:
        raise ResultTimeout(
            f"{description} was not ready after {timeout:.2f} s; raise "
            f"ASYNCHRORMOUS['TIMEOUT']."
        )


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


# -- Lazy results ---------------------------------------------------------------


def _value(job: Job) -> Any:
    return job.result()


def _await_proxy(proxy: Any) -> Any:
    return await_job(job_of(proxy), owned=False).__await__()  # type: ignore[arg-type]


def _plain(value: T) -> T:
    return value


def _reduce_proxy(proxy: Any) -> tuple[Any, ...]:
    return (_plain, (resolve(proxy),))


def _copy_proxy(proxy: Any) -> Any:
    return copy.copy(resolve(proxy))


def _deepcopy_proxy(proxy: Any, memo: dict[int, Any]) -> Any:
    return copy.deepcopy(resolve(proxy), memo)


def _awaitable_lazy(resultclass: type) -> Callable[[Job], Any]:
    """``lazy(_value, resultclass)``, whose proxies can also be awaited.

    A copy or a pickle of one is the plain value (Django's proxy pickles as a
    new proxy of a job that is gone, and copies as itself).
    """
    make = lazy(_value, resultclass)
    # lazy() made this proxy class for us alone, so it may gain methods.
    proxy: Any = type(make(None))  # type: ignore[arg-type]
    proxy.__await__ = _await_proxy
    proxy.__reduce__ = _reduce_proxy
    proxy.__copy__ = _copy_proxy
    proxy.__deepcopy__ = _deepcopy_proxy
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
        return await_job(self.__dict__["_job"], owned=False).__await__()

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
        _timeout(timeout)  # a bad value raises here
        # DEFAULT as it is: only a wait without an explicit timeout runs the job here.
        value._resolve_background(timeout)  # type: ignore[attr-defined]
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
    return job is not None and job.cancel()
