"""The caller's half of a background call: its arguments frozen, Django's checks run.

A background terminal runs Django's method on a worker. Before it is submitted, the
caller runs the same method up to its first statement (the *dry run*), so Django's
errors come at the call. Both runs see the arguments as they were at the call
(``frozen``): each iterator is consumed once, as in a plain call, and a list the
caller changes afterwards changes nothing. A fetch's SQL is compiled here once
(``Compiled``), and the worker sends it.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.expressions import BaseExpression, Combinable
from django.db.models.sql import Query
from django.db.models.sql.compiler import SQLCompiler
from django.utils.tree import Node

__all__ = ["Compiled", "Deferred", "check_transaction", "dry_run", "encode", "frozen"]


def frozen(value: Any, *, iterators: bool = True) -> Any:
    """``value`` as it is at the call, for a run that comes later on a worker.

    Lists, dicts and sets are copied, and each iterator is made a list of its
    items (``iterators=False`` leaves them alone, for field values Django would
    reject), at any depth: in ``Q`` trees and in expressions (``When``,
    ``Count(filter=...)``, ``RawSQL`` params, ...) too, which are copied where
    they hold either. Anything else (model instances, querysets) is shared.
    A value reachable twice (an expression keeps its constructor's arguments
    too) is captured once.
    """
    return _Capture(iterators).take(value)


class _Capture:
    def __init__(self, iterators: bool) -> None:
        self.iterators = iterators
        self.memo: dict[int, Any] = {}

    def take(self, value: Any) -> Any:
        kind = type(value)
        if kind in _ATOMS:
            return value
        key = id(value)
        if key in self.memo:
            return self.memo[key]
        if kind is list or (self.iterators and isinstance(value, Iterator)):
            taken: Any = [self.take(item) for item in value]
        elif kind is dict:
            taken = {k: self.take(item) for k, item in value.items()}
        elif kind is set:
            taken = {self.take(item) for item in value}
        elif kind is tuple:
            items = tuple(self.take(item) for item in value)
            changed = any(new is not old for new, old in zip(items, value, strict=True))
            taken = items if changed else value
        elif isinstance(value, Node):  # Q and its children: ("pk__in", <generator>)
            taken = copy.copy(value)
            taken.children = self.take(value.children)
        elif isinstance(value, (BaseExpression, Combinable)) and not isinstance(
            value, Query
        ):
            taken = copy.copy(value)
            vars(taken).update({k: self.take(v) for k, v in vars(value).items()})
        else:
            taken = value
        self.memo[key] = taken
        return taken


_ATOMS = frozenset({int, str, float, bool, type(None), bytes})


class Deferred(BaseException):
    """Raised by a dry-run compiler instead of sending SQL: the rest is database work.

    A BaseException so that Django's ``except Exception`` cleanup (such as
    ``mark_for_rollback_on_error``) does not take it for a database error.
    """


# Which threads are in a dry run now. A connection may be shared between threads
# (LiveServerTestCase): the others must keep sending their statements.
_dry_running = threading.local()


class Compiled:
    """A fetch's query compiled on the caller, for the worker to execute as it is.

    The caller compiles anyway (a bad query must fail at the call); the worker
    then sends that SQL instead of compiling it a second time.
    """

    def __init__(self, query: Query, using: str) -> None:
        self.compiler = query.get_compiler(using=using)
        self.empty = False
        try:
            self.sql = self.compiler.as_sql()
        except EmptyResultSet:
            self.empty = True  # Django then returns no rows, without a statement

    def install(self, query: Query) -> None:
        """Make ``query`` (the worker's private copy) execute this compilation."""
        compiler = self.compiler
        compiler.connection = connections[compiler.using]  # the worker's own
        compiler.as_sql = self._as_sql
        query.get_compiler = lambda *args, **kwargs: compiler  # type: ignore[method-assign]

    def _as_sql(self, *args: Any, **kwargs: Any) -> Any:
        if self.empty:
            raise EmptyResultSet
        return self.sql


def encode(prepared: Any) -> None:
    """Encode a value psycopg would encode only while sending it (JSON's Jsonb).

    So a value the field cannot encode fails at the call, as in plain Django.
    """
    dumps = getattr(prepared, "dumps", None)
    if callable(dumps) and hasattr(prepared, "obj"):
        dumps(prepared.obj)


def _compile_then_defer(self: SQLCompiler, *args: Any, **kwargs: Any) -> Any:
    if not getattr(_dry_running, "active", False):
        return super(type(self), self).execute_sql(*args, **kwargs)  # type: ignore[misc]
    try:
        compiled = self.as_sql()
    except EmptyResultSet:
        raise Deferred from None
    # One (sql, params) pair, or a list of them (an INSERT's batches).
    for _, params in compiled if isinstance(compiled, list) else [compiled]:
        for param in params:
            encode(param)
    raise Deferred


_dry_run_compilers: dict[type, type] = {}


def _dry_run_compiler(compiler: type) -> type:
    try:
        return _dry_run_compilers[compiler]
    except KeyError:
        dry = type(f"DryRun{compiler.__name__}", (compiler,), {})
        dry.execute_sql = _compile_then_defer  # type: ignore[attr-defined]
        return _dry_run_compilers.setdefault(compiler, dry)


class _CompilerLookup:
    """``ops.compiler`` of a connection: dry-run compilers for threads in a dry run.

    Installed once per connection and left there, so that threads sharing the
    connection never see each other's dry runs begin or end.
    """

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __call__(self, name: str) -> type:
        compiler = self.lookup(name)
        if getattr(_dry_running, "active", False):
            return _dry_run_compiler(compiler)
        return compiler


def check_transaction(alias: str) -> None:
    """Raise Django's TransactionManagementError in a broken atomic() block.

    Django's own check only: a call sends nothing itself (transaction.py guards
    each statement of a connection against escaping an async block).
    """
    BaseDatabaseWrapper.validate_no_broken_transaction(connections[alias])


@contextlib.contextmanager
def dry_run(alias: str) -> Iterator[None]:
    """Run Django's own code up to the first statement it would send on ``alias``.

    Everything Django checks first (lookups, arguments, SQL compilation, a broken
    ``atomic()`` block) raises here, on the caller's thread, with Django's types and
    messages. No statement reaches the database.
    """
    check_transaction(alias)
    conn = connections[alias]
    ops = conn.ops
    if not isinstance(vars(ops).get("compiler"), _CompilerLookup):
        ops.compiler = _CompilerLookup(ops.compiler)  # type: ignore[method-assign,assignment]
    needs_rollback = conn.needs_rollback
    conn.execute_wrappers.insert(0, _no_begin)
    _dry_running.active = True
    try:
        yield
    finally:
        _dry_running.active = False
        conn.execute_wrappers.remove(_no_begin)
        # An atomic(savepoint=False) unwound by Deferred must not doom the caller's
        # own transaction when work runs inline.
        conn.needs_rollback = needs_rollback


def _no_begin(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    """Keep the BEGIN of an atomic() block a dry run enters from the database.

    SQLite sends it as a statement (the other backends only switch autocommit):
    it would take the database's write lock, and wait for the caller's own
    pending writes, at the call.
    """
    if getattr(_dry_running, "active", False) and sql.startswith("BEGIN"):
        return None
    return execute(sql, params, many, context)
