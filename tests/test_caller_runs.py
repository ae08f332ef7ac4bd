"""Caller-runs: a sync caller that needs a result no worker has picked up runs it.

It runs the job on its own thread and open connection, once, in the job's context,
after the caller's earlier jobs; never inside the caller's transaction, never on an
event loop, never a job a worker has claimed or that was cancelled.
"""

import asyncio
import concurrent.futures
import contextvars
import os
import threading

import pytest
from django.db import connection, transaction
from django.utils import timezone

from asynchrormous import Cancelled, ResultTimeout, cancel, resolve
from asynchrormous.pool import WorkItem
from asynchrormous.results import submit
from tests.helpers import (
    backend_id_expr,
    caller_backend_id,
    in_a_forked_child,
    not_shared_cache,
    occupy_a_worker,
)
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

here = threading.current_thread


def release_later(release, seconds=0.3):
    timer = threading.Timer(seconds, release.set)
    timer.start()
    return timer


def test_a_result_used_right_after_it_was_started_runs_on_the_callers_thread(
    books, busy_pool, jobs
):
    mine = caller_backend_id()
    qs = Book.objects.annotate(where=backend_id_expr()).order_by("pk").start()
    n = Book.objects.run_async().filter(pages__gt=120).count()
    rows = list(qs)  # the only worker is busy: no waiting for it
    assert {row.where for row in rows} == {mine}
    assert [r.title for r in rows] == [b.title for b in Book.objects.order_by("pk")]
    assert n == Book.objects.filter(pages__gt=120).count() == 3
    assert [(j["thread"], j["inline"]) for j in jobs] == [(here().name, True)] * 2
    assert not busy_pool.is_set()  # the worker was busy all along


def test_by_default_the_caller_waits_for_a_worker(books, settings):
    """CALLER_RUNS is off by default: a job the caller ran itself could outlast
    TIMEOUT (it cannot go on after the wait gives up), and would see the caller's
    session state (tests/test_caller_runs_hostile.py)."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    caller_backend_id()  # the caller holds a connection it could run the job on
    release = threading.Event()
    blocker = occupy_a_worker(release)
    job = submit(lambda: here().name, alias="default", writes=False, description="w")
    release_later(release)  # whenever it comes, the worker runs the job after it
    assert job.result().startswith("asynchrormous-")
    assert blocker.result() is True


def test_a_job_a_worker_is_running_is_waited_for_not_run_again(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    caller_backend_id()  # the caller holds a connection it could run the job on
    started, go = threading.Event(), threading.Event()
    runs = []

    def job():
        runs.append(here().name)
        started.set()
        assert go.wait(10)
        return Book.objects.count()

    j = submit(job, alias="default", writes=False, description="job")
    assert started.wait(10)
    release_later(go)
    assert j.result() == 6
    assert len(runs) == 1 and runs[0].startswith("asynchrormous-")


def test_the_claim_lets_exactly_one_thread_run_a_job():
    """A worker's claim and a caller's take-over, released at one instant."""
    for _ in range(300):
        runs = []
        item = WorkItem(concurrent.futures.Future(), runs.append, (1,), {})
        gate = threading.Barrier(3)

        def worker(item=item, gate=gate):
            gate.wait()
            item.run()

        def caller(item=item, gate=gate):
            gate.wait()
            item.run_here()

        threads = [threading.Thread(target=worker), threading.Thread(target=caller)]
        for thread in threads:
            thread.start()
        item_ran_here = item.run_here  # the third contender: this thread
        gate.wait()
        item_ran_here()
        for thread in threads:
            thread.join(10)
        assert runs == [1]
        assert item.future.result(0) is None


def test_many_callers_of_one_job_run_it_once(books, busy_pool):
    runs = []
    lock = threading.Lock()

    def count():
        with lock:
            runs.append(here().name)
        return Book.objects.count()

    job = submit(count, alias="default", writes=False, description="count")
    # Few enough connections for Django's psycopg pool (max_size 8 in the tests).
    gate = threading.Barrier(4)
    values = []

    def use():
        connection.ensure_connection()
        try:
            gate.wait(10)
            values.append(job.result())
        finally:
            connection.close()

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert values == [6] * 4
    assert len(runs) == 1 and not runs[0].startswith("asynchrormous-")


def test_writes_taken_over_keep_their_order(books, busy_pool, jobs):
    caller_backend_id()
    qs = Book.objects.run_async()
    created = qs.create(title="New", author=books[0].author, pages=1, year=2020)
    updated = qs.filter(title="New").update(pages=2)
    n = qs.filter(pages=2).count()
    assert resolve(created).title == "New"  # no earlier job: run here
    assert updated == 1  # after the create, here
    assert n == 1  # after the update, here
    assert [j["thread"] for j in jobs] == [here().name] * 3
    assert Book.objects.get(title="New").pages == 2


def test_a_read_after_a_queued_write_runs_the_write_here_first(books, busy_pool, jobs):
    """The read comes after the write: the caller runs the write first, then the
    read, rather than run the read ahead of it or wait for a busy worker."""
    caller_backend_id()
    qs = Book.objects.run_async()
    updated = qs.filter(pk=books[0].pk).update(pages=999)
    n = qs.filter(pages=999).count()
    assert n == 1  # the write ran first, here
    assert updated == 1
    assert [j["description"] for j in jobs] == [
        "Book queryset.update()",
        "Book queryset.count()",
    ]
    assert [j["thread"] for j in jobs] == [here().name] * 2
    assert not busy_pool.is_set()


def test_a_job_started_before_atomic_never_runs_inside_the_transaction(
    books, busy_pool
):
    """Not inside the caller's block: a write would roll back with it. On PostgreSQL
    a worker runs it; SQLite's BEGIN, a statement, first runs it on the caller."""
    caller_backend_id()

    def probe():
        return connection.in_atomic_block

    job = submit(probe, alias="default", writes=False, description="probe")
    release_later(busy_pool)
    with transaction.atomic():
        assert job.result() is False
        assert connection.in_atomic_block


