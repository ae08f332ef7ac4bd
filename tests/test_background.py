"""Background mode of AsyncQuerySet: what runs where, and when."""

import pickle
import threading

import pytest
from django.db import connection
from django.db.models import OuterRef, Prefetch, Subquery
from django.test.utils import CaptureQueriesContext

from asynchrormous import AsynchrormousError, is_ready, resolve, wait
from tests.helpers import (
    backend_id_expr,
    caller_backend_id,
    ran_in_background,
    thread_of,
)
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.django_db(transaction=True)


def test_run_async_alone_runs_no_query(books, jobs):
    with CaptureQueriesContext(connection) as caller:
        qs = Book.objects.filter(pages__gt=0).run_async()
        chained = qs.exclude(year=0).order_by("title").select_related("author")
    assert len(caller) == 0
    assert jobs == []
    assert not is_ready(qs) and not is_ready(chained)
    assert qs._fetch_job is None and chained._fetch_job is None


def test_query_runs_on_a_worker_thread_and_connection(books, jobs):
    mine = caller_backend_id()
    qs = Book.objects.annotate(where=backend_id_expr()).start()
    wait(qs)  # a worker runs it; a result used at once may run on the caller
    rows = list(qs)
    where = {row.where for row in rows}
    assert len(where) == 1
    (backend,) = where
    assert backend != mine
    assert thread_of(backend).startswith("asynchrormous-")
    assert thread_of(backend) != threading.current_thread().name
    assert [job["thread"] for job in jobs] == [thread_of(backend)]


def test_start_is_idempotent_and_returns_the_same_queryset(books, jobs):
    qs = Book.objects.all()
    assert qs.start() is qs
    job = qs._fetch_job
    assert qs.start() is qs and qs._fetch_job is job
    assert len(qs) == 6
    assert qs.start() is qs
    assert len(jobs) == 1


def test_slice_returns_a_started_clone(books, jobs):
    qs = Book.objects.order_by("pk").run_async()
    first_two = qs[:2]
    assert first_two is not qs
    assert first_two._fetch_job is not None
    assert qs._fetch_job is None
    assert [b.title for b in first_two] == ["Book 0", "Book 1"]
    assert [b.title for b in qs[2:4]] == ["Book 2", "Book 3"]


def test_index_and_stepped_slice_reuse_the_started_fetch(books, jobs):
    qs = Book.objects.order_by("pk").start()
    assert qs[1].title == "Book 1"
    assert [b.title for b in qs[::2]] == ["Book 0", "Book 2", "Book 4"]
    assert len(jobs) == 1


def test_index_without_a_started_fetch_runs_in_the_background(books, jobs):
    qs = Book.objects.order_by("pk").run_async()
    assert qs[3].title == "Book 3"
    assert [b.title for b in qs[1:5:2]] == ["Book 1", "Book 3"]
    assert len(jobs) == 2
    assert all(ran_in_background(job) for job in jobs)


def test_iteration_len_bool_fill_the_cache_and_second_use_runs_no_query(books, jobs):
    qs = Book.objects.run_async()
    with CaptureQueriesContext(connection) as caller:
        assert len(qs) == 6
        assert bool(qs)
        assert len(list(qs)) == 6
        assert sorted(b.title for b in qs)[0] == "Book 0"
    assert len(caller) == 0
    assert len(jobs) == 1


def test_select_related_and_prefetch_related_are_done_in_the_worker(books, jobs):
    tag = Tag.objects.create(name="t")
    tag.books.set(books[:3])
    qs = (
        Book.objects.select_related("author", "publisher")
        .prefetch_related("tags", Prefetch("author__books", to_attr="siblings"))
        .run_async()
    )
    with CaptureQueriesContext(connection) as caller:
        rows = list(qs)
        names = {b.author.name for b in rows}
        tags = sum(len(b.tags.all()) for b in rows)
        siblings = {len(b.author.siblings) for b in rows}
    assert len(caller) == 0
    assert names == {"Ann", "Bob"}
    assert tags == 3
    assert siblings == {3}
    # One fetch; its two lookups may run as jobs of their own, side by side.
    assert [job["description"] for job in jobs].count("fetch of Book queryset") == 1
    assert len([sql for job in jobs for sql in job["sql"] if "testapp_" in sql]) == 3


