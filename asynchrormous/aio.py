"""The asyncio side: await background jobs without blocking the event loop.

Django's own ``a*`` methods run on one thread (``thread_sensitive=True``), one after
another. Here each job goes to the worker pool, so gathered queries really overlap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from asgiref.sync import AsyncToSync, sync_to_async

from .results import await_job, must_run_inline, submit
from .signals import instrumented, job_finished

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
        if job_finished.has_listeners():
            fn = instrumented(fn, alias, description, inline=True)
        return await sync_to_async(fn, thread_sensitive=True)(*args)
    job = submit(fn, *args, alias=alias, writes=writes, description=description)
    return await await_job(job)


class _End:
    """Sent after the last chunk, carrying the producer's exception if it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def stream(
    make_iterator: Callable[[], Iterator[Any]],
    chunk_size: int,
    *,
    alias: str,
    description: str,
) -> AsyncIterator[Any]:
    """Iterate on a worker and hand chunks over, reading one chunk ahead.

    The whole iteration stays in one worker job: a server-side cursor belongs to the
    worker's connection and thread.
    """
    loop = asyncio.get_running_loop()
    handoff: asyncio.Queue[list[Any] | _End] = asyncio.Queue(maxsize=1)
    stopped = threading.Event()

    def put(item: list[Any] | _End) -> None:
        while not stopped.is_set():
            future = asyncio.run_coroutine_threadsafe(handoff.put(item), loop)
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                future.cancel()  # consumer slow or gone: look at `stopped` again

    def produce() -> None:
        iterator = make_iterator()
        try:
            while not stopped.is_set():
                chunk = list(itertools.islice(iterator, chunk_size))
                if not chunk:
                    break
                put(chunk)
        except BaseException as exc:
            put(_End(exc))
            raise
        else:
            put(_End())
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    job = submit(produce, alias=alias, writes=False, description=description)
    try:
        while True:
            item = await handoff.get()
            if isinstance(item, _End):
                job.observed = True
                if item.error is not None:
                    raise item.error
                return
            for row in item:
                yield row
    finally:
        # The producer stops at its next chunk; a queued one never starts.
        stopped.set()
        job.future.cancel()
        job.observed = True
