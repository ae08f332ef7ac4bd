"""Query-result caching on Django's cache framework: ``qs.cache()``.

A cached queryset's reads (iteration, ``count()``, ``get()``, ``aggregate()``, ...)
look for their statement's rows in the cache named by ``ASYNCHRORMOUS["CACHE"]``
before asking the database. The rows are kept as the database sent them, keyed by
the statement's SQL and parameters, with the generations of every table the
statement names (``cachestore``); every write replaces the generations of the
tables it wrote (``invalidation``), so a result read before a write committed is
never served after it.

The hook is Django's ``SQLCompiler.execute_sql``, the one place every read
statement passes; it caches only while a cached queryset's read is running on
the thread (a context variable, which background jobs inherit).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from django.apps import apps
from django.core.exceptions import EmptyResultSet, ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import connections
from django.db.models import Model
from django.db.models.sql.compiler import (
    SQLCompiler,
    SQLDeleteCompiler,
    SQLInsertCompiler,
    SQLUpdateCompiler,
)
from django.db.models.sql.constants import GET_ITERATOR_CHUNK_SIZE, MULTI, SINGLE

from . import invalidation
from .cachestore import (
    MISSING,
    Found,
    Store,
    current_store,
    database_id,
    session_id,
)
from .conf import get_settings
from .results import read_own_writes
from .signals import cache_used
from .sqltables import ALL, normalized, tables_in, volatile

__all__ = [
    "check_timeout",
    "default_timeout",
    "invalidate",
    "reading",
    "timeout_for",
    "uncached",
]

# The timeout of the cached read running in this context; None: not caching.
_reading: ContextVar[float | None] = ContextVar("asynchrormous_cache", default=None)
_disabled: ContextVar[bool] = ContextVar("asynchrormous_uncached", default=False)

_WRITE_COMPILERS = (SQLInsertCompiler, SQLUpdateCompiler, SQLDeleteCompiler)

#: Seconds a query must have taken for a miss of it to be shared across processes
#: (a lock in the cache); cheaper ones cost less to run than to coordinate.
SHARED_MISS_AFTER = 0.05
# What the process running a shared miss spends on the cache, besides its query.
_ROUND_TRIPS = 0.05


def check_timeout(timeout: Any) -> None:
    """Raise ValueError unless ``timeout`` is None or a number of seconds >= 0."""
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if timeout is not None and (not number or not 0 <= timeout < math.inf):
        raise ValueError(
            f"cache(timeout=...) must be a number of seconds >= 0 or None, "
            f"not {timeout!r}."
        )


def timeout_for(timeout: Any) -> float:
    """The seconds ``qs.cache(timeout)`` keeps results: None means the setting's
    CACHE_TIMEOUT, 0 not at all."""
    check_timeout(timeout)
    if timeout == 0:
        return 0.0
    conf = get_settings()
    if conf.cache is None:
        raise ImproperlyConfigured(
            "Caching needs a cache: set ASYNCHRORMOUS['CACHE'] to an alias of "
            "settings.CACHES (README, Caching)."
        )
    return float(conf.cache_timeout if timeout is None else timeout)


def default_timeout(setting: bool | float) -> float:
    """The seconds a manager's ``cache=`` default keeps results; 0 (no caching)
    while ``ASYNCHRORMOUS["CACHE"]`` is unset (a system check warns)."""
    if setting is False or get_settings().cache is None:
        return 0.0
    return timeout_for(None if setting is True else setting)


@contextlib.contextmanager
def reading(timeout: float) -> Iterator[None]:
    """Cache the reads of the code inside, for ``timeout`` seconds."""
    _install()
    token = _reading.set(timeout)
    try:
        yield
    finally:
        _reading.reset(token)


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Read from the database inside, whatever the querysets say.

    Writes inside still invalidate.
    """
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def invalidate(*models_or_tables: type[Model] | str, using: str | None = None) -> None:
    """Drop the cached results that read these models' tables (or these tables),
    on database ``using`` (every database when None), at once.

    For writes the library cannot see: a trigger, another program, a function
    called from SELECT. A model stands for its table and its parents' tables.
    """
    store = current_store()
    if store is None:
        return
    tables: set[str] = set()
    for item in models_or_tables:
        if isinstance(item, str):
            tables.add(normalized(item))
        elif isinstance(item, type) and issubclass(item, Model):
            opts = item._meta
            tables.add(normalized(opts.db_table))
            tables.update(normalized(p._meta.db_table) for p in opts.get_parent_list())
        else:
            raise TypeError(f"invalidate() takes models and table names, not {item!r}.")
    if not models_or_tables:
        tables.add(ALL)
    for alias in [using] if using is not None else list(connections):
        store.bump(database_id(connections[alias]), tables)


