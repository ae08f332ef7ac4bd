"""With caching on, every statement's SQL is checked once it has run (invalidation):
the checks are memoized, or read only its first characters, and answer as before."""

import uuid

import pytest
from django.db import connection

from asynchrormous import invalidation, sqltables
from asynchrormous.cachestore import current_store
from tests.cache_helpers import turn_on


class Counting:
    """A compiled pattern that counts the statements it is matched against."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.matched = 0

    def match(self, sql):
        self.matched += 1
        return self.pattern.match(sql)


def test_a_statement_is_matched_once_for_whether_it_changes_the_session(monkeypatch):
    counting = Counting(sqltables._SESSION)
    monkeypatch.setattr(sqltables, "_SESSION", counting)
    sql = f"SET search_path TO s_{uuid.uuid4().hex}"
    assert sqltables.changes_the_session(sql)
    assert sqltables.changes_the_session(sql)
    assert counting.matched == 1


class Statement(str):
    """SQL that records the calls that would copy all of it."""

    copies = 0

    def lstrip(self, *args):
        type(self).copies += 1
        return super().lstrip(*args)

    def upper(self):
        type(self).copies += 1
        return super().upper()


@pytest.fixture
def store(settings):
    turn_on(settings, "locmem")
    vars(connection).pop("_asynchrormous_begun", None)
    yield current_store()
    vars(connection).pop("_asynchrormous_begun", None)


@pytest.mark.parametrize(
    ("sql", "begun"),
    [
        ("BEGIN", True),
        ("begin immediate", True),
        ("\n  START TRANSACTION READ ONLY", True),
        ("COMMIT", False),
        ("end", False),
        ("  Rollback", False),
    ],
)
def test_a_transaction_begun_or_ended_with_sql_is_followed(store, sql, begun):
    assert invalidation._raw_transaction(connection, store, sql) is True
    assert vars(connection).get("_asynchrormous_begun", False) is begun


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "INSERT INTO testapp_book (title) VALUES ('BEGIN')",
        "UPDATE testapp_book SET title = 'COMMIT'",
        "DELETE FROM testapp_book",
        "WITH x AS (SELECT 1) SELECT 1",
        "SAVEPOINT s",
        "START",
        "",
    ],
)
def test_other_statements_are_told_apart_by_their_first_characters(store, sql):
    Statement.copies = 0
    assert invalidation._raw_transaction(connection, store, Statement(sql)) is False
    assert Statement.copies == 0
    assert "_asynchrormous_begun" not in vars(connection)


def test_a_rollback_to_a_savepoint_ends_no_transaction(store):
    vars(connection)["_asynchrormous_begun"] = True
    sql = "ROLLBACK TO SAVEPOINT s"
    assert invalidation._raw_transaction(connection, store, sql) is False
    assert vars(connection)["_asynchrormous_begun"] is True
