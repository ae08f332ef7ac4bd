"""Helpers that make the database report where and how long a query ran."""

from django.db import connection
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
