"""Async transactions: ``async with atomic():``; Django's atomic is thread-bound.

The outermost block of a task pins one worker and its connection; every query the
task makes inside it runs there, in order, so the block reads its own writes.
Django's own ``transaction.Atomic`` runs on that thread, so savepoints, ``durable``,
``on_commit`` and the rollback flag behave exactly as in Django.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

from django.db import DEFAULT_DB_ALIAS
from django.db import transaction as django_transaction

from . import aio
from .conf import get_settings
from .exceptions import ResultTimeout
from .pool import Pin, get_pool, pin_board, pins
from .results import await_job, submit

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
            async with asyncio.timeout(timeout):
                await asyncio.shield(asyncio.wrap_future(claim))
        except TimeoutError:
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
    return Pin(pool, alias, task)


class AsyncAtomic(contextlib.AsyncContextDecorator):
    """One entry into an async transaction block; made by ``atomic()``."""

    def __init__(self, using: str | None, savepoint: bool, durable: bool) -> None:
        self.using = using
        self.savepoint = savepoint
        self.durable = durable

    def _recreate_cm(self) -> AsyncAtomic:
        # A decorated function may run in several tasks at once: one entry each.
        return type(self)(self.using, self.savepoint, self.durable)

    async def __aenter__(self) -> AsyncAtomic:
        self.alias = self.using or DEFAULT_DB_ALIAS
        self._atomic = django_transaction.Atomic(
            self.alias, self.savepoint, self.durable
        )
        self._token: Any = None
        task = asyncio.current_task()
        assert task is not None, "atomic() needs a running asyncio task"
        # Under async_to_sync from a thread already in a transaction (Django's
        # TestCase), the block nests in that thread's transaction, on that thread.
        self._on_sync_thread = await aio.on_callers_sync_thread(self.alias)
        inherited = (pins.get() or {}).get(self.alias)
        # A pin of another task (inherited by create_task) is not this task's block.
        if not self._on_sync_thread and (
            inherited is None or inherited.task is not task
        ):
            pin = await _pin_a_worker(self.alias, task)
            self._token = pins.set({**(pins.get() or {}), self.alias: pin})
        try:
            await self._call(self._atomic.__enter__)
        except BaseException:
            self._unpin()
            raise
        return self

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._on_sync_thread:
            return await aio.sync_to_async(fn, thread_sensitive=True)(*args)
        # submit() from this task, so the job goes to this task's pinned worker.
        job = submit(fn, *args, alias=self.alias, writes=True, description="atomic()")
        # Shielded: even if the task is cancelled meanwhile, the commit or rollback
        # still runs on the worker, before the pin's release that queues behind it.
        return await asyncio.shield(await_job(job))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._call(self._atomic.__exit__, exc_type, exc, tb)
        finally:
            self._unpin()

    def _unpin(self) -> None:
        if self._token is not None:
            pin = (pins.get() or {})[self.alias]
            pins.reset(self._token)
            self._token = None
            pin.release()


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
