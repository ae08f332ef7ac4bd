"""Async atomic() always ends, and always frees its worker, whatever happens to it."""

import asyncio
import copy
import gc
import threading

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections
from django.test import override_settings

import asynchrormous
from asynchrormous import Cancelled, atomic, pins, resolve
from asynchrormous.pins import Pin
from asynchrormous.results import submit
from tests.helpers import not_shared_cache
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

TWO_WORKERS = {"WORKERS": 2, "TIMEOUT": 5}  # one pin at a time


def _committed(title):
    try:
        return Book.objects.filter(title=title).exists()
    finally:
        connections.close_all()


async def committed(title):
    """Whether a fresh connection, in no block, sees a row titled ``title``."""
    # run_in_executor copies no context: this thread knows nothing of any block.
    return await asyncio.get_running_loop().run_in_executor(None, _committed, title)


async def a_block_of_another_task_gets_a_worker():
    async def other():
        async with atomic():
            return await Book.objects.acount()

    return await asyncio.create_task(other())


async def test_a_task_cancelled_while_entering_leaves_no_worker_in_a_block(
    books, monkeypatch
):
    gate = threading.Event()
    entering = asyncio.Event()
    submitted = Pin.submit

    def noting(pin, fn, *args, **kwargs):
        future = submitted(pin, fn, *args, **kwargs)
        entering.set()
        return future

    with override_settings(ASYNCHRORMOUS=TWO_WORKERS):
        # Both workers busy: the block's entry waits in its pin's queue.
        busy = [
            submit(gate.wait, 10, alias="default", writes=False, description="gate")
            for _ in range(2)
        ]
        monkeypatch.setattr(Pin, "submit", noting)

        async def enter():
            async with atomic():
                await Book.objects.acreate(title="Never", author=books[0].author)

        async with asyncio.timeout(20):
            task = asyncio.create_task(enter())
            await entering.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            monkeypatch.undo()
            gate.set()
            for job in busy:
                job.result()
            counts = await asyncio.gather(*(Book.objects.acount() for _ in range(30)))
            assert counts == [6] * 30
            assert await a_block_of_another_task_gets_a_worker() == 6
    assert not await committed("Never")


async def test_a_block_in_an_async_generator_left_with_break_rolls_back_and_frees(
    books,
):
    author = books[0].author

    async def rows():
        async with atomic():
            await Book.objects.acreate(title="In generator", author=author)
            yield 1
            yield 2

    with override_settings(ASYNCHRORMOUS=TWO_WORKERS):
        async with asyncio.timeout(20):
            async for _ in rows():
                break
            # As in sync Django, this write is outside any block: it commits.
            await Book.objects.acreate(title="After", author=author)
            assert await committed("After")
            gc.collect()
            # asyncio's aclose() of the dropped generator rolled it back, freed it.
            assert await a_block_of_another_task_gets_a_worker() == 7
            async with atomic():
                assert await Book.objects.filter(title="After").aexists()
    assert not await committed("In generator")


async def test_the_next_query_after_dropping_a_generators_block_waits_for_its_end(
    books,
):
    """asyncio rolls the dropped generator's block back later, in a task of its own;
    until then the block holds its locks (shared-cache SQLite fails another
    connection's write at once). The task's next query comes after that end, as
    after its own pending writes."""
    author = books[0].author

    async def rows():
        async with atomic():
            await Book.objects.acreate(title="In generator", author=author)
            yield 1

    with override_settings(ASYNCHRORMOUS=TWO_WORKERS):
        async with asyncio.timeout(20):
            async for _ in rows():
                break
            (block,) = pins.pins.get().values()
            assert not block.served.done()  # asyncio has not run its aclose() yet

            def ran_after_the_block():
                return block.served.done(), threading.current_thread().name

            after, thread = await asynchrormous.aio.run(
                ran_after_the_block, alias="default", writes=False, description="probe"
            )
            assert after and thread.startswith("asynchrormous-")
    assert not await committed("In generator")


async def test_one_atomic_object_entered_twice_frees_its_worker(books):
    block = atomic()
    with override_settings(ASYNCHRORMOUS=TWO_WORKERS):
        async with asyncio.timeout(20):
            async with block:
                async with block:
                    await Book.objects.acreate(title="Twice", author=books[0].author)
                assert await Book.objects.filter(title="Twice").aexists()
            assert await committed("Twice")
            assert await a_block_of_another_task_gets_a_worker() == 7


@pytest.fixture(scope="module")
def other_alias(django_db_setup):
    """A second alias on the same database, as a MIRROR test setting gives one."""
    other = {**copy.deepcopy(connection.settings_dict), "TEST": {"MIRROR": "default"}}
    settings.DATABASES["other"] = connections.settings["other"] = other
    yield "other"
    connections["other"].close()
    del connections["other"]
    connections.settings.pop("other", None)
    settings.DATABASES.pop("other", None)


# Shared-cache SQLite: the other alias's read fails at once on the block's table lock.
@not_shared_cache
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_with_one_worker_a_query_on_another_alias_inside_a_block_runs(
    books, other_alias
):
    with override_settings(ASYNCHRORMOUS={"WORKERS": 1, "TIMEOUT": 5}):
        async with asyncio.timeout(20), atomic():
            await Book.objects.acreate(title="Uncommitted", author=books[0].author)
            # Autocommit on its own connection: it does not see the block's row.
            assert await Book.objects.using(other_alias).acount() == 6
            assert await Book.objects.acount() == 7


async def test_shutdown_fails_pinned_work_and_blocks_waiting_for_a_worker(
    books, monkeypatch
):
    holding = asyncio.Event()
    queued = asyncio.Event()
    claim = pins._PinBoard.claim

    def noting(board):
        future = claim(board)
        if not future.done():
            queued.set()
        return future

    monkeypatch.setattr(pins._PinBoard, "claim", noting)
    release = asyncio.Event()

    async def holder():
        async with atomic():
            holding.set()
            await release.wait()
            await Book.objects.acount()

    async def waiter():
        async with atomic():
            return await Book.objects.acount()

    with override_settings(ASYNCHRORMOUS={"WORKERS": 2, "TIMEOUT": None}):
        async with asyncio.timeout(20):
            held = asyncio.create_task(holder())
            await holding.wait()
            waiting = asyncio.create_task(waiter())
            await queued.wait()
            await asyncio.to_thread(asynchrormous.shutdown, True, 10)
            with pytest.raises(Cancelled, match="shutdown"):
                await waiting
            release.set()
            with pytest.raises(Cancelled, match="shutdown"):
                await held
            # A new pool, and its pins, start afresh.
            assert await a_block_of_another_task_gets_a_worker() == 6


def count_in_background():
    return resolve(Book.objects.run_async().filter(title="In block").count())


async def test_sync_to_async_helpers_of_the_blocks_task_work_in_the_block(books):
    async with asyncio.timeout(20), atomic():
        await Book.objects.acreate(title="In block", author=books[0].author)
        assert await sync_to_async(count_in_background)() == 1
        assert await sync_to_async(count_in_background, thread_sensitive=False)() == 1
        assert await asyncio.to_thread(count_in_background) == 1
    assert await committed("In block")
