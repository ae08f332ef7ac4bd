"""Writes through a background queryset invalidate exactly what Django invalidates.

Django's ``update()`` and ``delete()`` drop the queryset's result cache, so it
queries again; ``get_or_create()`` and ``bulk_create()`` keep it. A started background
fetch that nobody consumed yet is part of that cache: a write must discard it, and the
writes after which Django keeps the cache must keep it here. A related manager whose
rows were prefetched answers from the prefetch, as Django's does.
"""

import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from asynchrormous import is_ready, resolve, wait
from tests.helpers import occupy_a_worker, ran_in_background
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)


class Unconsumed:
    """Starts a fetch and leaves it unconsumed: finished, or queued behind a job."""

    def __init__(self, release=None):
        self._release = release

    def start(self, qs):
        qs.start()
        if self._release is None:
            wait(qs)  # it has run, with the rows before the write, and is not used
            assert is_ready(qs)
        else:
            assert not is_ready(qs)  # the only worker is busy: the fetch is queued
        assert qs._result_cache is None
        return qs

    def release(self):
        if self._release is not None:
            self._release.set()


@pytest.fixture(params=["finished", "queued"])
def unconsumed(request, settings):
    if request.param == "finished":
        yield Unconsumed()
        return
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    release = threading.Event()
    blocker = occupy_a_worker(release)
    try:
        yield Unconsumed(release)
    finally:
        release.set()
        assert blocker.result() is True


# -- update() and delete() discard the pending fetch --------------------------------


def test_update_on_a_started_unconsumed_queryset_then_iterating_sees_the_update(
    books, jobs, unconsumed
):
    plain = Book.objects.order_by("pk")
    assert len(plain) == 6
    assert plain.update(pages=1) == 6
    assert [b.pages for b in plain] == [1] * 6  # Django queries again

    qs = unconsumed.start(Book.objects.order_by("pk"))
    updated = qs.update(pages=2)
    unconsumed.release()
    assert resolve(updated) == 6
    assert [b.pages for b in qs] == [2] * 6
    assert [b.sheets for b in qs] == [1] * 6
    assert all(ran_in_background(job) for job in jobs)


def test_delete_on_a_started_unconsumed_queryset_then_count_and_rows_are_empty(
    books, jobs, unconsumed
):
    plain = Book.objects.filter(pages__gte=130)
    assert len(plain) == 3
    assert plain.delete()[0] == 3
    assert plain.count() == 0 and not plain.exists() and list(plain) == []

    qs = unconsumed.start(Book.objects.filter(pages__lt=130))
    deleted = qs.delete()
    unconsumed.release()
    assert resolve(deleted)[0] == 3
    assert qs.count() == 0
    assert not qs.exists()
    assert list(qs) == []
    assert Book.objects.count() == 0


def test_update_of_a_started_unconsumed_queryset_then_count_sees_the_update(
    books, jobs, unconsumed
):
    """``count()`` after the write counts the rows as they are after it."""
    qs = unconsumed.start(Book.objects.filter(pages__lt=130))
    updated = qs.update(pages=500)
    unconsumed.release()
    assert resolve(updated) == 3
    assert qs.count() == 0  # no row has fewer than 130 pages any more
    assert list(qs) == []


# -- get_or_create() and bulk_create() keep a filled cache -------------------------


def test_get_or_create_on_a_queryset_with_a_filled_cache_keeps_the_cache(books, jobs):
    author = books[0].author
    plain = Book.objects.all()
    assert len(plain) == 6
    plain.get_or_create(title="Plain new", defaults={"author": author})
    with CaptureQueriesContext(connection) as caller:
        assert len(plain) == 6  # Django keeps the cache: no query
    assert len(caller) == 0

    qs = Book.objects.run_async()
    assert len(qs) == 7  # with "Plain new"
    obj, created = resolve(qs.get_or_create(title="New", defaults={"author": author}))
    assert created and obj.pk is not None
    with CaptureQueriesContext(connection) as caller:
        assert len(qs) == 7
        assert qs.count() == 7
        assert "New" not in [b.title for b in qs]
    assert len(caller) == 0
    # The fetch and get_or_create(), each on a worker; no second fetch.
    assert len(jobs) == 2
    assert all(ran_in_background(job) for job in jobs)


def test_bulk_create_on_a_queryset_with_a_filled_cache_keeps_the_cache(books, jobs):
    author = books[0].author
    plain = Book.objects.all()
    assert len(plain) == 6
    plain.bulk_create([Book(title="Plain bulk", author=author)])
    with CaptureQueriesContext(connection) as caller:
        assert len(plain) == 6  # Django keeps the cache: no query
    assert len(caller) == 0

    qs = Book.objects.run_async()
    assert len(qs) == 7  # with "Plain bulk"
    made = qs.bulk_create([Book(title=f"Bulk {i}", author=author) for i in range(2)])
    assert len(resolve(made)) == 2
    with CaptureQueriesContext(connection) as caller:
        assert len(qs) == 7
        assert qs.count() == 7
    assert len(caller) == 0
    assert len(jobs) == 2
    assert all(ran_in_background(job) for job in jobs)
    assert Book.objects.count() == 9


# -- Related managers and prefetch_related() ------------------------------------


def test_a_related_manager_after_prefetch_related_answers_from_the_prefetch(
    books, jobs
):
    author = Author.objects.prefetch_related("books").get(name="Ann")
    with CaptureQueriesContext(connection) as caller:
        plain_titles = sorted(b.title for b in author.books.all())
        plain_count = author.books.count()
    assert len(caller) == 0
    assert plain_titles == ["Book 1", "Book 3", "Book 5"] and plain_count == 3

    with CaptureQueriesContext(connection) as caller:
        qs = author.books.run_async()
        assert sorted(b.title for b in qs) == plain_titles
        assert len(qs) == plain_count
        assert qs.count() == plain_count
        assert qs.exists()
    assert len(caller) == 0
    assert jobs == []
    # A new query on the related manager (a filter) runs in the background.
    assert resolve(author.books.run_async().filter(pages__gte=130).count()) == 2
    assert len(jobs) == 1 and ran_in_background(jobs[0])


def test_a_related_manager_without_prefetch_runs_in_the_background(books, jobs):
    """Guard (passes today): without a prefetch, the related manager queries."""
    author = Author.objects.get(name="Ann")
    qs = author.books.run_async()
    assert sorted(b.title for b in qs) == ["Book 1", "Book 3", "Book 5"]
    assert resolve(author.books.run_async().count()) == 3
    assert len(jobs) == 2
    assert all(ran_in_background(job) for job in jobs)