def test_a_cancelled_job_is_not_taken_over(books, busy_pool, jobs):
    caller_backend_id()
    n = Book.objects.run_async().count()
    assert cancel(n)
    with pytest.raises(Cancelled):
        resolve(n)
    assert jobs == []


def test_an_explicit_timeout_waits_instead(books, busy_pool, jobs):
    """A caller bounding its wait gets control back in time; the job stays queued."""
    caller_backend_id()
    n = Book.objects.run_async().count()
    with pytest.raises(ResultTimeout):
        resolve(n, timeout=0.05)
    assert jobs == []
    assert n == 6  # the next use, without a timeout, runs it here
    assert jobs[0]["thread"] == here().name


@not_shared_cache  # Django never closes an in-memory SQLite connection
def test_a_caller_without_a_connection_waits_for_a_worker(books, busy_pool, jobs):
    """Caller-runs never opens a connection: the process keeps WORKERS plus its own."""
    connection.close()
    n = Book.objects.run_async().count()
    release_later(busy_pool)
    assert n == 6
    assert connection.connection is None
    assert jobs[0]["thread"].startswith("asynchrormous-")


def test_an_event_loop_never_runs_a_job(books, busy_pool, jobs):
    caller_backend_id()
    n = Book.objects.run_async().count()

    async def use():
        release_later(busy_pool)
        return int(n)  # blocks the loop, as any sync wait would, but runs nothing

    assert asyncio.run(use()) == 6
    assert jobs[0]["thread"].startswith("asynchrormous-")


def test_a_job_taken_over_runs_in_its_own_context(books, busy_pool):
    caller_backend_id()
    tenant = contextvars.ContextVar("tenant")
    tenant.set("at the call")

    def seen():
        return tenant.get(), timezone.get_current_timezone_name(), here().name

    with timezone.override("Asia/Tokyo"):
        job = submit(seen, alias="default", writes=False, description="seen")
    tenant.set("later")
    assert job.result() == ("at the call", "Asia/Tokyo", here().name)
    assert tenant.get() == "later"
    assert timezone.get_current_timezone_name() != "Asia/Tokyo"


def test_a_job_taken_over_that_fails_raises_where_it_is_used(books, busy_pool):
    caller_backend_id()
    missing = Book.objects.run_async().get(title="nope")
    with pytest.raises(Book.DoesNotExist):
        resolve(missing)
    # The caller's connection is still usable.
    assert Book.objects.count() == 6


def test_a_forked_child_never_runs_its_parents_queued_job(books, busy_pool):
    """The child's copy of the queue is not its own: the parent's pool runs the job."""
    caller_backend_id()
    job = submit(os.getpid, alias="default", writes=False, description="pid")
    # The child never touches the database.
    report = in_a_forked_child(lambda: repr(job.take_over()))
    assert report == "False"
    assert job.result() == os.getpid()


def test_a_plain_query_runs_the_callers_queued_writes_here_first(
    books, busy_pool, jobs
):
    """Read-your-writes without waiting for a busy pool: the plain query's barrier
    runs the caller's own queued jobs on its connection, in order, then the query."""
    caller_backend_id()
    qs = Book.objects.run_async()
    qs.create(title="Mine", author=books[0].author, pages=1, year=2020)
    qs.filter(title="Mine").update(pages=7)
    qs.filter(title="Mine").update(pages=8)
    assert Book.objects.get(title="Mine").pages == 8
    assert [j["description"] for j in jobs] == [
        "Book queryset.create()",
        "Book queryset.update()",
        "Book queryset.update()",
    ]
    assert {j["thread"] for j in jobs} == {here().name}
    assert not busy_pool.is_set()


def test_a_plain_write_runs_the_callers_queued_read_here_before_it(
    books, busy_pool, jobs
):
    caller_backend_id()
    n = Book.objects.run_async().filter(pages=100).count()
    # Waits for the count (it reads the rows as they were): runs it here first.
    Book.objects.filter(pages=100).update(pages=1)
    assert n == 1 and Book.objects.filter(pages=100).count() == 0
    assert jobs[0]["thread"] == here().name


def test_a_plain_write_in_djangos_own_atomic_waits_for_a_worker(books, busy_pool, jobs):
    """delete() opens atomic() before its statement: the read is not run inside."""
    caller_backend_id()
    n = Book.objects.run_async().count()
    release_later(busy_pool)
    Book.objects.filter(pk=books[0].pk).delete()
    assert n == 6 and Book.objects.count() == 5
