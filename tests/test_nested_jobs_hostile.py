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
