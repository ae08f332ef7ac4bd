"""Hostile tests of nested jobs (CALLER_RUNS): a worker's job that starts work.

Each pins a rule of DESIGN.md that nesting must not break: a cancel touches only
its own job, and nesting never deadlocks, even with one worker.
"""

import asyncio
import concurrent.futures
import threading

import pytest
from django.db import transaction

from asynchrormous.results import await_job, submit
from asynchrormous.signals import job_finished
from tests.helpers import busy_expr
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 10  # seconds: every wait in these tests is bounded


def nested(fn, *args, writes=False):
    return submit(fn, *args, alias="default", writes=writes, description="nested")


def outer(fn, *args, writes=False):
    return submit(fn, *args, alias="default", writes=writes, description="outer")


async def test_a_cancel_of_the_job_never_stops_a_nested_jobs_statement(books, settings):
    """The job runs its nested job itself (one worker): a cancel of the job while
    the nested statement runs on the job's connection must leave that statement
    alone; only the nested job's own cancel stops it."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    started = threading.Event()
    jobs = []

    def busy():
        started.set()
        return Book.objects.annotate(b=busy_expr()).filter(b=True).count()

    def job():
        Book.objects.count()  # the job has sent a statement
        jobs.append(nested(busy))
        return jobs[0].result()  # no other worker: the job runs it

    outer_job = outer(job)
    waiter = asyncio.create_task(await_job(outer_job))
    assert await asyncio.to_thread(started.wait, WAIT)
    before = set(threading.enumerate())
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # Let the cancel of the job be delivered, all of it.
    for thread in set(threading.enumerate()) - before:
        if not thread.daemon:
            await asyncio.to_thread(thread.join, WAIT)
    [inner] = jobs
    assert not inner.done(), "the job's cancel stopped its nested job's statement"
    inner.running.cancel()  # its own cancel stops it
    futures = [inner.future, outer_job.future]
    _, not_done = await asyncio.to_thread(concurrent.futures.wait, futures, WAIT)
    assert not not_done


def test_a_nested_read_used_inside_the_jobs_transaction_with_one_worker(
    books, settings
):
    """Submitted before the job's atomic() block, used inside it: the only worker
    runs the job, so the job must run it (plain Django ran it before the block)."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 5.0, "CALLER_RUNS": True}

    def job():
        n = Book.objects.run_async().count()
        with transaction.atomic():
            Author.objects.create(name="Inside")
            return int(n)

    assert outer(job).result(WAIT) == 6


def test_a_nested_write_before_the_jobs_transaction_with_one_worker(books, settings):
    """A fire-and-forget nested write, then a transaction: the write lands on its
    own, before the block (a rollback of the block keeps it), as in plain Django."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 5.0, "CALLER_RUNS": True}

    def job():
        Author.objects.run_async().create(name="Before")
        try:
            with transaction.atomic():
                Author.objects.create(name="Inside")
                raise LookupError("roll back")
        except LookupError:
            pass
        names = Author.objects.filter(name__in=["Before", "Inside"])
        return sorted(names.values_list("name", flat=True))

    assert outer(job).result(WAIT) == ["Before"]


def test_a_jobs_report_comes_after_its_nested_jobs_reports(books, settings, jobs):
    """job_finished is sent "once it ends", and a job ends with its nested jobs:
    its report follows theirs, with the time it spent waiting for them."""
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    started, go, reported = threading.Event(), threading.Event(), threading.Event()

    def write():
        started.set()
        assert go.wait(WAIT)
        return Author.objects.create(name="Nested").pk

    def job():
        nested(write, writes=True)  # fire and forget
        assert started.wait(WAIT)  # the other worker runs it
        return "returned"

    def on_finished(description, **kwargs):
        if description == "outer":
            reported.set()

    job_finished.connect(on_finished, weak=False)
    try:
        outer_job = outer(job)
        assert started.wait(WAIT)
        # The job's report waits for the nested write, which waits for go.
        reported_early = reported.wait(0.5)
        go.set()
        assert outer_job.result(WAIT) == "returned"
    finally:
        job_finished.disconnect(on_finished)
    assert not reported_early
    assert [j["description"] for j in jobs] == ["nested", "outer"]


def test_a_join_that_timed_out_leaves_the_jobs_value(books, settings, caplog):
    """A timeout is not a cancellation: the job's write landed, and its result
    must not raise ResultTimeout (a caller would retry the write). The nested
    job still running after TIMEOUT goes on, and is logged."""
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 1.0, "CALLER_RUNS": True}
    started, go = threading.Event(), threading.Event()

    def slow():
        started.set()
        go.wait(WAIT)

    def job():
        pk = Author.objects.create(name="Landed").pk
        nested(slow)
        assert started.wait(WAIT)  # the other worker runs it
        return pk

    outer_job = outer(job, writes=True)
    # The job waits TIMEOUT for its nested job, then ends.
    concurrent.futures.wait([outer_job.future], WAIT)
    assert outer_job.done()
    go.set()
    pk = Author.objects.get(name="Landed").pk
    assert outer_job.result(WAIT) == pk
    assert "still running after TIMEOUT" in caplog.text
