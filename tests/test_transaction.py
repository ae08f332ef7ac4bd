"""Async transactions: ``async with atomic():`` on a pinned worker."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from django.db import DatabaseError, connection, transaction
from django.db.transaction import TransactionManagementError

from asynchrormous import ResultTimeout, atomic
from asynchrormous.transaction import get_rollback, on_commit, set_rollback
from tests.helpers import (
    backend_id_expr,
    busy_expr,
    caller_backend_id,
    not_shared_cache,
)
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

needs_row_locks = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="SQLite has no row locks"
)


class Boom(Exception):
    pass


async def session():
    """The database session this task's next query runs on."""
    return (await Book.objects.annotate(where=backend_id_expr()).afirst()).where


@not_shared_cache  # its table locks fail a reader at once ("table is locked")
async def test_a_block_commits_and_reads_its_own_writes_on_one_connection(books):
    author = books[0].author
    written = asyncio.Event()

    async def observer():  # another task, created outside any block
        await written.wait()
        return await Book.objects.filter(title="In block").aexists()

    outside = asyncio.create_task(observer())
    async with atomic():
        first = await session()
        await Book.objects.acreate(title="In block", author=author)
        lazy = Book.objects.run_async().filter(title="In block").count()
        assert await Book.objects.filter(title="In block").acount() == 1
        assert await lazy == 1  # a lazy result from run_async() runs there too
        assert await session() == first
        written.set()
        assert await outside is False  # uncommitted: invisible outside the block
    assert await Book.objects.filter(title="In block").aexists()


async def test_an_exception_rolls_back_and_propagates_unchanged(books):
    error = Boom("no")
    with pytest.raises(Boom) as excinfo:
        async with atomic():
            await Book.objects.acreate(title="Gone", author=books[0].author)
            raise error
    assert excinfo.value is error
    assert not await Book.objects.filter(title="Gone").aexists()


async def test_a_failing_nested_block_rolls_back_only_itself(books):
    author = books[0].author
    async with atomic():
        await Book.objects.acreate(title="Outer", author=author)
        with pytest.raises(Boom):
            async with atomic():
                await Book.objects.acreate(title="Inner", author=author)
                raise Boom
        await Book.objects.acreate(title="After", author=author)
    titles = {
        b.title
        async for b in Book.objects.filter(title__in=["Outer", "Inner", "After"])
    }
    assert titles == {"Outer", "After"}


async def test_durable_inside_another_block_raises_runtimeerror(books):
    async with atomic():
        with pytest.raises(RuntimeError, match="durable atomic block cannot be nested"):
            async with atomic(durable=True):
                pass
    async with atomic(durable=True):
        assert await Book.objects.acount() == 6


async def test_on_commit_runs_after_the_outermost_commit_and_never_on_rollback(books):
    ran = []
    async with atomic():
        async with atomic():
            await on_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(Boom):
        async with atomic():
            await on_commit(lambda: ran.append("rolled back"))
            raise Boom
    assert ran == ["committed"]


async def test_set_rollback_rolls_back_without_raising(books):
    async with atomic():
        await Book.objects.acreate(title="Undone", author=books[0].author)
        assert await get_rollback() is False
        await set_rollback(True)
        assert await get_rollback() is True
    assert not await Book.objects.filter(title="Undone").aexists()


@not_shared_cache
async def test_the_decorator_form_opens_a_block_per_call(books):
    @atomic
    async def bare(title):
        await Book.objects.acreate(title=title, author=books[0].author)
        raise Boom

    @atomic(durable=True)
    async def called(title):
        await Book.objects.acreate(title=title, author=books[0].author)
        return await session()

    with pytest.raises(Boom):
        await bare("Bare")
    first, second = await asyncio.gather(called("One"), called("Two"))
    assert not await Book.objects.filter(title="Bare").aexists()
    assert await Book.objects.filter(title__in=["One", "Two"]).acount() == 2
    if connection.vendor != "sqlite":  # SQLite takes one writer at a time
        assert first != second


