"""The asyncio side: the same objects awaited, really in parallel, cancellable."""

import asyncio
import contextvars
import threading
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, transaction
from django.db.models import Avg, QuerySet
from django.db.models.signals import post_save

from asynchrormous.results import submit
from asynchrormous.signals import job_finished
from tests.helpers import (
    backend_id_expr,
    busy_expr,
    caller_backend_id,
    not_shared_cache,
    sleep_expr,
)
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.django_db(transaction=True)

SLEEP = 0.3


def slow(book):
    return Book.objects.filter(pk=book.pk).annotate(z=sleep_expr(SLEEP))


@not_shared_cache
async def test_gathered_a_methods_overlap_where_djangos_take_turns(books):
    t0 = time.perf_counter()
    assert await slow(books[0]).acount() == 1  # count() drops the annotation…
    assert len(await slow(books[0])) == 1  # …a fetch keeps it
    one = time.perf_counter() - t0

    t0 = time.perf_counter()
    fetched = await asyncio.gather(*(slow(b) for b in books[:4]))
    ours = time.perf_counter() - t0

    plain = [
        QuerySet(Book).filter(pk=b.pk).annotate(z=sleep_expr(SLEEP)) for b in books[:4]
    ]
    t0 = time.perf_counter()
    djangos = await asyncio.gather(*(qs.afirst() for qs in plain))
    theirs = time.perf_counter() - t0

    assert [len(rows) for rows in fetched] == [1, 1, 1, 1]
    assert all(djangos)
    assert one >= SLEEP
    assert ours < 2 * SLEEP, ours
    assert theirs >= 4 * SLEEP, theirs


async def test_every_a_method_returns_what_django_returns(books):
    author = books[0].author
    qs = Book.objects.order_by("pk")

    def djangos():
        try:
            return {
                "count": qs.count(),
                "exists": qs.filter(pages=0).exists(),
                "aggregate": qs.aggregate(Avg("pages")),
                "get": qs.get(title="Book 2"),
                "first": qs.first(),
                "last": qs.last(),
                "earliest": qs.earliest("year"),
                "latest": qs.latest("year"),
                "in_bulk": qs.in_bulk([books[0].pk]),
            }
        finally:
            connection.close()

    sync = await sync_to_async(djangos)()
    assert await qs.acount() == sync["count"]
    assert await qs.filter(pages=0).aexists() is sync["exists"]
    assert await qs.acontains(books[1]) is True
    assert await qs.aaggregate(Avg("pages")) == sync["aggregate"]
    assert await qs.aget(title="Book 2") == sync["get"]
    assert await qs.afirst() == sync["first"]
    assert await qs.alast() == sync["last"]
    assert await qs.aearliest("year") == sync["earliest"]
    assert await qs.alatest("year") == sync["latest"]
    assert await qs.ain_bulk([books[0].pk]) == sync["in_bulk"]
    assert "testapp_book" in (await qs.aexplain()).lower()
    with pytest.raises(Book.DoesNotExist):
        await qs.aget(title="nope")

    made = await Book.objects.acreate(title="A", author=author)
    assert made.pk is not None
    obj, created = await Book.objects.aget_or_create(
        title="A", defaults={"author": author}
    )
    assert (obj, created) == (made, False)
    obj, created = await Book.objects.aupdate_or_create(
        title="A", defaults={"pages": 5}, create_defaults={"author": author}
    )
    assert not created and obj.pages == 5
    bulk = await Book.objects.abulk_create(
        [Book(title=f"B{i}", author=author) for i in range(2)]
    )
    assert len(bulk) == 2
    for b in bulk:
        b.pages = 9
    assert await Book.objects.abulk_update(bulk, ["pages"]) == 2
    assert await Book.objects.filter(pages=9).aupdate(pages=10) == 2
    assert await Book.objects.filter(pages=10).adelete() == (2, {"testapp.Book": 2})


async def test_a_methods_run_on_worker_threads(books, jobs):
    await Book.objects.acount()
    await Book.objects.aget(pk=books[0].pk)
    assert len(jobs) == 2
    assert all(job["thread"].startswith("asynchrormous-") for job in jobs)
    assert all(job["thread"] != threading.current_thread().name for job in jobs)


async def test_await_and_async_for_on_querysets_and_lazy_results(books, jobs):
    qs = Book.objects.order_by("pk")
    assert [b.title for b in await qs][:2] == ["Book 0", "Book 1"]
    assert [b.pages async for b in qs.filter(pages__gt=130)] == [140, 150]
    started = Book.objects.filter(pages=100).start()
    assert await started.start() == [books[0]]
    assert len(started) == 1  # the sync side sees the same filled cache
    n = Book.objects.run_async().count()
    got = Book.objects.run_async().get(pk=books[1].pk)
    assert await n == 6
    assert (await got).title == "Book 1"
    assert len(jobs) == 5


