"""aiterator(): every row once, in Django's order, and never a deadlock."""

import asyncio
import time

import pytest
from django.db import connection
from django.test import override_settings

from asynchrormous import atomic
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

ONE_WORKER = {"WORKERS": 1, "TIMEOUT": 5}


@pytest.fixture
def authors(db):
    Author.objects.bulk_create(Author(name=f"Author {i:03}") for i in range(300))
    return list(Author.objects.order_by("pk").values_list("pk", flat=True))


async def test_a_consumer_that_blocks_the_loop_gets_every_row_exactly_once(authors):
    seen = []
    async with asyncio.timeout(60):
        async for author in Author.objects.order_by("pk").aiterator(chunk_size=50):
            if len(seen) in (0, 50):
                # The scenario itself: a consumer busy for over a second, not awaiting.
                time.sleep(1.2)
            seen.append(author.pk)
            assert len(seen) <= len(authors), "a chunk was delivered twice"
    assert seen == authors


async def test_a_loop_awaiting_queries_inside_a_block_does_not_deadlock(books):
    django = [b.pk async for b in Book.objects.order_by("pk")]
    with override_settings(ASYNCHRORMOUS=ONE_WORKER):
        async with asyncio.timeout(20), atomic():
            await Book.objects.acreate(title="In block", author=books[0].author)
            seen = []
            async for book in Book.objects.order_by("pk").aiterator(chunk_size=1):
                # The body's queries run in the block, between the stream's chunks.
                seen.append((book.pk, await Book.objects.filter(pk=book.pk).acount()))
                await Book.objects.filter(pk=book.pk).aupdate(pages=7)
            created = await Book.objects.aget(title="In block")
    assert seen == [(pk, 1) for pk in [*django, created.pk]]
    assert await Book.objects.filter(pages=7).acount() == 7


async def test_a_loop_awaiting_queries_with_one_worker_does_not_deadlock(books):
    django = [b.title async for b in Book.objects.order_by("pk")]
    with override_settings(ASYNCHRORMOUS=ONE_WORKER):
        async with asyncio.timeout(20):
            seen = []
            async for book in Book.objects.order_by("pk").aiterator(chunk_size=1):
                await Book.objects.filter(pk=book.pk).aupdate(pages=9)
                seen.append((book.title, await Book.objects.filter(pages=9).acount()))
            # A later query of the task sees the loop's writes, on any worker.
            assert await Book.objects.filter(pages=9).acount() == 6
    assert seen == [(title, n) for n, title in enumerate(django, 1)]


async def test_streams_keep_honouring_disable_server_side_cursors_in_and_out_of_blocks(
    books,
):
    connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        with override_settings(ASYNCHRORMOUS=ONE_WORKER):
            async with asyncio.timeout(20):
                outside = [
                    (b.pk, await Book.objects.filter(pk__lte=b.pk).acount())
                    async for b in Book.objects.order_by("pk").aiterator(chunk_size=2)
                ]
                async with atomic():
                    inside = [
                        (b.pk, await Book.objects.filter(pk__lte=b.pk).acount())
                        async for b in Book.objects.order_by("pk").aiterator(
                            chunk_size=2
                        )
                    ]
    finally:
        del connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"]
    assert outside == inside == [(b.pk, i) for i, b in enumerate(books, 1)]


async def test_leaving_a_stream_early_inside_a_block_keeps_the_block_usable(books):
    with override_settings(ASYNCHRORMOUS=ONE_WORKER):
        async with asyncio.timeout(20), atomic():
            async for book in Book.objects.order_by("pk").aiterator(chunk_size=2):
                assert book.pk == books[0].pk
                break
            assert await Book.objects.acount() == 6
            nested = [
                b.pk
                async for b in Book.objects.order_by("pk").aiterator(chunk_size=4)
                async for _ in Book.objects.filter(pk=b.pk).aiterator(chunk_size=1)
            ]
        # With one worker, the stream's own pin is gone: outside work proceeds.
        assert await Book.objects.acount() == 6
    assert nested == [b.pk for b in books]