async def test_concurrent_blocks_of_two_tasks_use_separate_connections(books, settings):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises write transactions")
    settings.ASYNCHRORMOUS = {"WORKERS": 3, "TIMEOUT": 10.0}
    both_inside = asyncio.Barrier(2)
    both_counted = asyncio.Barrier(2)

    async def block(title):
        async with atomic():
            await Book.objects.acreate(title=title, author=books[0].author)
            await both_inside.wait()
            seen = await Book.objects.filter(title__in=["A", "B"]).acount()
            await both_counted.wait()  # neither commits before both have looked
            return await session(), seen

    (first, seen_a), (second, seen_b) = await asyncio.gather(block("A"), block("B"))
    assert first != second
    assert seen_a == seen_b == 1  # each sees only its own uncommitted row


async def test_a_task_created_inside_a_block_does_not_join_it(books):
    async with atomic():
        child = asyncio.create_task(Book.objects.acount())
        with pytest.raises(TransactionManagementError, match="cannot join"):
            await child
        if connection.vendor == "sqlite":
            return  # SQLite: a second write transaction waits for this one to end

        # Its own block is fine: a separate transaction on another worker.
        async def own_block():
            async with atomic():
                return await session()

        assert await asyncio.create_task(own_block()) != await session()


async def test_new_blocks_wait_for_a_pinned_worker_bounded_by_the_timeout(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 0.5}  # one pin at a time
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder():
        async with atomic():
            holding.set()
            await release.wait()

    async def second():
        async with atomic():
            return await Book.objects.acount()

    task = asyncio.create_task(holder())
    await holding.wait()
    with pytest.raises(ResultTimeout, match="no worker was free"):
        await second()
    # Unpinned work still has a worker while the block is open.
    assert await Book.objects.acount() == 6
    waiting = asyncio.create_task(second())
    release.set()
    await task
    assert await asyncio.wait_for(waiting, 10) == 6


@needs_row_locks
async def test_select_for_update_blocks_a_competing_block_until_commit(books):
    locked = asyncio.Event()
    release = asyncio.Event()
    pk = books[0].pk

    async def owner():
        async with atomic():
            await Book.objects.select_for_update().aget(pk=pk)
            locked.set()
            await release.wait()
            await Book.objects.filter(pk=pk).aupdate(pages=1)

    async def competitor():
        async with atomic():
            return await Book.objects.select_for_update().aget(pk=pk)

    task = asyncio.create_task(owner())
    await locked.wait()
    with pytest.raises(DatabaseError):
        async with atomic():
            await Book.objects.select_for_update(nowait=True).aget(pk=pk)
    waiting = asyncio.create_task(competitor())
    release.set()
    await task
    row = await asyncio.wait_for(waiting, 10)
    assert row.pages == 1  # it waited for the owner's commit


async def test_cancelling_a_task_inside_a_block_rolls_back_and_frees_the_connection(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 10.0}

    async def doomed():
        async with atomic():
            await Book.objects.acreate(title="Cancelled", author=books[0].author)
            await Book.objects.annotate(z=busy_expr()).afirst()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(doomed(), 0.5)
    assert not await Book.objects.filter(title="Cancelled").aexists()
    async with atomic(), asyncio.timeout(10):  # wait_for() would start another task
        assert await Book.objects.acount() == 6


def test_under_async_to_sync_a_block_nests_in_the_callers_transaction(books):
    """Django's TestCase runs async tests so: the block is a savepoint of the test's."""

    async def nested():
        with pytest.raises(Boom):
            async with atomic():
                await Book.objects.acreate(title="Savepoint", author=books[0].author)
                raise Boom
        async with atomic():
            await Book.objects.acreate(title="Kept", author=books[0].author)
            return await session()

    with pytest.raises(Boom), transaction.atomic():
        where = async_to_sync(nested)()
        assert where == caller_backend_id()
        assert list(Book.objects.filter(title__in=["Savepoint", "Kept"])) == [
            Book.objects.get(title="Kept")
        ]
        raise Boom
    assert not Book.objects.filter(title="Kept").exists()
    assert Author.objects.count() == 2
