"""Faults: a worker's connection that the server ended while it sat idle."""

import time

import pytest
from django.db import connection

from asynchrormous import resolve, wait
from tests.helpers import backend_id_expr
from tests.testapp.models import Book

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor == "sqlite", reason="ends server sessions"),
]

KILL_SQL = {
    "postgresql": "SELECT pg_terminate_backend(%s)",
    "mysql": "KILL %s",
}
ALIVE_SQL = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
    "mysql": "SELECT count(*) FROM information_schema.processlist WHERE id = %s",
}


def end_session(session):
    """End ``session`` from the server side, and wait (bounded) until it is gone."""
    with connection.cursor() as cursor:
        cursor.execute(KILL_SQL[connection.vendor], [session])
    deadline = time.monotonic() + 10
    while True:
        with connection.cursor() as cursor:
            cursor.execute(ALIVE_SQL[connection.vendor], [session])
            if cursor.fetchone()[0] == 0:
                return
        assert time.monotonic() < deadline, f"session {session} still there"
        time.sleep(0.05)  # the server's own teardown: nothing to wait on but it


def worker_session():
    started = Book.objects.annotate(where=backend_id_expr()).run_async()[:1]
    wait(started)  # on the worker: wait() never runs a job on the caller's session
    (row,) = started
    return row.where


@pytest.mark.parametrize("rounds", [8])
def test_a_write_after_the_server_ended_the_idle_workers_session_lands(
    books, settings, rounds
):
    """A write is not retried (it may have landed), so the worker must notice a
    session the server ended while it was idle before it sends the write."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    for i in range(rounds):
        session = worker_session()
        end_session(session)
        updated = Book.objects.run_async().filter(pk=books[0].pk).update(pages=i)
        assert resolve(updated) == 1
        assert worker_session() != session  # a new session on the same worker
    assert Book.objects.get(pk=books[0].pk).pages == rounds - 1