# -- The read path ------------------------------------------------------------------

_execute_sql = SQLCompiler.execute_sql
_installed = False
_install_lock = threading.Lock()

# Reads of one key under one snapshot that are running in this process: the
# first runs the query, the others wait for its rows (no dog-pile).
_flights: dict[tuple[str, Any], concurrent.futures.Future[Any]] = {}
_flights_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """The parent's reads in flight never finish here, and a lock its other
    threads held at the fork is never released."""
    global _flights_lock, _install_lock
    _flights.clear()
    _flights_lock = threading.Lock()
    _install_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _install() -> None:
    global _installed
    if _installed:
        return
    with _install_lock:
        if not _installed:
            SQLCompiler.execute_sql = _cached_execute_sql  # type: ignore[method-assign]
            _installed = True


def _reads_a_snapshot(connection: Any) -> bool:
    """Whether a transaction of ``connection`` reads one snapshot, taken at its
    start (REPEATABLE READ, SERIALIZABLE, SQLite's): the cache, newer, would mix
    later commits into it. READ COMMITTED reads the newest commits anyway."""
    level = getattr(connection, "isolation_level", None)
    if connection.vendor == "postgresql":
        return level is not None and int(level) >= 3  # psycopg's REPEATABLE_READ
    if connection.vendor == "mysql":
        return level not in ("read committed", "read uncommitted")
    return True


def _cached_execute_sql(
    self: SQLCompiler,
    result_type: Any = MULTI,
    chunked_fetch: bool = False,
    chunk_size: int = GET_ITERATOR_CHUNK_SIZE,
) -> Any:
    timeout = _reading.get()
    if (
        timeout is None
        or chunked_fetch  # iterator(): streamed, never cached
        or result_type not in (MULTI, SINGLE)
        or isinstance(self, _WRITE_COMPILERS)
        or self.query.select_for_update
        or _disabled.get()
    ):
        return _execute_sql(self, result_type, chunked_fetch, chunk_size)
    return _Read(self, result_type, chunk_size).answer(timeout)


