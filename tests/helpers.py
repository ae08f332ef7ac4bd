"""Helpers that make the database report where and how long a query ran."""

import os
import select
import signal
import threading
import time

import pytest
from django.db import connection, models
from django.db.models.expressions import RawSQL

from tests.testapp.apps import BACKEND_ID_SQL, BACKEND_THREADS, SLEEP_SQL


def backend_id_expr():
    """An annotation: the id of the database session that ran the query."""
    return RawSQL(BACKEND_ID_SQL[connection.vendor], [])


def sleep_expr(seconds):
    """An annotation that makes the database spend ``seconds`` per row."""
    return RawSQL(SLEEP_SQL[connection.vendor], [seconds])


def caller_backend_id():
    connection.ensure_connection()
    return connection.test_backend_id


def thread_of(backend_id):
    return BACKEND_THREADS.get(backend_id)


def ran_in_background(job):
    """Whether a ``job_finished`` report is of a background run: on a worker, or on
    the test's thread, which used the result before any worker had picked it up
    (caller-runs). Use ``wait()`` first to have a worker run it."""
    return job["thread"].startswith("asynchrormous-") or (
        job["thread"] == threading.current_thread().name
    )


BUSY_SQL = {
    # A statement that runs until cancelled and fails when it is.
    "postgresql": "pg_sleep(60) IS NULL",
    "mysql": "(SELECT COUNT(*) FROM information_schema.columns a, "
    "information_schema.columns b, information_schema.columns c)",
    "sqlite": "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "LIMIT 10000000000) SELECT count(*) FROM c)",
}


def busy_expr():
    """An annotation whose statement runs until the database is asked to cancel it."""
    return RawSQL(BUSY_SQL[connection.vendor], [])


# SQLite's shared cache, which Django's in-memory test database uses, serialises its
# connections, and Django never closes an in-memory connection.
not_shared_cache = pytest.mark.skipif(
    os.environ.get("ASYNCHRORMOUS_TEST_DB") == "sqlite-memory",
    reason="in-memory shared-cache SQLite",
)


_inherited_connections = []


def own_connection_in_child():
    """In a forked child: leave the parent's connection alone and open our own.

    The parent still uses that socket: keep the object (never closed, never
    finalized: the child leaves with ``os._exit``). Django's psycopg pool is the
    parent's too, and its threads did not survive the fork: the child makes its
    own.
    """
    _inherited_connections.append(connection.connection)
    connection.connection = None
    pools = getattr(connection, "_connection_pools", None)  # the wrapper class's
    if pools is not None and connection.alias in pools:
        _inherited_connections.append(pools.pop(connection.alias))


def in_a_forked_child(child, timeout=20):
    """What ``child()`` returns (a str) when run in a forked child of this process.

    The child never returns into pytest (``os._exit``); its exception is raised
    here as an AssertionError. A child that has not reported and exited within
    ``timeout`` seconds is killed and fails the test.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            try:
                report = f"ok {child()}"
            except BaseException as exc:
                report = f"error {type(exc).__name__}: {exc}"
            os.write(write_end, report.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks = []
    exited = False
    try:
        while not exited:  # until the child exits (end of file) or the deadline
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_end], [], [], left)
            if not ready:
                break
            chunk = os.read(read_end, 65536)
            chunks.append(chunk)
            exited = not chunk
    finally:
        os.close(read_end)
        if not exited:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert exited, f"the forked child did not finish in {timeout} s"
    status, _, value = b"".join(chunks).decode().partition(" ")
    assert status == "ok", f"the forked child failed: {value}"
    return value


def occupy_a_worker(release, timeout=10):
    """A job that holds a worker until ``release`` is set (at most ``timeout`` s).

    Submitted from another thread, so it is not one of the test's own pending
    jobs: a plain write of the test would wait for those (it comes after its reads).
    """
    from asynchrormous.results import submit

    jobs = []
    thread = threading.Thread(
        target=lambda: jobs.append(
            submit(
                release.wait,
                timeout,
                alias="default",
                writes=False,
                description="busy worker",
            )
        )
    )
    thread.start()
    thread.join(timeout)
    (job,) = jobs
    return job


class Counted(models.Func):
    """A custom expression whose as_sql() counts its runs (user-visible code)."""

    function = ""
    template = "(%(expressions)s)"
    runs = 0

    def as_sql(self, compiler, connection, **extra):
        type(self).runs += 1
        return super().as_sql(compiler, connection, **extra)
