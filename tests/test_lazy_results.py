"""Terminals of a background queryset return lazy results that resolve where used."""

import copy
import gc
import logging
import threading
import traceback

import pytest
from django.core.exceptions import FieldDoesNotExist, FieldError
from django.db import IntegrityError, connection
from django.db.models import Avg, Max
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext

from asynchrormous import (
    Cancelled,
    ResultTimeout,
    cancel,
    is_ready,
    resolve,
    wait,
)
from asynchrormous.results import submit
from tests.helpers import ran_in_background, sleep_expr
from tests.testapp.models import Author, Book, Publisher

pytestmark = pytest.mark.django_db(transaction=True)


def test_count_is_a_lazy_int_in_comparisons_arithmetic_fstrings_and_templates(
    books, jobs
):
    n = Book.objects.run_async().count()
    assert len(jobs) in (0, 1)  # submitted, maybe not finished
    assert n > 5 and n >= 6 and n < 7 and n == 6 and n != 5
    assert int(n) == 6 and n + 1 == 7 and 1 + n == 7 and n * 2 == 12 and n - 1 == 5
    assert f"{n} books, {n:03d}" == "6 books, 006"
    assert Template("{{ n }} / {{ n|add:1 }}").render(Context({"n": n})) == "6 / 7"
    assert isinstance(resolve(n), int) and resolve(n) == 6
    assert len(jobs) == 1 and ran_in_background(jobs[0])


def test_count_derives_from_a_started_fetch(books, jobs):
    qs = Book.objects.filter(pages__gte=120).start()
    n = qs.count()
    assert qs.exists()
    assert n == 4
    assert len(jobs) == 1 and "COUNT" not in " ".join(jobs[0]["sql"]).upper()


def test_terminals_on_a_filled_cache_run_no_query(books, jobs):
    qs = Book.objects.order_by("pk").run_async()
    list(qs)
    with CaptureQueriesContext(connection) as caller:
        assert qs.count() == 6 and type(qs.count()) is int
        assert qs.exists() is True
        assert qs.first().title == "Book 0"
        assert qs.contains(books[2]) is True
    assert len(caller) == 0
    assert len(jobs) == 1


def test_exists_and_contains_are_lazy_bools(books):
    qs = Book.objects.run_async()
    assert qs.filter(pages=100).exists()
    assert not qs.filter(pages=1).exists()
    assert qs.contains(books[0]) and not qs.filter(pages=1).contains(books[0])


def test_aggregate_and_in_bulk_are_lazy_dicts(books):
    stats = Book.objects.run_async().aggregate(Avg("pages"), most=Max("year"))
    assert stats["pages__avg"] == 125 and stats["most"] == 1995
    assert dict(stats) == {"pages__avg": 125, "most": 1995}
    by_pk = Book.objects.run_async().in_bulk([books[0].pk, books[1].pk])
    assert set(by_pk) == {books[0].pk, books[1].pk}
    assert by_pk[books[0].pk].title == "Book 0"


def test_object_terminals_are_lazy_proxies(books):
    qs = Book.objects.run_async()
    got = qs.get(title="Book 3")
    assert isinstance(got, Book) and got == books[3] and got.pages == 130
    assert qs.order_by("pk").first() == books[0]
    assert qs.order_by("pk").last() == books[5]
    assert qs.earliest().year == 1990 and qs.latest("pages").pages == 150
    empty_first = qs.filter(pages=0).first()
    assert resolve(empty_first) is None and not empty_first


def test_writes_return_lazy_results(books):
    qs = Book.objects.run_async()
    rows = qs.filter(pages__lt=120).update(year=2001)
    assert rows == 2
    created = qs.create(title="New", author=books[0].author, pages=300)
    assert isinstance(created, Book) and resolve(created).pk is not None
    created.refresh_from_db()
    assert created.sheets == 150  # a generated field, computed by the database
    author = books[0].author
    obj, was_created = qs.get_or_create(title="New", defaults={"author": author})
    assert not was_created and obj.pk == created.pk
    deleted = qs.filter(title="New").delete()
    total, per_model = deleted
    assert total == 1 and per_model == {"testapp.Book": 1}
    assert Book.objects.filter(year=2001).count() == 2


def test_a_callers_background_writes_come_before_its_later_queries(books, jobs):
    author = books[0].author
    Book.objects.run_async().create(title="Mine", author=author)
    Book.objects.run_async().filter(title="Mine").update(pages=999)
    # No resolve(): the plain query and the background one still see both writes.
    assert Book.objects.get(title="Mine").pages == 999
    assert Book.objects.run_async().filter(pages=999).count() == 1


def test_errors_django_raises_before_the_database_are_raised_at_the_call(books, jobs):
    qs = Book.objects.run_async()
    with pytest.raises(FieldError):
        qs.filter(nope=1)
    with pytest.raises(FieldError):
        qs.order_by("nope").count()
    with pytest.raises(TypeError, match="non-expression"):
        qs.aggregate("pages")
    with pytest.raises(ValueError, match="must be a unique field"):
        qs.in_bulk([1], field_name="title")
    with pytest.raises(ValueError, match="get_latest_by"):
        Author.objects.run_async().earliest()
    with pytest.raises(TypeError, match="unexpected keyword"):
        qs.create(nope=1)
    with pytest.raises(TypeError, match="Field 'pages' expected a number but got"):
        qs.create(title="x", author=books[0].author, pages=())
    with pytest.raises(FieldDoesNotExist):
        qs.update(nope=1)
    sliced = Book.objects.all()[:2].run_async()  # slicing in background mode starts it
    with pytest.raises(TypeError, match="slice"):
        sliced.update(pages=1)
    with pytest.raises(TypeError, match="slice"):
        sliced.latest("pages")
    with pytest.raises(FieldError):
        qs.get(nope=1)
    assert jobs == []