def test_values_values_list_dates_none_union_keep_working(books, jobs):
    base = Book.objects.run_async()
    assert sorted(r["title"] for r in base.values("title"))[0] == "Book 0"
    assert sorted(base.values_list("pages", flat=True)) == [
        100,
        110,
        120,
        130,
        140,
        150,
    ]
    assert list(base.none()) == []
    assert list(base.none()[:2]) == [] and list(base.filter(pk__in=[])[:1]) == []
    union = base.filter(pages=100).union(base.filter(pages=150)).order_by("pages")
    assert [b.pages for b in union] == [100, 150]
    years = base.dates("published", "year")
    assert [d.year for d in years] == [1990, 1991, 1992]
    assert len(jobs) == 7


def test_chained_clones_keep_background_mode_and_never_submit(books, jobs):
    qs = Book.objects.run_async()
    chained = qs.filter(pages__gte=120).exclude(year=1995).order_by("-pages")
    assert chained._background and chained._fetch_job is None
    assert jobs == []
    assert [b.pages for b in chained] == [140, 130, 120]
    assert ran_in_background(jobs[0])


def test_repr_and_pickle_block_on_the_pending_fetch(books, jobs):
    qs = Book.objects.order_by("pk").start()
    assert repr(qs).startswith("<AsyncQuerySet [<Book: Book 0>")
    restored = pickle.loads(pickle.dumps(qs))
    assert [b.title for b in restored] == [b.title for b in qs]
    assert len(jobs) == 1


def test_without_run_async_it_is_plain_django(books, jobs):
    with CaptureQueriesContext(connection) as caller:
        assert Book.objects.filter(pages__gt=120).count() == 3
        assert len(Book.objects.all()) == 6
    assert len(caller) == 2
    assert jobs == []


def test_run_async_on_an_evaluated_queryset_answers_from_its_cache(books, jobs):
    qs = Book.objects.order_by("pk")
    rows = list(qs)
    background = qs.run_async()
    with CaptureQueriesContext(connection) as caller:
        assert list(background) == rows
        assert resolve(background.count()) == 6
        assert resolve(background.first()) == rows[0]
    assert len(caller) == 0
    assert jobs == []
    assert [b.pk for b in background.all()] == [b.pk for b in rows]  # queries again
    assert len(jobs) == 1


def test_run_async_on_a_raw_queryset_is_an_error(books):
    raw = Book.objects.raw("SELECT * FROM testapp_book")
    with pytest.raises(AsynchrormousError, match="RawQuerySet"):
        raw.run_async()


def test_resolve_returns_the_queryset_with_its_cache_filled(books):
    qs = Book.objects.run_async()
    assert resolve(qs) is qs
    assert qs._result_cache is not None and is_ready(qs)


def test_a_slice_that_refers_to_an_outer_query_is_not_started(books):
    newest = (
        Book.objects.run_async()
        .filter(author=OuterRef("pk"))
        .order_by("-year")
        .values("title")[:1]
    )
    assert newest._fetch_job is None
    authors = Author.objects.annotate(newest=Subquery(newest)).order_by("name")
    assert [a.newest for a in authors] == ["Book 5", "Book 4"]


def test_raw_querysets_keep_prefetch_related_and_djangos_repr(books, jobs):
    Tag.objects.create(name="t").books.set(books[:1])
    raw = Book.objects.prefetch_related("tags").raw(
        "SELECT * FROM testapp_book ORDER BY id"
    )
    assert repr(raw).startswith("<RawQuerySet: SELECT")
    rows = list(raw)
    with CaptureQueriesContext(connection) as caller:
        assert [len(b.tags.all()) for b in rows][:2] == [1, 0]
    assert len(caller) == 0


def test_a_slice_with_a_nested_outer_reference_is_not_started(books):
    middle = (
        Book.objects.run_async()
        .filter(
            pk__in=Subquery(
                Book.objects.filter(author=OuterRef(OuterRef("pk"))).values("pk")
            )
        )
        .order_by("-year")
        .values("title")[:1]
    )
    assert middle._fetch_job is None
    authors = Author.objects.annotate(newest=Subquery(middle)).order_by("name")
    assert [a.newest for a in authors] == ["Book 5", "Book 4"]
