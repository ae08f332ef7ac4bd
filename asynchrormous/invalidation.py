"""Every write makes the cached results of the tables it wrote unreachable.

An execute wrapper on every connection sees each statement Django sends, the
ORM's (saves, bulk writes, cascades, many-to-many through tables) and raw SQL
through ``connection.cursor()`` alike, once it has run. Outside a transaction the
tables written get new generations before the write returns to its caller. Inside
``atomic()`` they get them when the transaction commits, before ``atomic()``
returns and before any ``on_commit()`` callback (which may fail) runs, and never on
a rollback: the writes are kept in Django's own on-commit list, which drops those
of a savepoint rolled back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created

from .cachestore import Store, current_store, database_id, in_a_cache_call
from .sqltables import (
    ALL,
    changes_the_session,
    without_leading_comments,
    written_tables,
)

__all__ = [
    "in_transaction",
    "install",
    "own_session",
    "uninstall",
    "written_in_transaction",
]


class _Written:
    """The tables one savepoint level of a transaction wrote."""

    def __init__(self, commit: _Commit) -> None:
        self.commit = commit
        self.tables: set[str] = set()

    def __call__(self) -> None:
        self.commit.tables |= self.tables


class _Commit:
    """Invalidates, at commit, what the transaction's surviving writes wrote.

    Registered once per transaction, after its ``_Written`` entries and before
    everything else, with no savepoint: it runs on every commit.
    """

    def __init__(self, store: Store, database: str) -> None:
        self.store = store
        self.database = database
        self.tables: set[str] = set()

    def __call__(self) -> None:
        self.store.bump(self.database, self.tables)


def _ours(hooks: list[Any]) -> tuple[list[_Written], _Commit | None]:
    """The leading ``_Written`` entries of Django's on-commit list, and the
    ``_Commit`` after them."""
    written: list[_Written] = []
    for _, func, _robust in hooks:
        if isinstance(func, _Written):
            written.append(func)
            continue
        return written, func if isinstance(func, _Commit) else None
    return written, None


def _defer(connection: Any, store: Store, tables: frozenset[str]) -> None:
    hooks = connection.run_on_commit
    savepoints = set(connection.savepoint_ids)
    written, commit = _ours(hooks)
    for (sids, _func, _robust), entry in zip(hooks, written, strict=False):
        if sids == savepoints:
            entry.tables |= tables
            return
    if commit is None:
        commit = _Commit(store, database_id(connection))
        hooks.insert(len(written), (set(), commit, True))
    entry = _Written(commit)
    entry.tables |= tables
    hooks.insert(0, (savepoints, entry, True))


def written_in_transaction(connection: Any) -> set[str]:
    """The tables the connection's open transaction wrote, rollbacks left out."""
    if not connection.in_atomic_block:
        return set(_manual(connection))
    written, _ = _ours(connection.run_on_commit)
    return set().union(*(entry.tables for entry in written))


def in_transaction(connection: Any) -> bool:
    """Whether the connection is in a transaction: atomic(), set_autocommit(False),
    or a BEGIN sent as SQL. Without connecting, as get_autocommit() would: a closed
    connection reopens in its AUTOCOMMIT setting's mode (a hit needs no connection)."""
    if connection.in_atomic_block:
        return True
    if connection.connection is None:
        return not connection.settings_dict["AUTOCOMMIT"]
    return not connection.autocommit or vars(connection).get(
        "_asynchrormous_begun", False
    )


def own_session(connection: Any) -> bool:
    """Whether the session changed what it reads (``SET search_path``, ``USE``,
    ``SET ROLE``) since it connected: its reads are its own, never cached. A
    closed connection's next session is Django's own again."""
    return connection.connection is not None and vars(connection).get(
        "_asynchrormous_own_session", False
    )


def _manual(connection: Any) -> set[str]:
    """What a transaction managed by hand (``set_autocommit(False)``) wrote."""
    written: set[str] = connection.__dict__.setdefault("_asynchrormous_written", set())
    return written


def _text(sql: Any, connection: Any) -> str | None:
    if isinstance(sql, str):
        return sql
    if isinstance(sql, bytes):
        return sql.decode("utf-8", "replace")
    as_string = getattr(sql, "as_string", None)  # psycopg's sql.Composed
    if as_string is not None:
        try:
            return str(as_string(connection.connection))
        except Exception:
            return None
    return None


def _after_statement(connection: Any, sql: Any) -> None:
    store = current_store()
    if store is None or in_a_cache_call():
        return
    text = _text(sql, connection)
    if text is not None and _raw_transaction(connection, store, text):
        return
    if text is not None and changes_the_session(text):
        vars(connection)["_asynchrormous_own_session"] = True
    tables = written_tables(text) if text is not None else frozenset({ALL})
    if not tables:
        return
    if connection.in_atomic_block:
        _defer(connection, store, tables)
    elif in_transaction(connection):
        _manual(connection).update(tables)  # at commit, never on rollback
    else:
        store.bump(database_id(connection), tables)  # it has committed


# The first letters of BEGIN, START TRANSACTION, COMMIT, END and ROLLBACK, and of
# a comment before one (``-- note``, ``/* note */``, MySQL's ``# note``). A letter
# outside ASCII may upper-case to one of them (U+017F, the long s, to "S").
_TRANSACTION_INITIALS = frozenset("BSCERbscer-/#")


