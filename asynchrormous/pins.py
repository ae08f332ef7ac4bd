"""Pins: a worker held by one asyncio task for an ``atomic()`` block or a stream.

The pinned worker's thread and connection serve only that task's work, in order;
which work belongs to which pin is decided here (``pinned()``).
"""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from django.db import connections
from django.db.transaction import TransactionManagementError

from .exceptions import Cancelled
from .pool import PoolClosed, WorkerPool, WorkItem

__all__ = ["Pin", "pin_board", "pinned", "pins", "stream_pins", "task_pin"]

logger = logging.getLogger("asynchrormous")

T = TypeVar("T")


class _PinBoard:
    """The pins of one pool: its free slots, the blocks waiting for one, and the
    pins that shutdown() must end."""

    def __init__(self, size: int) -> None:
        self.lock = threading.Lock()
        self.free = size
        self.waiters: collections.deque[Future[bool]] = collections.deque()
        self.pins: set[Pin] = set()
        self.closed: str | None = None

    def claim(self) -> Future[bool]:
        """A future that gets True once this caller holds a slot (it may be already)."""
        future: Future[bool] = Future()
        with self.lock:
            if self.closed is not None:
                future.set_exception(Cancelled(self.closed))
            elif self.free:
                self.free -= 1
                future.set_result(True)
            else:
                self.waiters.append(future)
        return future

    def give_up(self, claim: Future[bool]) -> None:
        """The claimant stopped waiting (timeout, cancel): return a slot it got."""
        if claim.cancel():
            return
        if claim.exception() is None and claim.result():
            self.give_back()

    def give_back(self) -> None:
        with self.lock:
            while self.waiters:
                waiter = self.waiters.popleft()
                if waiter.set_running_or_notify_cancel():  # False: it gave up
                    waiter.set_result(True)
                    return
            self.free += 1

    def close(self, reason: str) -> None:
        with self.lock:
            self.closed = reason
            waiters, self.waiters = list(self.waiters), collections.deque()
            pins = list(self.pins)
        for waiter in waiters:
            if waiter.set_running_or_notify_cancel():
                waiter.set_exception(Cancelled(reason))
        for pin in pins:
            pin.close(reason)


_boards: weakref.WeakKeyDictionary[WorkerPool, _PinBoard] = weakref.WeakKeyDictionary()
_boards_lock = threading.Lock()


def _new_boards_lock() -> None:
    # A forked child has no thread that could release the parent's.
    global _boards_lock
    _boards_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_boards_lock)


def pin_board(pool: WorkerPool) -> _PinBoard:
    """The pool's pins. They may hold all workers but one, so unpinned work always
    has a worker (with a single worker, a pin holds it and other work waits)."""
    with _boards_lock:
        board = _boards.get(pool)
        if board is None:
            board = _boards[pool] = _PinBoard(max(1, pool.settings.workers - 1))
            pool.shutdown_hooks.append(board.close)
        return board


class Pin:
    """A worker held by one asyncio task, for a transaction or a stream; its jobs run
    there in order, on one thread and connection.

    It is itself one long job on the pool, serving only this task's queue, so the
    connection is never lent to anybody else.
    """

    def __init__(
        self, pool: WorkerPool, alias: str, task: Any, *, holds_slot: bool = True
    ) -> None:
        self.pool = pool
        self.alias = alias
        self.task = task
        self.holds_slot = holds_slot
        #: The worker thread serving it, once it started.
        self.thread: threading.Thread | None = None
        #: Why it takes no more work (set by release() or shutdown()).
        self.closed: str | None = None
        # Set when the block was entered in an async generator (see `open`).
        self.generator: weakref.ref[Any] | None = None
        self.live_generators: Any = None
        self._released = False
        #: Done once its worker served it to the end (a block left open rolled back).
        self.served: Future[None] = Future()
        #: Whether its task's later work waits for ``served`` (see dropped_blocks).
        self.awaited = False
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._board = pin_board(pool)
        with self._board.lock:
            closed = self._board.closed
            if closed is None:
                self._board.pins.add(self)
        if closed is not None:
            self.closed = closed
            raise Cancelled(closed)
        try:
            pool.submit(self._serve)
        except PoolClosed:
            self.close("asynchrormous.shutdown() stopped the pool")
            self.release()
            raise Cancelled("asynchrormous.shutdown() stopped the pool") from None

    @property
    def open(self) -> bool:
        """Whether work of its task still belongs here.

        A block in an async generator the consumer dropped is over for everybody
        else at once: asyncio's finalizer takes it off the loop's list of live
        generators, though the generator's aclose() runs only later.
        """
        if self._released:
            return (
                False  # a pin shutdown() closed still holds its task's work: it fails
            )
        ref = self.generator
        if ref is None:
            return True
        generator = ref()
        return generator is not None and generator in self.live_generators

    def _serve(self) -> None:
        self.thread = threading.current_thread()
        try:
            while (item := self._queue.get()) is not None:
                item.run()
                del item
        finally:
            try:
                _unwind_open_blocks(self.alias)
            finally:
                self.served.set_result(None)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            reason = self.closed
            if reason is None:
                self._queue.put(WorkItem(future, fn, args, kwargs))
                return future
        future.set_running_or_notify_cancel()
        future.set_exception(Cancelled(f"{reason}; the work was not run."))
        return future

    def close(self, reason: str) -> None:
        """Take no more work: fail what is queued; the running job finishes."""
        with self._lock:
            if self.closed is None:
                self.closed = reason
            dropped = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    dropped.append(item)
            self._queue.put(None)
        for item in dropped:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Cancelled(f"{reason}; the work was not run."))

    def release(self) -> None:
        """The block or stream is over: the worker goes back after queued work."""
        with self._lock:
            if self._released:
                return
            self._released = True
            if self.closed is None:
                self.closed = f"the atomic() block or stream on {self.alias!r} ended"
            self._queue.put(None)
        with self._board.lock:
            self._board.pins.discard(self)
        if self.holds_slot:
            self._board.give_back()


