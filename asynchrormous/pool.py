"""The process-wide worker pool: threads that keep their own Django connections.

A ``concurrent.futures.Executor`` of our own rather than ``ThreadPoolExecutor``
because a Django connection belongs to the thread that opened it: only the worker
itself can close it when it goes idle or too old, so the worker loop must own that.
A caller that needs a queued item's result may run it itself (``WorkItem.run_here``):
whichever thread claims an item first runs it, and only that one.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import logging
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from django.core.signals import setting_changed
from django.db import InterfaceError, OperationalError, connections
from django.db.backends.base.creation import BaseDatabaseCreation
from django.dispatch import receiver

from .conf import Settings, get_settings

__all__ = [
    "PoolClosed",
    "WorkItem",
    "WorkerPool",
    "get_pool",
    "in_job",
    "in_worker",
    "read_with_reconnect",
    "shutdown",
]

logger = logging.getLogger("asynchrormous")

P = ParamSpec("P")
T = TypeVar("T")

_worker_state = threading.local()

# The process that built the pools; a forked child's is its own (see
# _after_fork_in_child): it never runs its parent's queued work.
_pid = os.getpid()

# Makes one thread's claim of a WorkItem win: a worker's, or a waiting caller's.
_claims = threading.Lock()

#: ``shutdown()``'s default timeout: the TIMEOUT setting.
DEFAULT_TIMEOUT: Any = object()


def in_worker() -> bool:
    """Whether this thread is a pool worker."""
    return getattr(_worker_state, "is_worker", False)


def in_job() -> bool:
    """Whether this thread is running a job: a worker, or a caller that took one
    over (nested work then runs inline, and no write barrier holds it back)."""
    return getattr(_worker_state, "is_worker", False) or getattr(
        _worker_state, "running", False
    )


def read_with_reconnect(alias: str, fn: Callable[..., T], *args: Any) -> T:
    """Run a read job; if the worker's kept connection died while idle, retry once.

    A server restart or an idle-connection reaper kills kept connections unseen;
    only the next statement notices. Reads are safe to repeat, writes are not.
    """
    try:
        return fn(*args)
    except (OperationalError, InterfaceError):
        conn = connections[alias]
        if not in_worker() or conn.in_atomic_block:
            raise
        if conn.connection is not None and conn.is_usable():
            raise
        # Not a warning: a replaced connection costs the caller nothing, and an
        # outage is logged once, by the job (results.Running.track).
        logger.debug("replacing a lost connection to %r and retrying", alias)
        conn.close()
        return fn(*args)


try:  # asgiref >= 3.12 tags a Local's storage with the thread that owns it.
    from asgiref.local import _rehome, _Storage
except ImportError:  # older asgiref: a Local is a plain contextvar
    _Storage = None  # type: ignore[assignment,misc]


def _own_locals(context: contextvars.Context) -> None:
    """Give a job's context its own copy of the caller's asgiref ``Local`` values.

    Before 3.12 a Local keeps one dict per context and changes it in place, so a
    context copied inside ``timezone.override()`` lost the value when the block
    ended, before the job ran.
    """
    for var, value in context.items():
        if var.name == "asgiref.local" and type(value) is dict:
            context.run(var.set, dict(value))


def _adopt_locals(context: contextvars.Context) -> None:
    """Make the caller's asgiref ``Local`` values (active time zone, language) ours.

    asgiref hides a Local's storage from threads it did not move it to, so in a
    worker ``timezone.override()`` would not hold; asgiref's own thread hops re-home
    the storage the same way.
    """
    for var, value in context.items():
        if isinstance(value, _Storage):
            var.set(_rehome(value))


class WorkItem:
    __slots__ = (
        "__weakref__",
        "args",
        "claimed",
        "context",
        "description",
        "fn",
        "future",
        "kwargs",
        "pid",
        "writes",
    )

    def __init__(
        self,
        future: Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        writes: bool = False,
        description: str = "job",
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.writes = writes
        self.description = description
        # The job sees the submitter's contextvars (tenant ids, logging context).
        self.context = contextvars.copy_context()
        if _Storage is None:
            _own_locals(self.context)
        self.claimed = False
        self.pid = _pid

    def claim(self) -> bool:
        """Whether the calling thread is the one to run this item.

        Exactly one claim succeeds, a worker's or a waiting caller's, and none
        after a ``cancel()``: a job never runs twice.
        """
        with _claims:
            if self.claimed:
                return False
            self.claimed = True
        return self.future.set_running_or_notify_cancel()

    def run_here(self) -> bool:
        """Run the item on this thread, which would otherwise wait for it, if no
        worker has claimed it; True if it ran. Never in a forked child, whose copy
        of its parent's queue is not its own."""
        if self.pid != _pid or not self.claim():
            return False
        running = getattr(_worker_state, "running", False)
        _worker_state.running = True
        try:
            self.execute()
        finally:
            _worker_state.running = running
        return True

    def run(self) -> None:
        if self.claim():
            self.execute()

    def execute(self) -> None:
        """Run the claimed item in the submitter's context; set its future."""
        try:
            result = self.context.run(self._call)
        except BaseException as exc:
            self.future.set_exception(exc)
            # Break the cycle exception -> traceback -> frame -> self.
            del exc
        else:
            self.future.set_result(result)

    def _call(self) -> Any:
        if _Storage is not None:
            _adopt_locals(self.context)
        return self.fn(*self.args, **self.kwargs)


