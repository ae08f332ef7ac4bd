"""The worker pool: real overlap, bounded connections, fork safety, transactions."""

import contextvars
import threading
import time

import pytest
from django.db import connection, connections, transaction
from django.db.models import Prefetch

import asynchrormous
from asynchrormous import resolve, wait
from asynchrormous.results import submit
from asynchrormous.signals import job_finished
from tests.helpers import (
    backend_id_expr,
    caller_backend_id,
    in_a_forked_child,
    not_shared_cache,
    sleep_expr,
    thread_of,
)
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

needs_server = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="counts server-side sessions"
)
# Django's psycopg pool keeps returned connections open: it, not the workers, bounds
# the server sessions then (its max_size).
not_django_pool = pytest.mark.skipif(
    bool(connection.settings_dict.get("OPTIONS", {}).get("pool")),
    reason="Django's connection pool owns the sessions",
)

SLEEP = 0.3


def where(qs=None):
    """The database session that ran a background fetch of ``qs``."""
    qs = Book.objects.all() if qs is None else qs
    started = qs.annotate(where=backend_id_expr()).run_async()[:1]
    wait(started)  # on a worker: wait() never runs a job on the caller
    (row,) = started
    return row.where


def server_sessions():
    """Sessions on the test database other than the caller's own."""
    sql = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        "mysql": "SELECT count(*) FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID()",
    }[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def eventually(predicate, timeout=10.0):
    """Poll, bounded, a server-side state that changes on its own (a closed session)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def slow(book):
    return Book.objects.filter(pk=book.pk).annotate(z=sleep_expr(SLEEP))


@not_shared_cache
def test_started_queries_overlap_while_plain_ones_add_up(books):
    t0 = time.perf_counter()
    assert len(slow(books[0])) == 1
    one = time.perf_counter() - t0

    t0 = time.perf_counter()
    for book in books[:4]:
        assert len(slow(book)) == 1
    sequential = time.perf_counter() - t0

    t0 = time.perf_counter()
    started = [slow(book).start() for book in books[:4]]
    assert [len(qs) for qs in started] == [1, 1, 1, 1]
    together = time.perf_counter() - t0

    assert one >= SLEEP and sequential >= 4 * SLEEP
    assert together < 2 * one, (together, one)


def test_workers_keep_their_connection_between_jobs_even_with_conn_max_age_0(
    books, settings
):
    assert connection.settings_dict["CONN_MAX_AGE"] == 0
    settings.ASYNCHRORMOUS = {"WORKERS": 1}
    first = where()
    assert where() == first and where() == first
    assert thread_of(first) == "asynchrormous-0"


@not_shared_cache
def test_a_connection_older_than_its_max_age_is_replaced(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "CONNECTION_MAX_AGE": 1e-9}
    first = where()
    assert where() != first


@needs_server
def test_a_connection_killed_while_idle_is_replaced_before_the_next_job(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1}
    victim = where()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(%s)", [victim])
        else:
            cursor.execute(f"KILL {int(victim)}")
    survivor = where()
    assert survivor != victim
    assert Book.objects.run_async().count() == 6


@needs_server
@not_django_pool
def test_sessions_stay_within_workers_and_go_back_to_baseline_on_shutdown(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 3}
    baseline = server_sessions()
    submitted = threading.Barrier(9, timeout=30)
    results = []

    def submitter(book):
        try:
            mine = [slow(book).start(), Book.objects.run_async().count()]
            submitted.wait()
            results.append((len(mine[0]), int(mine[1])))
        finally:
            connection.close()

    threads = [threading.Thread(target=submitter, args=(b,)) for b in books + books[:2]]
    for thread in threads:
        thread.start()
    submitted.wait()
    peak = server_sessions()
    for thread in threads:
        thread.join(30)
    peak = max(peak, server_sessions())
    assert results == [(1, 6)] * 8
    assert baseline < peak <= baseline + 3

    asynchrormous.shutdown()
    eventually(lambda: server_sessions() == baseline)


@needs_server
@not_django_pool
def test_idle_workers_close_their_connections(books, settings):
    settings.ASYNCHRORMOUS = {"CONNECTION_IDLE_TIMEOUT": 0.1}
    baseline = server_sessions()
    where()
    assert server_sessions() == baseline + 1
    eventually(lambda: server_sessions() == baseline)
    assert where()  # the idle worker reconnects for the next job


def test_a_forked_child_builds_its_own_pool_and_leaves_the_parents_alone(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1}
    parent_session = where()
    report = in_a_forked_child(lambda: f"{where()} {Book.objects.count()}")
    child_session, child_count = report.split()
    assert child_count == "6"
    if connection.vendor != "sqlite":
        assert child_session != str(parent_session)
    assert where() == parent_session  # the parent's worker connection still works


def test_nested_background_work_in_a_worker_runs_inline_and_cannot_deadlock(
    books, settings, jobs
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    authors = Author.objects.prefetch_related(
        Prefetch("books", queryset=Book.objects.run_async())
    ).run_async()
    assert sorted(len(a.books.all()) for a in authors) == [3, 3]
    (outer,) = [job for job in jobs if job["description"] == "fetch of Author queryset"]
    assert outer["thread"] == "asynchrormous-0" and not outer["inline"]


def test_jobs_see_the_submitters_contextvars(books):
    tenant = contextvars.ContextVar("tenant")
    tenant.set("acme")
    seen = []

    def record(**kwargs):
        seen.append((tenant.get(None), kwargs["thread"]))

    job_finished.connect(record, weak=False)
    try:
        assert Book.objects.run_async().count() == 6
        job = submit(tenant.get, alias="default", writes=False, description="read var")
        assert job.result() == "acme"
    finally:
        job_finished.disconnect(record)
    assert seen[0][0] == "acme" and seen[0][1].startswith("asynchrormous-")


def test_inside_atomic_background_work_runs_inline_and_reads_uncommitted_rows(books):
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        Book.objects.create(title="Uncommitted", author=books[0].author)
        mine = caller_backend_id()
        rows = list(
            Book.objects.filter(title="Uncommitted")
            .annotate(where=backend_id_expr())
            .run_async()
        )
        assert [r.where for r in rows] == [mine]
        assert Book.objects.run_async().count() == 7
        missing = Book.objects.run_async().get(title="nope")
        with pytest.raises(Book.DoesNotExist):
            resolve(missing)
        raise Rollback
    assert not Book.objects.filter(title="Uncommitted").exists()
    assert Book.objects.count() == 6


def test_instrumentation_leaves_wrappers_that_a_job_adds(books, settings, jobs):
    """job_finished's SQL recorder is removed by identity, not by popping the last."""
    from django.db.backends.signals import connection_created

    def marker(execute, sql, params, many, context):
        return execute(sql, params, many, context)

    def add_marker(sender, connection, **kwargs):
        connection.execute_wrappers.append(marker)

    settings.ASYNCHRORMOUS = {"WORKERS": 1}
    connection_created.connect(add_marker, weak=False)
    try:
        n = Book.objects.run_async().count()
        wait(n)  # on the worker, which connects in the job
        assert n == 6
    finally:
        connection_created.disconnect(add_marker)
    left = submit(
        lambda: list(connections["default"].execute_wrappers),
        alias="default",
        writes=False,
        description="wrappers",
    ).result(10)  # a wait with a timeout never runs the job on the caller
    assert [w for w in left if w is marker] == [marker]
    # Only the recorder of the job that is running now, none left over.
    assert len([w for w in left if getattr(w, "__name__", "") == "record"]) == 1


@not_shared_cache
def test_concurrent_background_writes_from_many_callers_all_land(books, settings):
    """With the recommended SQLite OPTIONS (busy timeout, WAL): no 'database locked'."""
    settings.ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": 30.0}
    author = books[0].author
    errors = []

    def caller(n):
        try:
            made = [
                Book.objects.run_async().create(title=f"W{n}-{i}", author=author)
                for i in range(10)
            ]
            updated = Book.objects.run_async().filter(title__startswith=f"W{n}-")
            assert updated.update(pages=n) == 10  # after this caller's own creates
            for obj in made:
                resolve(obj)
        except Exception as exc:  # reported below, with the thread's own traceback
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert Book.objects.filter(title__startswith="W").count() == 40
    assert sorted(
        set(Book.objects.filter(title__startswith="W").values_list("pages", flat=True))
    ) == [0, 1, 2, 3]
