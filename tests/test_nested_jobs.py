"""Work a job starts itself: submitted with CALLER_RUNS, inline without.

With CALLER_RUNS a worker's job submits its nested work to the pool, so
independent nested queries run side by side; whatever of it no other worker has
picked up when the job needs it, the job runs itself, so nesting never deadlocks,
even with one worker. A job ends with its nested jobs, as a plain call ends with
its work: its caller then reads their writes. Nested work does not wait for the
caller's pending jobs (the job itself came after those).
"""

import threading

import pytest
from django.db import transaction
from django.db.models.signals import post_save

from asynchrormous import resolve
from asynchrormous.results import submit
from tests.testapp.models import AuditEntry, Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

here = threading.current_thread
WAIT = 10  # seconds: every wait in these tests is bounded


def nested(fn, *args, writes=False):
    return submit(fn, *args, alias="default", writes=writes, description="nested")


def outer(fn, *args, writes=False):
    return submit(fn, *args, alias="default", writes=writes, description="outer")


def test_nested_jobs_run_side_by_side_on_other_threads(books, settings, jobs):
    settings.ASYNCHRORMOUS = {"WORKERS": 3, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    # Only two jobs running at once can both pass it.
    together = threading.Barrier(2, timeout=WAIT)

    def lookup(pk):
        together.wait()
        return here().name, Book.objects.get(pk=pk).title

    def job():
        first, second = nested(lookup, books[0].pk), nested(lookup, books[1].pk)
        return here().name, first.result(), second.result()

    mine, (t1, title1), (t2, title2) = outer(job).result()
    assert (title1, title2) == (books[0].title, books[1].title)
    assert t1 != t2
    assert {mine, t1, t2} <= {t.name for t in threading.enumerate()}
    assert all(name.startswith("asynchrormous-") for name in (mine, t1, t2))
    assert [j["description"] for j in jobs].count("nested") == 2


def test_with_one_worker_the_job_runs_its_nested_work_itself(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0, "CALLER_RUNS": True}

    def job():
        count = Book.objects.run_async().filter(pages__gt=120).count()
        titles = Book.objects.run_async().order_by("pk").values_list("title").start()
        return here().name, int(count), [t for (t,) in titles]

    thread, count, titles = outer(job).result()
    assert thread.startswith("asynchrormous-")
    assert count == 3
    assert titles == [b.title for b in books]


def test_a_job_ends_with_its_nested_writes(books, settings):
    """The job returns before its fire-and-forget nested write has run; its result
    is ready only once that write landed, so its caller reads it."""
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    started, go = threading.Event(), threading.Event()

    def write():
        started.set()
        assert go.wait(WAIT)
        return AuditEntry.objects.create(action="nested").pk

    def job():
        nested(write, writes=True)  # nobody uses its result
        return "returned"

    job_ = outer(job)
    assert started.wait(WAIT)  # the other worker runs the write
    assert not job_.done()  # the job waits for it
    go.set()
    assert job_.result() == "returned"
    assert AuditEntry.objects.filter(action="nested").count() == 1


def test_nested_reads_come_after_the_jobs_own_nested_writes(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 3, "TIMEOUT": 30.0, "CALLER_RUNS": True}

    def job():
        Author.objects.run_async().create(name="Nested")  # fire and forget
        return int(Author.objects.run_async().filter(name="Nested").count())

    assert outer(job).result() == 1


def test_a_nested_job_does_not_wait_for_the_write_that_started_it(books, settings):
    """A background create() whose post_save handler uses a nested count: the count
    must not wait for the create, which waits for it (one worker: it runs it)."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0, "CALLER_RUNS": True}
    counted = []

    def on_save(sender, instance, created, **kwargs):
        counted.append((here().name, int(Book.objects.run_async().count())))
        AuditEntry.objects.run_async().create(action=f"saved {instance.title}")

    post_save.connect(on_save, sender=Book, weak=False)
    try:
        book = Book.objects.run_async().create(title="Nested", author=books[0].author)
        assert resolve(book).title == "Nested"
    finally:
        post_save.disconnect(on_save, sender=Book)
    [(thread, count)] = counted
    assert thread.startswith("asynchrormous-")
    assert count == 7  # the new book is in its own transaction's view
    # The handler's fire-and-forget write landed before the create's result.
    assert AuditEntry.objects.filter(action="saved Nested").count() == 1


def test_without_caller_runs_nested_work_runs_inline(books, settings, jobs):
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0}

    def job():
        return here().name, nested(lambda: here().name).result()

    mine, theirs = outer(job).result()
    assert mine == theirs and mine.startswith("asynchrormous-")
    assert [j["inline"] for j in jobs if j["description"] == "nested"] == [True]


def test_in_a_transaction_nested_work_runs_inline(books, settings):
    """Its uncommitted rows are visible only on the job's own connection."""
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0, "CALLER_RUNS": True}

    def job():
        with transaction.atomic():
            Author.objects.create(name="Uncommitted")
            seen = Author.objects.run_async().filter(name="Uncommitted").count()
            return here().name, nested(lambda: here().name).result(), int(seen)

    mine, theirs, seen = outer(job).result()
    assert mine == theirs
    assert seen == 1


def test_a_job_a_caller_took_over_runs_its_nested_work_inline(books, busy_pool):
    """The caller's thread may hold no connection to a nested job's database, and
    is not one of the WORKERS: what it takes over runs as in plain code."""

    def job():
        return here().name, nested(lambda: here().name).result()

    caller = here().name
    Book.objects.count()  # the caller holds a connection: it may take the job over
    assert outer(job).result() == (caller, caller)


def test_the_readmes_nested_example(books, settings, jobs):
    settings.ASYNCHRORMOUS = {"WORKERS": 3, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    seen = []

    def on_book_saved(sender, instance, created, **kwargs):
        theirs = Book.objects.filter(author=instance.author_id).run_async()
        count, longest = theirs.count(), theirs.order_by("-pages").first()
        seen.append((here().name, int(count), longest.title))

    a = books[0].author
    post_save.connect(on_book_saved, sender=Book, weak=False)
    try:
        book = Book.objects.run_async().create(
            title="Emma", author=a, pages=400, year=1815
        )
        assert resolve(book).pk is not None
    finally:
        post_save.disconnect(on_book_saved, sender=Book)
    [(thread, count, title)] = seen
    assert thread.startswith("asynchrormous-")
    assert (count, title) == (4, "Emma")
    *nested_jobs, saved = jobs  # the create() ends last: with its nested jobs
    assert "create" in saved["description"]
    assert len(nested_jobs) == 2
    assert all(j["thread"].startswith("asynchrormous-") for j in nested_jobs)