class _Read:
    """One read statement, answered from the cache or the database."""

    def __init__(self, compiler: SQLCompiler, result_type: Any, chunk_size: int):
        self.compiler = compiler
        self.result_type = result_type
        self.chunk_size = chunk_size

    def run(self) -> Any:
        """Django's own execution of the statement, compiled once (already)."""
        compiler = self.compiler
        compiled = self.compiled

        def as_sql(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs:  # a subquery's compilation: not this statement's
                return type(compiler).as_sql(compiler, *args, **kwargs)
            return compiled

        compiler.as_sql = as_sql  # type: ignore[method-assign]
        try:
            result = _execute_sql(compiler, self.result_type, False, self.chunk_size)
        finally:
            del compiler.as_sql
        return list(result) if self.result_type == MULTI else result

    def answer(self, timeout: float) -> Any:
        compiler = self.compiler
        store = current_store()
        if store is None:
            return _execute_sql(compiler, self.result_type, False, self.chunk_size)
        try:
            self.compiled = compiler.as_sql()
        except EmptyResultSet:  # Django answers without a statement
            return _execute_sql(compiler, self.result_type, False, self.chunk_size)
        sql, params = self.compiled
        if not sql:
            return _execute_sql(compiler, self.result_type, False, self.chunk_size)
        connection = compiler.connection
        read_own_writes(connection.alias)  # as a statement would, at its _Barrier
        query = compiler.query
        tables = tables_in(sql) | {
            normalized(name)
            for name in (
                *(join.table_name for join in query.alias_map.values()),
                *query.extra_tables,
            )
        }
        database = database_id(connection)
        in_transaction = invalidation.in_transaction(connection)
        if (
            invalidation.own_session(connection)
            or (in_transaction and _reads_a_snapshot(connection))
            or volatile(sql)
        ):
            return self._report("bypass", sql, tables, self.run())
        if in_transaction:
            written = invalidation.written_in_transaction(connection)
            if ALL in written or not written.isdisjoint(tables):
                return self._report("bypass", sql, tables, self.run())
        if store.blocked(database, tables):
            return self._report("bypass", sql, tables, self.run())
        trimmed = compiler.col_count if compiler.has_extra_select else None
        key = store.entry_key(
            session_id(connection), (sql, params, self.result_type, trimmed)
        )
        if key is None:
            return self._report("bypass", sql, tables, self.run())
        generation_keys = store.generation_keys(database, tables)
        found = store.lookup(key, generation_keys)
        if found.value is not MISSING:
            return self._report("hit", sql, tables, found.value)
        if found.generations is None or in_transaction:
            # No snapshot to store under; or a transaction's snapshot, which may
            # be older than the generations just read (REPEATABLE READ).
            return self._report("miss", sql, tables, self.run())
        outcome, value = self._once(store, key, generation_keys, found, timeout)
        return self._report(outcome, sql, tables, value)

    def _once(
        self,
        store: Store,
        key: str,
        generation_keys: list[str],
        found: Found,
        timeout: float,
    ) -> tuple[str, Any]:
        """The rows, from this process's one query of this key and snapshot.

        The others wait for the first one's rows. It stores them before it lets
        go, so that a reader arriving later finds either it or the stored rows.
        """
        flight = (key, found.generations)
        with _flights_lock:
            future = _flights.get(flight)
            leader = future is None
            if future is None:
                future = _flights[flight] = concurrent.futures.Future()
        if not leader:
            try:
                return "miss", future.result(get_settings().timeout)
            except Exception:  # the leader failed or is late: ask the database
                return "miss", self.run()
        try:
            outcome, value = self._across_processes(
                store, key, generation_keys, found, timeout
            )
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(value)
            return outcome, value
        finally:
            with _flights_lock:
                del _flights[flight]

    def _across_processes(
        self,
        store: Store,
        key: str,
        generation_keys: list[str],
        found: Found,
        timeout: float,
    ) -> tuple[str, Any]:
        """Run the query and keep its rows, unless another process is running it.

        Only a query that took SHARED_MISS_AFTER seconds or more last time is
        worth a lock in the cache; a process that finds it taken waits for the
        other's rows as long as the query took then, and reads the database if
        they do not come.
        """
        cost = found.cost
        claimed = False
        if cost is not None and cost >= SHARED_MISS_AFTER:
            claimed = store.claim(key, cost)
            if not claimed:
                value = store.wait_for(key, generation_keys, found, cost + _ROUND_TRIPS)
                if value is not MISSING:
                    return "hit", value
        try:
            started = time.perf_counter()
            value = self.run()
            cost = time.perf_counter() - started
            assert found.generations is not None
            store.store(key, found.generations, value, timeout, cost)
            return "miss", value
        finally:
            if claimed:
                store.release(key)

    def _report(
        self, outcome: str, sql: str, tables: frozenset[str], value: Any
    ) -> Any:
        if cache_used.receivers:
            cache_used.send(
                sender=None,
                alias=self.compiler.using,
                sql=sql,
                tables=tables,
                outcome=outcome,
            )
        return value


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting not in ("ASYNCHRORMOUS", "CACHES") or not apps.ready:
        return
    try:
        store = current_store()
    except ImproperlyConfigured:
        store = None  # the checks and the next query say what is wrong
    if store is None:
        invalidation.uninstall()
    else:
        invalidation.install()


setting_changed.connect(_settings_changed)