def test_data_errors_keep_their_type_and_the_workers_traceback(books):
    qs = Book.objects.run_async()
    missing = qs.get(title="nope")
    several = qs.get(pages__gt=100)
    with pytest.raises(Book.DoesNotExist) as excinfo:
        print(missing.title)
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    # The frames of the thread that ran it (the pool's work item down to Django's
    # get()) are kept.
    names = [(frame.filename.rsplit("/", 1)[-1], frame.name) for frame in frames]
    assert ("pool.py", "execute") in names and ("query.py", "get") in names
    with pytest.raises(Book.MultipleObjectsReturned):
        resolve(several)
    Publisher.objects.run_async().create(name="Pub")  # unique name taken
    dup = Publisher.objects.run_async().create(name="Pub")
    with pytest.raises(IntegrityError):
        resolve(dup)


def test_an_exception_never_observed_is_logged_once_when_collected(books, caplog):
    gc.collect()  # earlier tests' unobserved results are not this test's
    result = Book.objects.run_async().get(title="nope")
    wait(result)
    del result
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        gc.collect()
    records = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info[0] is Book.DoesNotExist


def test_an_observed_exception_is_not_logged(books, caplog):
    result = Book.objects.run_async().get(title="nope")
    with pytest.raises(Book.DoesNotExist):
        resolve(result)
    del result
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_resolve_times_out_with_resulttimeout(books):
    slow = Book.objects.filter(pk=books[0].pk).annotate(z=sleep_expr(2)).start()
    with pytest.raises(ResultTimeout, match=r"not ready after 0\.05 s") as excinfo:
        resolve(slow, timeout=0.05)
    assert isinstance(excinfo.value, TimeoutError)
    with pytest.raises(ResultTimeout, match="1 of 1"):
        wait(slow, timeout=0.05)
    assert len(slow) == 1


def test_negative_timeout_is_rejected(books):
    n = Book.objects.run_async().count()
    with pytest.raises(ValueError, match="timeout must be None or >= 0"):
        resolve(n, timeout=-1)


def test_cancel_a_queued_job(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    release = threading.Event()
    blocker = submit(release.wait, 10, alias="default", writes=False, description="x")
    queued = Book.objects.run_async().count()
    assert not is_ready(queued)
    assert cancel(queued) is True
    release.set()
    assert blocker.result() is True
    with pytest.raises(Cancelled, match="cancelled before it ran"):
        resolve(queued)
    assert is_ready(queued)
    assert cancel(queued) is True  # as Future.cancel(): it is cancelled
    started = Book.objects.run_async().count()
    assert started == 6
    assert cancel(started) is False


def test_plain_values_pass_through_helpers():
    assert resolve(5) == 5 and is_ready(5) and not cancel(5)
    wait(1, "x")


def test_bulk_writes_update_or_create_and_explain(books):
    qs = Book.objects.run_async()
    author = books[0].author
    made = qs.bulk_create([Book(title=f"Bulk {i}", author=author) for i in range(3)])
    assert len(made) == 3 and all(isinstance(b, Book) for b in made)
    bulk = list(Book.objects.filter(title__startswith="Bulk"))
    for book in bulk:
        book.pages = 7
    assert qs.bulk_update(bulk, ["pages"]) == 3
    obj, created = qs.update_or_create(title="Bulk 0", defaults={"year": 1234})
    assert not created and obj.year == 1234
    assert "testapp_book" in qs.filter(pages=7).explain().lower()
    assert Book.objects.filter(pages=7, year=1234).count() == 1


def test_a_custom_queryset_with_the_mixin_gets_background_mode(books, jobs):
    from django.db import models

    from asynchrormous import AsyncQuerySetMixin

    class BookQuerySet(AsyncQuerySetMixin, models.QuerySet):
        def long(self):
            return self.filter(pages__gte=130)

    manager = BookQuerySet.as_manager()
    manager.model = Book
    qs = manager.long().run_async()
    n = qs.count()
    assert n == 3 and len(qs) == 3
    assert jobs and all(ran_in_background(job) for job in jobs)


def test_using_picks_the_database_on_the_callers_thread(books, jobs):
    assert Book.objects.using("default").run_async().count() == 6
    assert jobs[0]["alias"] == "default"


def test_a_finished_lazy_object_shows_as_its_value_and_copies_are_independent(books):
    got = Book.objects.run_async().get(pk=books[0].pk)
    wait(got)
    assert repr(got) == "<Book: Book 0>"
    duplicate = copy.deepcopy(got)
    assert type(duplicate) is Book and duplicate == books[0]
    duplicate.title = "changed"
    assert got.title == "Book 0"
    assert type(copy.copy(got)) is Book


def test_in_bulk_takes_any_iterable(books):
    found = Book.objects.run_async().in_bulk(iter([books[0].pk, books[1].pk]))
    assert set(found) == {books[0].pk, books[1].pk}