def _ended_by_server(raw: Any) -> bool:
    """Whether the server ended this idle connection: something waits on its socket.

    Between jobs a kept connection has nothing to read, unless the server said
    goodbye (PostgreSQL's termination message, or end of file when MariaDB closes
    it). One non-blocking poll, no round trip; SQLite has no socket.
    """
    fileno = getattr(raw, "fileno", None)
    if fileno is None:
        return False
    try:
        fd = fileno()
    except Exception:
        return False  # the driver could not say: let Django's checks decide
    try:
        if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, TypeError):
        return True  # no usable socket left
    return bool(readable)


class _ConnectionKeeper:
    """Per-worker bookkeeping that keeps connections across jobs, with our own max age.

    Django's ``CONN_MAX_AGE = 0`` default would close a connection after every
    query; a worker instead keeps it ``CONNECTION_MAX_AGE`` seconds.
    """

    def __init__(self, max_age: float | None) -> None:
        self.max_age = max_age
        self.known: dict[str, Any] = {}

    def before_job(self) -> None:
        # Drops a connection whose job left it broken, in a transaction, or too old,
        # or that the server ended while it sat idle.
        for conn in connections.all(initialized_only=True):
            if conn.connection is not None:
                try:
                    if _ended_by_server(conn.connection):
                        if getattr(conn, "pool", None):
                            conn.connection.close()  # or the pool lends it out again
                        conn.close()
                        continue
                    conn.close_if_unusable_or_obsolete()
                except Exception:
                    # The job will open a new one, or fail with the reason itself.
                    logger.warning(
                        "could not check the worker's connection to %r; replacing it",
                        conn.alias,
                        exc_info=True,
                    )
                    self._discard(conn)

    def after_job(self) -> None:
        for conn in connections.all(initialized_only=True):
            raw = conn.connection
            if raw is None:
                self.known.pop(conn.alias, None)
            elif self.known.get(conn.alias) is not raw:
                self.known[conn.alias] = raw
                conn.close_at = (
                    None if self.max_age is None else time.monotonic() + self.max_age
                )

    def close_all(self) -> None:
        for conn in connections.all(initialized_only=True):
            self._discard(conn)
        self.known.clear()

    def _discard(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            logger.warning(
                "could not close the worker's connection to %r",
                conn.alias,
                exc_info=True,
            )
            conn.connection = None  # unusable anyway: the next job opens a new one
        self.known.pop(conn.alias, None)


def _worker(
    pool_ref: weakref.ref[WorkerPool],
    work_queue: queue.SimpleQueue[WorkItem | None],
    settings: Settings,
) -> None:
    _worker_state.is_worker = True
    keeper = _ConnectionKeeper(settings.connection_max_age)
    try:
        while True:
            idle_timeout = settings.connection_idle_timeout if keeper.known else None
            try:
                item = work_queue.get(timeout=idle_timeout)
            except queue.Empty:
                keeper.close_all()
                continue
            if item is None:
                return
            if item.claim():  # a waiting caller may have run it already
                keeper.before_job()
                item.execute()
                keeper.after_job()
            del item
            pool = pool_ref()
            if pool is not None:
                pool._idle.release()
            del pool
    except BaseException:
        logger.critical("asynchrormous worker crashed; replacing it", exc_info=True)
        raise
    finally:
        keeper.close_all()
        pool = pool_ref()
        if pool is not None:
            pool._worker_exited(threading.current_thread())


class PoolClosed(RuntimeError):
    """The pool was shut down: a new one takes the work."""


class WorkerPool(Executor):
    """Run jobs on up to ``settings.workers`` threads, each with its own connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False
        #: Called with a reason by the module's shutdown(), before the workers stop.
        self.shutdown_hooks: list[Callable[[str], None]] = []

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        return self._put(WorkItem(Future(), fn, args, kwargs))

    def submit_job(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        *,
        writes: bool,
        description: str,
    ) -> WorkItem:
        """``submit(fn, *args)`` as a WorkItem, which a waiting caller may take over;
        a write is run to its end by ``shutdown()``."""
        item = WorkItem(Future(), fn, args, {}, writes, description)
        self._put(item)
        return item

    def _put(self, item: WorkItem) -> Future[Any]:
        with self._lock:
            if self._shutdown:
                raise PoolClosed("cannot schedule new futures after shutdown")
            self._queue.put(item)
            self._adjust_thread_count()
            return item.future

    def _adjust_thread_count(self) -> None:
        if self._idle.acquire(timeout=0):
            return
        if len(self._threads) < self.settings.workers:
            thread = threading.Thread(
                name=f"asynchrormous-{len(self._threads)}",
                target=_worker,
                args=(weakref.ref(self), self._queue, self.settings),
                daemon=True,
            )
            thread.start()
            self._threads.add(thread)

    def _worker_exited(self, thread: threading.Thread) -> None:
        """A worker left its loop: if the pool still runs, another takes its place."""
        with self._lock:
            self._threads.discard(thread)
            if not self._shutdown:
                self._adjust_thread_count()

    def shutdown(
        self,
        wait: bool = True,
        *,
        cancel_futures: bool = False,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Stop the workers; each closes its connections on the way out.

        Queued writes still run (a submitted write lands or is reported); with
        ``cancel_futures``, queued reads are cancelled. What is still queued when
        ``timeout`` runs out (or at ``deadline``, a ``time.monotonic()`` that
        several pools share) is cancelled, and each write among it logged.
        """
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                kept = []
                for item in self._drain():
                    if item.writes:
                        kept.append(item)
                    else:
                        item.future.cancel()
                for item in kept:
                    self._queue.put(item)
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if not wait:
            return
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is threading.current_thread():
                continue  # shut down from one of its own jobs: it stops after it
            remaining = (
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            thread.join(remaining)
        for item in self._drain():
            if item.future.cancel() and item.writes:
                logger.error(
                    "background %s dropped: shutdown() timed out after %s s before a "
                    "worker ran it",
                    item.description,
                    timeout,
                )
        for _ in threads:
            self._queue.put(None)  # the drain took them: workers still busy stop too
        for thread in threads:
            if thread.is_alive():
                logger.warning(
                    "asynchrormous worker %s still running after shutdown",
                    thread.name,
                )

    def stopped(self) -> bool:
        """Whether every worker has exited (and closed its connections)."""
        with self._lock:
            return not any(thread.is_alive() for thread in self._threads)

    def _drain(self) -> list[WorkItem]:
        items: list[WorkItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> WorkerPool:
    """The process-wide pool, created on first use from the current settings."""
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = WorkerPool(get_settings())
            pool = _pool
    return pool


def shutdown(wait: bool = True, timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Stop the pool and close every worker connection; the next job starts a new pool.

    Queued writes run to completion first; queued reads are cancelled (using one
    raises ``Cancelled``).

    Args:
        wait: block until the workers have exited (and closed their connections).
        timeout: at most this many seconds of waiting (default: the TIMEOUT
            setting); a worker still inside a long statement is then left to
            finish on its own, and writes no worker started are dropped, logged.
    """
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
        if pool is not None:
            _stopping.add(pool)
        # The live pool first: its settings are the current ones.
        stopping = [pool] if pool is not None else []
        stopping += [p for p in _stopping if p is not pool]
    if timeout is DEFAULT_TIMEOUT:
        timeout = stopping[0].settings.timeout if stopping else None
    for pool in stopping:
        # Pinned work and blocks waiting for a worker fail now, and free the workers.
        for hook in pool.shutdown_hooks:
            hook("asynchrormous.shutdown() stopped the pool")
        pool.shutdown(wait=False, cancel_futures=True)
    # One timeout for them all: pools retired by settings changes stop side by side.
    deadline = None if timeout is None else time.monotonic() + timeout
    for pool in stopping:
        pool.shutdown(wait=wait, timeout=timeout, deadline=deadline)
        if pool.stopped():
            _stopping.discard(pool)


# Pools shut down whose workers may still run (shutdown(wait=False), a timeout): a
# later shutdown() waits for them too.
_stopping: set[WorkerPool] = set()


@receiver(setting_changed)
def _restart_on_setting_change(*, setting: str, **kwargs: Any) -> None:
    """The next job starts a pool with the new settings.

    The old pool is retired, not shut down: the work already queued there (other
    callers' reads included) and its pinned blocks run to their end on its
    workers, which then stop; a later ``shutdown()`` waits for them.
    """
    if setting != "ASYNCHRORMOUS":
        return
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
        for retired in [p for p in _stopping if p.stopped()]:
            _stopping.discard(retired)
        if pool is not None:
            _stopping.add(pool)
    if pool is not None:
        pool.shutdown(wait=False)


# A forked child has none of the parent's worker threads; it must build its own pool
# and never use (or close) the parent's connections. The abandoned pool is kept
# referenced so nothing in the child finalizes objects the parent still uses.
_abandoned_in_fork: list[WorkerPool] = []


def _after_fork_in_child() -> None:
    global _pool, _pool_lock, _pid, _claims
    _pid = os.getpid()
    _claims = threading.Lock()
    if _pool is not None:
        _abandoned_in_fork.append(_pool)
    _abandoned_in_fork.extend(_stopping)
    _stopping.clear()
    _pool = None
    _pool_lock = threading.Lock()


def _shut_down_before(destroy_test_db: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(destroy_test_db)
    def destroy(self: BaseDatabaseCreation, *args: Any, **kwargs: Any) -> T:
        shutdown()  # the workers' sessions would keep the database from being dropped
        return destroy_test_db(self, *args, **kwargs)

    return destroy


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)
# Test runners (Django's, pytest-django) destroy test databases this way.
BaseDatabaseCreation.destroy_test_db = _shut_down_before(  # type: ignore[method-assign]
    BaseDatabaseCreation.destroy_test_db
)
