"""A timeout is not a cancellation: ResultTimeout leaves the job running.

DESIGN.md, "Under concurrency, cancellation and faults": the next use waits on the
same job; no query is ever run twice because a caller polled it.
"""

import pytest

import asynchrormous
from asynchrormous import ResultTimeout, resolve
from tests.helpers import sleep_expr
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = 0.6  # the query
POLL = 0.25  # each resolve() waits this long
ATTEMPTS = 20  # 5 s of polling: a query that restarts on every poll never finishes


def slow_books(book):
    return Book.objects.filter(pk=book.pk).annotate(z=sleep_expr(SLOW))


def poll(value):
    """resolve(value, timeout=POLL) until it answers; (value, timeouts seen)."""
    for timeouts in range(ATTEMPTS):
        try:
            return resolve(value, timeout=POLL), timeouts
        except ResultTimeout:
            continue
    pytest.fail(f"not resolved after {ATTEMPTS} polls of {POLL} s on a {SLOW} s job")


def runs(jobs, description):
    """How many jobs with this description ran, once every started job has ended."""
    asynchrormous.shutdown()  # waits for running jobs; nothing may be left queued
    return len([job for job in jobs if job["description"] == description])


def test_polling_a_background_queryset_with_a_timeout_runs_the_query_once(books, jobs):
    qs = slow_books(books[0]).run_async()
    try:
        resolved, timeouts = poll(qs)
        assert [b.pk for b in resolved] == [books[0].pk]
        assert timeouts >= 1
        assert len(qs) == 1
    finally:
        ran = runs(jobs, "fetch of Book queryset")
    assert ran == 1, f"the query ran {ran} times"


def test_after_a_timeout_using_a_started_queryset_waits_on_the_same_fetch(books, jobs):
    qs = slow_books(books[0]).start()
    with pytest.raises(ResultTimeout):
        resolve(qs, timeout=POLL)
    assert [b.pk for b in qs] == [books[0].pk]
    assert runs(jobs, "fetch of Book queryset") == 1


def test_polling_a_lazy_count_with_a_timeout_waits_on_the_same_job(books, jobs):
    # distinct(): count() keeps the (slow) annotation instead of stripping it.
    n = slow_books(books[0]).distinct().run_async().count()
    value, timeouts = poll(n)
    assert value == 1 and timeouts >= 1
    assert n == 1
    assert runs(jobs, "Book queryset.count()") == 1


def test_polling_a_lazy_get_with_a_timeout_waits_on_the_same_job(books, jobs):
    book = slow_books(books[0]).run_async().get()
    value, timeouts = poll(book)
    assert value.pk == books[0].pk and timeouts >= 1
    assert book.title == "Book 0"
    assert runs(jobs, "Book queryset.get()") == 1