def _unwind_open_blocks(alias: str) -> None:
    """Roll back a transaction a pin was left in, so the worker's next job is clean."""
    conn = connections[alias]
    if not conn.in_atomic_block:
        return
    logger.warning("rolling back an atomic() block left open on %r", alias)
    error = Cancelled("the atomic() block was left unfinished")
    try:
        while conn.atomic_blocks:
            conn.atomic_blocks[-1].__exit__(Cancelled, error, None)
    except Exception:
        logger.warning("could not roll back on %r; closing it", alias, exc_info=True)
    if conn.in_atomic_block:
        conn.in_atomic_block = False
        conn.atomic_blocks = []
        conn.savepoint_ids = []
        conn.needs_rollback = False
        conn.close()


#: The pins of the current task, by alias; set by asynchrormous.atomic().
pins: contextvars.ContextVar[dict[str, Pin] | None] = contextvars.ContextVar(
    "asynchrormous_pins", default=None
)

#: Streams (aiterator()) outside any block: task -> alias -> the stream's pin.
stream_pins: weakref.WeakKeyDictionary[Any, dict[str, Pin]] = (
    weakref.WeakKeyDictionary()
)


def task_pin(alias: str, task: Any) -> Pin | None:
    """The open pin of ``task`` itself on ``alias``: its block's, or its stream's."""
    pin = (pins.get() or {}).get(alias)
    if pin is not None and pin.task is task and pin.open:
        return pin
    pin = (stream_pins.get(task) or {}).get(alias) if task is not None else None
    return pin if pin is not None and pin.open else None


def dropped_blocks(alias: str, task: Any) -> list[Pin]:
    """Blocks of ``task`` on ``alias`` in an async generator it dropped, not yet over.

    asyncio rolls such a block back later, in a task of its own. Until then the
    block still holds its locks, so the task's later work on ``alias`` waits for
    it to end, as for the task's own pending writes.
    """
    held = pins.get()
    if not held or task is None:
        return []
    return [
        pin
        for pin in held.values()
        if pin.alias == alias
        and pin.task is task
        and pin.generator is not None
        and not pin.open
        and not pin.served.done()
    ]


def pinned(alias: str, task: Any) -> Pin | None:
    """The pin that work of ``task`` (None: sync code) on ``alias`` must run on.

    Sync code that sees a block's pin in its context was called from the block
    (sync_to_async, to_thread): its work belongs there. A task created inside
    another task's block inherits its context, not its transaction: it must not
    slip its queries into it. Work of the block's task on another alias runs on
    the block's worker too, which may be the only one.
    """
    held = pins.get()
    if held:
        pin = held.get(alias)
        if pin is not None and pin.open:
            if task is None or pin.task is task:
                return pin
            raise TransactionManagementError(
                f"This task was created inside an asynchrormous atomic() block on "
                f"{alias!r} of another task; it cannot join that transaction. Await "
                f"the work in the block's own task (asyncio.timeout() rather than "
                f"wait_for(), no gather(): one transaction has one connection), or "
                f"open an atomic() block in this task."
            )
        if task is not None:
            for pin in held.values():
                if pin.task is task and pin.open:
                    return pin
    if task is not None and stream_pins:
        pin = (stream_pins.get(task) or {}).get(alias)
        if pin is not None and pin.open:
            return pin
    return None