def _raw_transaction(connection: Any, store: Store, sql: str) -> bool:
    """Follow a transaction begun and ended with SQL, outside atomic(): its writes
    invalidate at its COMMIT. Whether ``sql`` was one of those statements."""
    if connection.in_atomic_block:
        return False  # Django's own BEGIN (SQLite)
    first = sql[:1]
    if first.isascii() and not first.isspace() and first not in _TRANSACTION_INITIALS:
        return False  # most statements, without a copy of their SQL
    if first.isspace() or first in "-/#":
        sql = without_leading_comments(sql)
    head = sql[:20].upper()
    if head.startswith(("BEGIN", "START TRANSACTION")):
        vars(connection)["_asynchrormous_begun"] = True
    elif head.startswith(("COMMIT", "END")):
        _committed(connection, store)
    elif head.startswith("ROLLBACK") and " TO " not in sql.upper():
        vars(connection).pop("_asynchrormous_begun", None)
        _manual(connection).clear()
    else:
        return False
    return True


def _committed(connection: Any, store: Store | None) -> None:
    """A transaction outside atomic() committed: invalidate what it wrote, and
    what atomic() blocks inside it wrote (Django runs their on-commit entries only
    when autocommit comes back).

    Not for atomic()'s own commit (``commit_on_exit``): its entries run as
    Django's on-commit hooks, once autocommit is back, which a DatabaseCache on
    the same connection needs.
    """
    vars(connection).pop("_asynchrormous_begun", None)
    tables = set(_manual(connection))
    _manual(connection).clear()
    if not connection.in_atomic_block and not connection.commit_on_exit:
        written, commit = _ours(connection.run_on_commit)
        for entry in written:
            tables |= entry.tables
        mine = len(written) + (commit is not None)
        del connection.run_on_commit[:mine]
    if tables and store is not None:
        store.bump(database_id(connection), tables)


def watch(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
) -> Any:
    """The execute wrapper: a statement that fails may still have written."""
    try:
        return execute(sql, params, many, context)
    finally:
        _after_statement(context["connection"], sql)


# Kept where the library clears a connection's wrappers for a job it runs.
watch.on_every_connection = True  # type: ignore[attr-defined]


class _Cursor:
    """Mixed into Django's cursor wrappers: what writes past ``execute_wrappers``
    (a procedure, psycopg's ``copy()``, sqlite3's ``executescript()``)."""

    db: Any

    def callproc(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().callproc(*args, **kwargs)  # type: ignore[misc]
        finally:
            _after_statement(self.db, None)

    def __getattr__(self, attr: str) -> Any:
        value = super().__getattr__(attr)  # type: ignore[misc]
        if attr == "executescript":
            return functools.partial(self._executed, value)
        if attr == "copy":
            return functools.partial(self._copying, value)
        return value

    def _executed(self, method: Any, sql: Any, *args: Any) -> Any:
        try:
            return method(sql, *args)
        finally:
            _after_statement(self.db, None)  # several statements: anything

    @contextlib.contextmanager
    def _copying(self, method: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with method(statement, *args, **kwargs) as copy:
                yield copy
        finally:
            _after_statement(self.db, statement)


_watched_cursors: dict[type, type] = {}


def _watched_cursor(cls: type) -> type:
    try:
        return _watched_cursors[cls]
    except KeyError:
        return _watched_cursors.setdefault(cls, type(cls.__name__, (_Cursor, cls), {}))


def _watch(connection: Any) -> None:
    if watch in connection.execute_wrappers:
        return
    # First, so that Django's execute_wrapper(), which pops the last wrapper when
    # its block ends, never takes this one away.
    connection.execute_wrappers.insert(0, watch)
    methods = vars(connection)
    for name in ("make_cursor", "make_debug_cursor"):
        make = getattr(connection, name)

        def watched(cursor: Any, make: Callable[..., Any] = make) -> Any:
            wrapper = make(cursor)
            wrapper.__class__ = _watched_cursor(type(wrapper))
            return wrapper

        methods[name] = watched
    commit, rollback = connection.commit, connection.rollback

    def committed() -> None:
        commit()
        _committed(connection, current_store())

    def rolled_back() -> None:
        try:
            rollback()
        finally:
            vars(connection).pop("_asynchrormous_begun", None)
            _manual(connection).clear()

    methods["commit"], methods["rollback"] = committed, rolled_back


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    # A new session: Django's own, until it sends a SET or a BEGIN of its own.
    for name in ("_asynchrormous_own_session", "_asynchrormous_begun"):
        vars(connection).pop(name, None)
    _manual(connection).clear()
    if current_store() is not None:
        _watch(connection)


connection_created.connect(_on_connection_created)


def install() -> None:
    """Watch this thread's open connections (new ones are watched when created)."""
    for connection in connections.all(initialized_only=True):
        _watch(connection)


def uninstall() -> None:
    for connection in connections.all(initialized_only=True):
        if watch in connection.execute_wrappers:
            connection.execute_wrappers.remove(watch)
            for name in ("make_cursor", "make_debug_cursor", "commit", "rollback"):
                vars(connection).pop(name, None)
