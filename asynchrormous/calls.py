"""The caller's half of a background call: its arguments frozen, Django's checks run.

A background terminal runs Django's method on a worker. Before it is submitted, the
caller runs the same method up to its first statement (the *dry run*), so Django's
errors come at the call. Both runs see the same arguments: every iterator in them is
turned into a list first, so each is consumed once, as in a plain call.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.models.expressions import BaseExpression, Combinable
from django.db.models.sql import Query
from django.db.models.sql.compiler import SQLCompiler
from django.utils.tree import Node

__all__ = ["Deferred", "dry_run", "encode", "frozen"]


def frozen(value: Any) -> Any:
    """``value`` with each iterator in it, at any depth, made a list of its items.

    Looks into lists, tuples, dicts, ``Q`` trees and expressions (``When``,
    ``Count(filter=...)``, ``RawSQL`` params, ...); everything else is left alone,
    and so is any part with no iterator in it (no copy is made). An iterator
    reachable twice (an expression keeps its constructor's arguments too) becomes
    one list.
    """
    return _frozen(value, {})


def _frozen(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, Iterator):
        if id(value) not in memo:
            memo[id(value)] = [_frozen(item, memo) for item in value]
        return memo[id(value)]
    if type(value) in (list, tuple):
        items = [_frozen(item, memo) for item in value]
        if any(new is not old for new, old in zip(items, value, strict=True)):
            return type(value)(items)
        return value
    if type(value) is dict:
        entries = {key: _frozen(item, memo) for key, item in value.items()}
        if any(entries[key] is not item for key, item in value.items()):
            return entries
        return value
    if isinstance(value, Node):  # Q and its children: ("pk__in", <generator>)
        if id(value) not in memo:
            children = _frozen(value.children, memo)
            node = value
            if children is not value.children:
                node = copy.copy(value)
                node.children = children
            memo[id(value)] = node
        return memo[id(value)]
    if isinstance(value, (BaseExpression, Combinable)) and not isinstance(value, Query):
        if id(value) not in memo:
            changed = {}
            for name, attr in vars(value).items():
                new = _frozen(attr, memo)
                if new is not attr:
                    changed[name] = new
            expression = value
            if changed:
                expression = copy.copy(value)
                vars(expression).update(changed)
            memo[id(value)] = expression
        return memo[id(value)]
    return value


class Deferred(BaseException):
    """Raised by a dry-run compiler instead of sending SQL: the rest is database work.

    A BaseException so that Django's ``except Exception`` cleanup (such as
    ``mark_for_rollback_on_error``) does not take it for a database error.
    """


# Which threads are in a dry run now. A connection may be shared between threads
# (LiveServerTestCase): the others must keep sending their statements.
_dry_running = threading.local()


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


@contextlib.contextmanager
def dry_run(alias: str) -> Iterator[None]:
    """Run Django's own code up to the first statement it would send on ``alias``.

    Everything Django checks first (lookups, arguments, SQL compilation, a broken
    ``atomic()`` block) raises here, on the caller's thread, with Django's types and
    messages. No statement reaches the database.
    """
    conn = connections[alias]
    conn.validate_no_broken_transaction()
    ops = conn.ops
    if not isinstance(vars(ops).get("compiler"), _CompilerLookup):
        ops.compiler = _CompilerLookup(ops.compiler)  # type: ignore[method-assign,assignment]
    needs_rollback = conn.needs_rollback
    _dry_running.active = True
    try:
        yield
    finally:
        _dry_running.active = False
        # An atomic(savepoint=False) unwound by Deferred must not doom the caller's
        # own transaction when work runs inline.
        conn.needs_rollback = needs_rollback
