"""The asyncio side: await background jobs without blocking the event loop.

Django's own ``a*`` methods run on one thread (``thread_sensitive=True``), one after
another. Here each job goes to the worker pool, so gathered queries really overlap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from asgiref.sync import AsyncToSync, sync_to_async

from .conf import get_settings
from .pins import Pin, pinned, stream_pins
from .pool import get_pool
from .results import (
    await_future,
    await_job,
    must_run_inline,
    prerequisites,
    run_after,
    submit,
    track_pending,
)
from .signals import instrumented

__all__ = ["on_callers_sync_thread", "run", "stream", "sync_to_async"]


async def on_callers_sync_thread(alias: str) -> bool:
    """Whether this coroutine must use Django's thread-sensitive path for ``alias``.

    Under ``async_to_sync`` the calling sync thread waits for this coroutine (Django's
    TestCase runs ``async def`` tests so). If that thread is inside ``atomic()``, only
    its own connection sees the uncommitted rows and holds the locks. ``connections``
    is thread-local, so ask that thread itself, with Django's own hop to it.
    """
    if getattr(AsyncToSync.executors, "current", None) is None:
        return False
    return await sync_to_async(must_run_inline, thread_sensitive=True)(alias)


async def run(
    fn: Callable[..., Any], *args: Any, alias: str, writes: bool, description: str
) -> Any:
    """Run ``fn(*args)`` on the pool and await its value."""
    if await on_callers_sync_thread(alias):
        fn = instrumented(fn, alias, description, inline=True)
        return await sync_to_async(fn, thread_sensitive=True)(*args)
    job = submit(fn, *args, alias=alias, writes=writes, description=description)
    return await await_job(job)


async def stream(
    make_iterator: Callable[[], Iterator[Any]],
    chunk_size: int,
    *,
    alias: str,
    description: str,
) -> AsyncIterator[Any]:
    """Iterate on one worker thread, a chunk per job, reading one chunk ahead.

    A server-side cursor belongs to its thread and connection, so every chunk of a
    stream is fetched on one pin: the task's block's, or one of its own. The task's
    other queries meanwhile run there too, between chunks, so a loop that awaits
    queries never waits for the worker its own stream holds.
    """
    task = asyncio.current_task()
    pin = pinned(alias, task)
    own: Pin | None = None
    if pin is None:
        own = pin = Pin(get_pool(), alias, task, holds_slot=False)
        stream_pins.setdefault(task, {})[alias] = own
    # The caller's earlier writes come first, as for any of its queries.
    before = prerequisites(alias, writes=False) if own is not None else []
    timeout = get_settings().timeout
    rows: list[Iterator[Any]] = []  # the iterator, touched on the pin's thread only

    def first() -> list[Any]:
        rows.append(run_after(before, timeout, description, make_iterator))
        return next_chunk()

    def next_chunk() -> list[Any]:
        return list(itertools.islice(rows[0], chunk_size))

    def close() -> None:
        if rows:
            close = getattr(rows.pop(), "close", None)
            if close is not None:
                close()

    def fetch(fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        return pin.submit(instrumented(fn, alias, description, inline=False))

    ahead: concurrent.futures.Future[Any] | None = fetch(first)
    try:
        while ahead is not None:
            chunk = await await_future(ahead, description)
            ahead = fetch(next_chunk) if len(chunk) == chunk_size else None
            for row in chunk:
                yield row
    finally:
        if ahead is not None:
            ahead.cancel()  # dropped if still queued
        # After every job of the stream and before the task's later ones there.
        closed = pin.submit(close)
        if own is not None:
            if (stream_pins.get(task) or {}).get(alias) is own:
                del stream_pins[task][alias]
            own.release()
            # The task's later queries wait for what it queued on the stream's pin.
            track_pending(alias, closed, writes=True)