async def test_aiterator_streams_from_a_worker_and_can_stop_early(
    books, jobs, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    titles = [
        b.title async for b in Book.objects.order_by("pk").aiterator(chunk_size=2)
    ]
    assert titles == [f"Book {i}" for i in range(6)]
    async for book in Book.objects.order_by("pk").aiterator(chunk_size=1):
        assert book.title == "Book 0"
        break
    # The single worker is free again: the abandoned stream does not hold it.
    assert await asyncio.wait_for(Book.objects.acount(), 10) == 6
    assert {job["thread"] for job in jobs} == {"asynchrormous-0"}
    with pytest.raises(ValueError, match="strictly positive"):
        async for _ in Book.objects.aiterator(chunk_size=0):
            pass


async def test_aiterator_honours_disable_server_side_cursors(books, settings):
    # Every thread's connection shares this dict, as Django builds them from settings.
    connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        rows = [b async for b in Book.objects.aiterator(chunk_size=4)]
    finally:
        del connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"]
    assert len(rows) == 6


async def test_cancelling_the_task_drops_a_queued_job(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    release = threading.Event()
    blocker = submit(release.wait, 10, alias="default", writes=False, description="x")
    task = asyncio.create_task(Book.objects.acount())
    await asyncio.sleep(0)  # let the task submit its job
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert blocker.result() is True
    assert await Book.objects.acount() == 6


async def test_cancelling_a_running_statement_leaves_the_connection_usable(
    books, settings, jobs
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    session = (await Book.objects.annotate(where=backend_id_expr()).afirst()).where
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(Book.objects.annotate(z=busy_expr()).afirst(), 0.5)
    # The same worker, on the same connection, answers the next query at once.
    after = await asyncio.wait_for(
        Book.objects.annotate(where=backend_id_expr()).afirst(), 10
    )
    assert time.perf_counter() - t0 < 5
    assert after.where == session
    cancelled = [job for job in jobs if job["exception"] is not None]
    assert len(cancelled) == 1


async def test_jobs_see_the_awaiting_tasks_contextvars(books):
    tenant = contextvars.ContextVar("tenant")
    seen = []

    def record(**kwargs):
        seen.append(tenant.get(None))

    async def as_tenant(name):
        tenant.set(name)
        return await Book.objects.acount()

    job_finished.connect(record, weak=False)
    try:
        await asyncio.gather(as_tenant("acme"), as_tenant("globex"))
    finally:
        job_finished.disconnect(record)
    assert sorted(seen) == ["acme", "globex"]


async def test_async_model_methods_run_on_the_pool_with_signals(books):
    threads = []

    def on_save(sender, instance, **kwargs):
        threads.append(threading.current_thread().name)

    post_save.connect(on_save, sender=Book, weak=False)
    try:
        book = Book(title="Async", author=books[0].author)
        await book.asave()
        book.pages = 1
        await book.asave(update_fields=["pages"])
    finally:
        post_save.disconnect(on_save, sender=Book)
    assert len(threads) == 2 and all(t.startswith("asynchrormous-") for t in threads)
    await Book.objects.filter(pk=book.pk).aupdate(pages=2)
    await book.arefresh_from_db()
    assert book.pages == 2
    assert await book.adelete() == (1, {"testapp.Book": 1})


async def test_related_managers_and_raw_querysets_are_awaitable(books, jobs):
    author = await Author.objects.aget(name="Ann")
    assert await author.books.acount() == 3
    assert sorted([b.pages async for b in author.books.all()]) == [110, 130, 150]
    tag = await Tag.objects.acreate(name="t")

    def tag_books():
        try:
            tag.books.set(books[:2])
        finally:
            connection.close()

    await sync_to_async(tag_books)()
    assert len(await tag.books.all()) == 2
    raw = Book.objects.raw("SELECT * FROM testapp_book ORDER BY id")
    assert [b.title for b in await raw][:1] == ["Book 0"]
    assert len([b async for b in raw]) == 6
    assert all(job["thread"].startswith("asynchrormous-") for job in jobs)


def test_under_async_to_sync_inside_atomic_async_code_sees_the_blocks_rows(books, jobs):
    """Django's TestCase runs async tests so: async_to_sync from an atomic thread."""

    class Rollback(Exception):
        pass

    async def read():
        rows = await Book.objects.filter(title="Uncommitted").annotate(
            where=backend_id_expr()
        )
        return (
            [row.where for row in rows],
            await Book.objects.acount(),
            [
                b.title
                async for b in Book.objects.filter(title="Uncommitted").aiterator()
            ],
        )

    with pytest.raises(Rollback), transaction.atomic():
        Book.objects.create(title="Uncommitted", author=books[0].author)
        where, count, streamed = async_to_sync(read)()
        assert where == [caller_backend_id()]
        assert count == 7
        assert streamed == ["Uncommitted"]
        main = threading.current_thread().name
        assert [(j["thread"], j["inline"]) for j in jobs] == [(main, True)] * 2
        raise Rollback
    assert Book.objects.count() == 6


async def test_related_managers_write_on_the_pool(books, jobs):
    author = await Author.objects.aget(name="Ann")
    created = await author.books.acreate(title="Related")
    assert created.author_id == author.pk
    obj, made = await author.books.aget_or_create(title="Related")
    assert (obj, made) == (created, False)
    tag = await Tag.objects.acreate(name="t")
    await tag.books.aadd(created, books[0])
    assert await tag.books.acount() == 2
    await tag.books.aremove(books[0])
    await tag.books.aset([books[1]])
    assert [b.pk async for b in tag.books.all()] == [books[1].pk]
    await tag.books.aclear()
    assert await tag.books.acount() == 0
    writes = [job for job in jobs if job["description"].startswith(("Related", "Many"))]
    assert len(writes) == 6
    assert all(job["thread"].startswith("asynchrormous-") for job in writes)
