"""The caller's half of a background call: its arguments frozen, Django's checks run.

A background terminal runs Django's method on a worker. Before it is submitted, the
caller runs the same method up to its first statement (the *dry run*), so Django's
errors come at the call. Both runs see the arguments as they were at the call
(``frozen``): each iterator is consumed once, as in a plain call, and a list the
caller changes afterwards changes nothing. SQL is compiled once, here: a fetch's
statement (``compile_fetch``), or a terminal's first statement in the dry run; the
worker sends it as it is (``replaying``).
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

__all__ = [
    "Deferred",
    "Recording",
    "check_transaction",
    "compile_fetch",
    "dry_run",
    "encode",
    "frozen",
    "replaying",
]


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


def encode(prepared: Any) -> None:
    """Encode a value psycopg would encode only while sending it (JSON's Jsonb).

    So a value the field cannot encode fails at the call, as in plain Django.
    """
    dumps = getattr(prepared, "dumps", None)
    if callable(dumps) and hasattr(prepared, "obj"):
        dumps(prepared.obj)


class _Empty:
    """A compilation that raised EmptyResultSet (Django then sends nothing)."""


_EMPTY = _Empty()


class _Numbering:
    """Numbers one run's statements on its alias, in the order ``execute_sql()``
    begins; ``as_sql`` then sees the compilation of statement ``number``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.statements = 0
        # The compiler itself is kept too, so that its id is not reused.
        self.pending: dict[int, tuple[SQLCompiler, int]] = {}

    def entered(self, compiler: SQLCompiler) -> None:
        if compiler.connection.alias == self.alias:
            self.statements += 1
            self.pending[id(compiler)] = (compiler, self.statements)

    def numbered(self, compiler: SQLCompiler) -> int | None:
        """The number of the statement ``compiler`` is compiling for, if any."""
        entry = self.pending.pop(id(compiler), None)
        return None if entry is None else entry[1]

    def as_sql(self, compiler: SQLCompiler, compile: Callable[[], Any]) -> Any:
        raise NotImplementedError


class Recording(_Numbering):
    """A dry run's first statement, compiled once on the caller.

    Up to its first statement a method's path depends mostly on its arguments, so
    the worker's run of the same method reaches the same statement with the same
    number, where ``replaying`` hands it this compilation (and the compiler's
    state) instead of compiling again. ``query`` is that statement's query as it
    was before compiling: the worker replays only for an equal one (``_same``).
    """

    def __init__(self, alias: str) -> None:
        super().__init__(alias)
        self.number: int | None = None
        self.compiler: SQLCompiler | None = None
        self.query: dict[str, Any] = {}
        self.outcome: Any = None

    def entered(self, compiler: SQLCompiler) -> None:
        if compiler.connection.alias != self.alias:
            raise Deferred  # another alias's statement: the worker sends it
        super().entered(compiler)

    def as_sql(self, compiler: SQLCompiler, compile: Callable[[], Any]) -> Any:
        """Compile the statement about to be sent; keep it, and send nothing."""
        number = self.numbered(compiler)
        if number is None:
            return compile()  # a subquery's: part of its statement's compilation
        query = _state(compiler.query)  # before compiling changes it
        try:
            outcome = compile()
        except EmptyResultSet:
            outcome = _EMPTY
        else:
            # One (sql, params) pair, or a list of them (an INSERT's batches).
            for _, params in outcome if isinstance(outcome, list) else [outcome]:
                for param in params:
                    encode(param)
        self.number, self.compiler, self.query = number, compiler, query
        self.outcome = outcome
        raise Deferred


def compile_fetch(query: Query, alias: str) -> Recording:
    """A fetch's statement, compiled now: the first one its evaluation sends.

    The caller compiles anyway (a bad query must fail at the call); the worker
    then sends that SQL instead of compiling it a second time.
    """
    recording = Recording(alias)
    _numbering(alias)
    outer = getattr(_active, "mode", None)
    _active.mode = recording
    try:
        compiler = query.get_compiler(using=alias)  # one that replays can match
    finally:
        _active.mode = outer
    recording.number, recording.compiler = 1, compiler
    recording.query = _state(query)
    try:
        recording.outcome = compiler.as_sql()
    except EmptyResultSet:
        recording.outcome = _EMPTY  # Django then returns no rows, without a statement
    return recording


class _Replay(_Numbering):
    """One run of a method on a worker, handed a Recording's compilation."""

    def __init__(self, recording: Recording) -> None:
        super().__init__(recording.alias)
        self.recording = recording

    def as_sql(self, compiler: SQLCompiler, compile: Callable[[], Any]) -> Any:
        recording = self.recording
        recorded = recording.compiler
        if (
            self.numbered(compiler) != recording.number
            or type(compiler) is not type(recorded)
            or not (
                compiler.query is recorded.query  # a fetch's own query
                or _same(_state(compiler.query), recording.query)
            )
        ):
            return compile()
        # The compiler's own state (select, klass_info, the query it set up, ...),
        # as compiling left it on the caller; the connection stays the worker's.
        state = dict(vars(recorded))
        del state["connection"]
        vars(compiler).update(state)
        if recording.outcome is _EMPTY:
            raise EmptyResultSet
        return recording.outcome


def _state(query: Query) -> dict[str, Any]:
    """What a query's SQL is made of, as it is now (compiling changes some of it).

    Its attributes, containers copied one level down, so that two runs' queries
    can be compared with Django's own equality of lookups and expressions.
    """
    return {
        name: copy.copy(value) if type(value) in (dict, list, set) else value
        for name, value in vars(query).items()
    }


def _same(state: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """Whether the worker's statement is the one the caller compiled.

    Up to its first statement a method's path may depend on more than its
    arguments (a cache warmed meanwhile, a deferred field loaded, a queryset
    argument evaluated): then the worker's statement of the same number is
    another one, and compiles on its own. A value that cannot be compared (a
    subquery's Query compares by identity) counts as different.
    """
    try:
        return bool(state == recorded)
    except Exception:
        return False


# What this thread's calls compile: a dry run records, a worker replays.
_active = threading.local()


class _StatementCompiler(SQLCompiler):
    """Mixed in before a backend's compiler while a dry run or a replay is active."""

    def execute_sql(self, *args: Any, **kwargs: Any) -> Any:
        mode = getattr(_active, "mode", None)
        if mode is not None:
            mode.entered(self)
        return super().execute_sql(*args, **kwargs)

    def as_sql(self, *args: Any, **kwargs: Any) -> Any:
        mode = getattr(_active, "mode", None)
        if mode is None or args or kwargs:  # execute_sql() compiles without arguments
            return super().as_sql(*args, **kwargs)
        return mode.as_sql(self, super().as_sql)


_statement_compilers: dict[type, type] = {}


def _statement_compiler(compiler: type) -> type:
    try:
        return _statement_compilers[compiler]
    except KeyError:
        made = type(compiler.__name__, (_StatementCompiler, compiler), {})
        return _statement_compilers.setdefault(compiler, made)


class _CompilerLookup:
    """``ops.compiler`` of a connection: numbered compilers for threads that record
    or replay a call.

    Installed once per connection and left there, so that threads sharing the
    connection never see each other's dry runs begin or end.
    """

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __call__(self, name: str) -> type:
        compiler = self.lookup(name)
        if getattr(_active, "mode", None) is not None:
            return _statement_compiler(compiler)
        return compiler


def _numbering(alias: str) -> None:
    ops = connections[alias].ops
    if not isinstance(vars(ops).get("compiler"), _CompilerLookup):
        ops.compiler = _CompilerLookup(ops.compiler)  # type: ignore[method-assign,assignment]


@contextlib.contextmanager
def replaying(recording: Recording | None) -> Iterator[None]:
    """Run a method whose first statement ``recording`` compiled on the caller.

    The worker's run reaches that statement and sends its SQL as it is, without
    compiling it a second time; what comes after is compiled here, once.
    """
    if recording is None or recording.compiler is None:
        yield
        return
    _numbering(recording.alias)
    outer = getattr(_active, "mode", None)
    _active.mode = _Replay(recording)
    try:
        yield
    finally:
        _active.mode = outer


def check_transaction(alias: str) -> None:
    """Raise Django's TransactionManagementError in a broken atomic() block.

    Django's own check only: a call sends nothing itself (transaction.py guards
    each statement of a connection against escaping an async block).
    """
    BaseDatabaseWrapper.validate_no_broken_transaction(connections[alias])


@contextlib.contextmanager
def dry_run(alias: str) -> Iterator[Recording]:
    """Run Django's own code up to the first statement it would send on ``alias``.

    Everything Django checks first (lookups, arguments, SQL compilation, a broken
    ``atomic()`` block) raises here, on the caller's thread, with Django's types and
    messages. No statement reaches the database: the first one, compiled, is kept
    in the Recording and ``Deferred`` raised instead.
    """
    check_transaction(alias)
    conn = connections[alias]
    _numbering(alias)
    needs_rollback = conn.needs_rollback
    conn.execute_wrappers.insert(0, _no_begin)
    recording = Recording(alias)
    outer = getattr(_active, "mode", None)
    _active.mode = recording
    try:
        yield recording
    finally:
        _active.mode = outer
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
    recording = isinstance(getattr(_active, "mode", None), Recording)
    if recording and sql.startswith("BEGIN"):
        return None
    return execute(sql, params, many, context)
