"""Async transactions: ``async with atomic():``; Django's atomic is thread-bound.

The outermost block of a task pins one worker and its connection; every query the
task makes inside it runs there, in order, so the block reads its own writes.
Django's own ``transaction.Atomic`` runs on that thread, so savepoints, ``durable``,
``on_commit`` and the rollback flag behave exactly as in Django.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import AsyncToSync, SyncToAsync, ThreadSensitiveContext
from django.db import DEFAULT_DB_ALIAS
from django.db import transaction as django_transaction
from django.db.backends.signals import connection_created
from django.db.transaction import TransactionManagementError

from . import aio
from .conf import get_settings
from .exceptions import Cancelled, ResultTimeout
from .pins import Pin, pin_board, pins, task_pin
from .pool import get_pool
from .results import await_future, current_task

__all__ = ["AsyncAtomic", "atomic", "get_rollback", "on_commit", "set_rollback"]

F = TypeVar("F", bound=Callable[..., Any])


async def _pin_a_worker(alias: str, task: asyncio.Task[Any]) -> Pin:
    """Hold a worker for ``task``, waiting (bounded by TIMEOUT) while all are pinned."""
    pool = get_pool()
    board = pin_board(pool)
    claim = board.claim()
    if not claim.done():
        timeout = get_settings().timeout
        try:
            await asyncio.shield(await_future(claim, "a worker for atomic()"))
        except ResultTimeout:
            board.give_up(claim)
            raise ResultTimeout(
                f"no worker was free for an atomic() block on {alias!r} after "
                f"{timeout:.2f} s: the other blocks hold them; raise "
                f"ASYNCHRORMOUS['WORKERS'] or ['TIMEOUT']."
            ) from None
        except BaseException:
            board.give_up(claim)
            raise
    claim.result()  # raises Cancelled when shutdown() closed the pool meanwhile
    pin = Pin(pool, alias, task)
    generator = _enclosing_async_generator()
    if generator is not None:
        pin.generator, pin.live_generators = generator
    return pin


def _enclosing_async_generator() -> tuple[Any, Any] | None:
    """``(weakref to the async generator running the block, the loop's live set)``.

    asyncio runs a dropped generator's aclose() later, in a task of its own; until
    then the block's pin must stop taking the consumer's work.
    """
    frame = sys._getframe(3)  # the code doing `async with atomic()`
    if not frame.f_code.co_flags & inspect.CO_ASYNC_GENERATOR:
        return None
    live = getattr(asyncio.get_running_loop(), "_asyncgens", None)
    if live is None:
        return None
    for generator in list(live):
        if generator.ag_frame is frame:
            return weakref.ref(generator), live
    return None


class _PinExecutor(concurrent.futures.Executor):
    """Where the block's thread-sensitive ``sync_to_async`` calls run: its worker.

    Django's own ``asave()``, ``arefresh_from_db()`` and related managers' ``a*``
    methods are such calls; on the pin they run in the block's transaction.
    """

    def __init__(self, pin: Pin) -> None:
        self.pin = pin

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        pin = self.pin
        if pin.open and current_task() is pin.task:
            return pin.submit(_forget_asgiref_thread_state, fn, *args, **kwargs)
        # Another task, or the block is over: where Django would have run it.
        return SyncToAsync.single_thread_executor.submit(fn, *args, **kwargs)


def _forget_asgiref_thread_state(fn: Callable[..., Any], *args: Any) -> Any:
    # asgiref marks the thread as its own; the worker goes back to the pool after.
    try:
        return fn(*args)
    finally:
        for name in ("main_event_loop", "main_event_loop_pid", "task_context"):
            SyncToAsync.threadlocal.__dict__.pop(name, None)


class _Entry:
    """One entry into a block: Django's Atomic and where it runs."""

    __slots__ = ("atomic", "executor", "on_sync_thread", "owns_pin", "pin", "tokens")

    def __init__(self, atomic: django_transaction.Atomic) -> None:
        self.atomic = atomic
        self.pin: Pin | None = None
        self.owns_pin = False
        self.on_sync_thread = False
        self.tokens: list[tuple[Any, Any]] = []
        self.executor: Any = None


def _exit_if_entered(
    atomic: django_transaction.Atomic, entered: concurrent.futures.Future[Any]
) -> None:
    """On the pin, after an entry the task stopped waiting for: roll it back."""
    if not entered.cancelled() and entered.exception() is None:
        error = Cancelled("the task left atomic() while it was being entered")
        atomic.__exit__(Cancelled, error, None)


class AsyncAtomic(contextlib.AsyncContextDecorator):
    """One or more entries into an async transaction block; made by ``atomic()``.

    Like Django's ``Atomic``, one object may be entered again while it is open.
    """

    def __init__(self, using: str | None, savepoint: bool, durable: bool) -> None:
        self.using = using
        self.savepoint = savepoint
        self.durable = durable
        self._entries: list[_Entry] = []

    def _recreate_cm(self) -> AsyncAtomic:
        # A decorated function may run in several tasks at once: one entry each.
        return type(self)(self.using, self.savepoint, self.durable)

    async def __aenter__(self) -> AsyncAtomic:
        alias = self.using or DEFAULT_DB_ALIAS
        entry = _Entry(django_transaction.Atomic(alias, self.savepoint, self.durable))
        task = asyncio.current_task()
        assert task is not None, "atomic() needs a running asyncio task"
        # Under async_to_sync from a thread already in a transaction (Django's
        # TestCase), the block nests in that thread's transaction, on that thread.
        if await aio.on_callers_sync_thread(alias):
            entry.on_sync_thread = True
            await aio.sync_to_async(entry.atomic.__enter__, thread_sensitive=True)()
            self._entries.append(entry)
            return self
        # A pin of another task (inherited by create_task) is not this task's block.
        pin = task_pin(alias, task)
        if pin is None:
            pin = await _pin_a_worker(alias, task)
            entry.owns_pin = True
        entry.pin = pin
        self._enter_context(entry, pin)
        entered = pin.submit(entry.atomic.__enter__)
        try:
            # Shielded: a cancel must not leave the worker inside a half-known block.
            await asyncio.shield(await_future(entered, "atomic()"))
        except BaseException:
            # Whatever the entry opened is rolled back on the pin; then it is freed.
            pin.submit(_exit_if_entered, entry.atomic, entered)
            self._leave(entry)
            raise
        self._entries.append(entry)
        return self

    def _enter_context(self, entry: _Entry, pin: Pin) -> None:
        held = pins.get() or {}
        if held.get(pin.alias) is pin:
            return
        entry.tokens.append((pins, pins.set({**held, pin.alias: pin})))
        # Thread-sensitive sync_to_async (Django's own a* methods) runs on the pin.
        key = ThreadSensitiveContext()
        entry.executor = _PinExecutor(pin)
        SyncToAsync.context_to_thread_executor[key] = entry.executor
        variable = SyncToAsync.thread_sensitive_context
        entry.tokens.append((variable, variable.set(key)))
        # An enclosing async_to_sync's thread would take precedence: hide it here.
        entry.tokens.append(
            (AsyncToSync.executors, getattr(AsyncToSync.executors, "current", None))
        )
        AsyncToSync.executors.current = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._entries.pop()
        if entry.on_sync_thread:
            await aio.sync_to_async(entry.atomic.__exit__, thread_sensitive=True)(
                exc_type, exc, tb
            )
            return
        assert entry.pin is not None
        # The entry's own pin, not the context's: asyncio closes a dropped async
        # generator from another task and context.
        done = entry.pin.submit(entry.atomic.__exit__, exc_type, exc, tb)
        try:
            # Shielded: even if the task is cancelled meanwhile, the commit or
            # rollback still runs on the worker, before the pin's release.
            await asyncio.shield(await_future(done, "the end of atomic()"))
        finally:
            self._leave(entry)

    def _leave(self, entry: _Entry) -> None:
        try:
            for variable, token in reversed(entry.tokens):
                if variable is AsyncToSync.executors:
                    AsyncToSync.executors.current = token
                else:
                    variable.reset(token)
        except ValueError:
            pass  # another context (an async generator's aclose()): leave it as is
        entry.tokens = []
        if entry.owns_pin:
            assert entry.pin is not None
            entry.pin.release()


@overload
def atomic(using: F) -> F: ...


@overload
def atomic(
    using: str | None = None, savepoint: bool = True, durable: bool = False
) -> AsyncAtomic: ...


def atomic(
    using: Any = None, savepoint: bool = True, durable: bool = False
) -> AsyncAtomic | Any:
    """``async with atomic():``, or ``@atomic`` on an ``async def``: Django's atomic.

    Commits on normal exit, rolls back on an exception (which propagates unchanged);
    nested blocks are savepoints; ``durable=True`` inside another block raises
    RuntimeError, as in Django.
    """
    if callable(using):  # bare @atomic
        return AsyncAtomic(None, savepoint, durable)(using)
    return AsyncAtomic(using, savepoint, durable)


async def on_commit(
    func: Callable[[], Any], using: str | None = None, robust: bool = False
) -> None:
    """Django's ``on_commit`` for the current async block: ``func`` runs after the
    outermost commit (on the block's worker thread), never after a rollback."""
    alias = using or DEFAULT_DB_ALIAS
    await aio.run(
        django_transaction.on_commit,
        func,
        alias,
        robust,
        alias=alias,
        writes=False,
        description="on_commit()",
    )


async def set_rollback(rollback: bool, using: str | None = None) -> None:
    """Mark the current async block to roll back on exit, without raising."""
    alias = using or DEFAULT_DB_ALIAS
    await aio.run(
        django_transaction.set_rollback,
        rollback,
        alias,
        alias=alias,
        writes=False,
        description="set_rollback()",
    )


async def get_rollback(using: str | None = None) -> bool:
    """Whether the current async block is marked to roll back."""
    alias = using or DEFAULT_DB_ALIAS
    return await aio.run(
        django_transaction.get_rollback,
        alias,
        alias=alias,
        writes=False,
        description="get_rollback()",
    )


def _refuse_escape(alias: str) -> None:
    """Refuse a statement on ``alias`` that would run outside the open block.

    Sync code gets the block's pin in its copied context (sync_to_async, to_thread);
    a statement it sends on another thread's connection is not in the transaction.
    """
    held = pins.get()
    if held is not None:
        pin = held.get(alias)
        if (
            pin is not None
            and pin.thread is not threading.current_thread()
            and (pin.open)
        ):
            raise TransactionManagementError(
                f"A query on {alias!r} was sent from inside an asynchrormous "
                f"atomic() block on another thread's connection, outside the "
                f"transaction (Django's own asave(), arefresh_from_db() or a related "
                f"manager's a*() method, or sync_to_async(thread_sensitive=False)); "
                f"use AsyncModelMixin, AsyncManager or AsyncQuerySetMixin, or run "
                f"the sync code with await asynchrormous.aio.run(fn, alias={alias!r}, "
                f"writes=True, description=...)."
            )


def _guard_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Check every statement of ``connection`` for an escape from a block.

    Where Django checks each statement against a broken transaction (not in
    ``execute_wrappers``, which code and Django's own tests compare).
    """
    if "validate_no_broken_transaction" in vars(connection):
        return
    validate = connection.validate_no_broken_transaction

    def validate_no_broken_transaction() -> None:
        _refuse_escape(connection.alias)
        validate()

    connection.validate_no_broken_transaction = validate_no_broken_transaction


connection_created.connect(_guard_connection)
