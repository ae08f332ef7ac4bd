"""Prefetch lookups side by side: a background fetch runs the queries of its
``prefetch_related()`` lookups on pool workers at once.

Django's own ``prefetch_related_objects`` still walks the lookups, on one thread and
in its own order, and assigns every result (``_prefetched_objects_cache``,
``to_attr``, ``fields_cache``) itself. Only the query part of each step
(``get_prefetch_querysets()`` and the rows) is started ahead, and Django uses it
only when the step it reaches has exactly the inputs the query was started with;
otherwise it queries there itself, as it always does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from django.core import exceptions
from django.db import connections
from django.db.models import query as django_query
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ReverseManyToOneDescriptor,
    ReverseOneToOneDescriptor,
)
from django.db.models.query import Prefetch

from .conf import get_settings
from .pins import pins
from .pool import PoolClosed, get_pool, in_worker, read_with_reconnect
from .signals import instrumented

__all__ = ["fetching", "prefetch_related_objects"]

# The queryset whose background fetch is running on this thread (see fetching()).
_fetching: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "asynchrormous_fetching", default=None
)

# Relations whose prefetch Django computes without running user code on the
# instances: only those are started ahead. ManyToMany and GenericRelation included.
_DESCRIPTORS = (
    ForwardManyToOneDescriptor,
    ReverseOneToOneDescriptor,
    ReverseManyToOneDescriptor,
)


def _known_relation(descriptor: Any) -> bool:
    if isinstance(descriptor, _DESCRIPTORS):
        return True
    # GenericForeignKey, if contenttypes is in use (its module needs the app).
    generic = sys.modules.get("django.contrib.contenttypes.fields")
    return generic is not None and isinstance(descriptor, generic.GenericForeignKey)


@contextlib.contextmanager
def fetching(queryset: Any) -> Iterator[None]:
    """Marks ``queryset``'s evaluation in this block as a background fetch."""
    token = _fetching.set(queryset)
    try:
        yield
    finally:
        _fetching.reset(token)


def in_background_fetch(queryset: Any) -> bool:
    """Whether ``queryset`` is being evaluated by a background fetch, on a worker
    free to hand work to others: not in a transaction, not on a pinned block."""
    if _fetching.get() is not queryset or not in_worker():
        return False
    if get_settings().workers < 2:
        return False
    if any(pin.open for pin in (pins.get() or {}).values()):
        return False  # async atomic(): one connection, in order
    return not any(
        conn.in_atomic_block or (conn.connection is not None and not conn.autocommit)
        for conn in connections.all(initialized_only=True)
    )


def prefetch_related_objects(model_instances: Any, *related_lookups: Any) -> None:
    """Django's ``prefetch_related_objects()``, with the lookups' queries side by side.

    Same lookups, same order, same results and caches; each step's query is started
    on the pool as soon as its inputs are known (a nested lookup once its parent's
    rows are back).
    """
    original = django_query.prefetch_related_objects
    if "prefetch_one_level" not in original.__code__.co_names:
        # Not Django's loop (something wrapped it): run it as it is.
        original(model_instances, *related_lookups)
        return
    if not model_instances:
        return
    run = _Run(model_instances)
    # Django's own loop, run with our prefetch_one_level in its namespace.
    namespace = dict(original.__globals__)
    namespace["prefetch_one_level"] = run.prefetch_one_level
    walk = types.FunctionType(
        original.__code__,
        namespace,
        original.__name__,
        original.__defaults__,
        original.__closure__,
    )
    try:
        for lookup in django_query.normalize_prefetch_lookups(related_lookups):
            run.look_ahead(lookup, 0, model_instances)
        walk(model_instances, *related_lookups)
    finally:
        run.close()


class _Rows(list[Any]):
    """Rows fetched ahead, with the lookups Django merges from the related queryset."""

    _prefetch_related_lookups: Any = ()


class _Fetched:
    """A prefetcher whose query already ran: it hands Django the outcome."""

    def __init__(self, outcome: tuple[Any, ...]) -> None:
        self.outcome = outcome

    def get_prefetch_querysets(
        self, instances: Any, querysets: Any = None
    ) -> tuple[Any, ...]:
        return self.outcome


def _query(prefetcher: Any, instances: list[Any], querysets: Any) -> tuple[Any, ...]:
    """The query part of Django's ``prefetch_one_level()``: everything before the
    assignment to the instances."""
    rel_qs, *rest = prefetcher.get_prefetch_querysets(instances, querysets)
    lookups = getattr(rel_qs, "_prefetch_related_lookups", ())
    if lookups:
        rel_qs._prefetch_related_lookups = ()  # merged by Django, not run here
    rows = _Rows(rel_qs)
    rows._prefetch_related_lookups = lookups
    return (rows, *rest)


class _Step:
    """One prefetch query started ahead, and the inputs it was started with."""

    def __init__(
        self,
        path: str,
        prefetcher: Any,
        first: Any,
        instances: list[Any],
        querysets: Any,
    ) -> None:
        self.path = path
        self.prefetcher = prefetcher
        self.first = first
        self.instances = instances
        self.querysets = querysets
        self.future: concurrent.futures.Future[Any] | None = None
        self.outcome: tuple[Any, ...] | None = None
        self.error: BaseException | None = None
        self.advanced = False

    def call(self) -> tuple[Any, ...]:
        outcome = _query(self.prefetcher, self.instances, self.querysets)
        # Django copies the lookups the rows brought (a copy of a Prefetch is a new
        # queryset); make those copies now, so the steps started for them and
        # Django's own have the very same querysets.
        rows = outcome[0]
        rows._prefetch_related_lookups = [
            _Made(copy.copy(lookup)) if isinstance(lookup, Prefetch) else lookup
            for lookup in rows._prefetch_related_lookups
        ]
        return outcome

    def matches(self, instances: list[Any], prefetcher: Any, querysets: Any) -> bool:
        """Whether Django's step has the very inputs this query ran with."""
        if prefetcher is not self.prefetcher and not (
            # A related manager: Django made its own, bound to the same object.
            type(prefetcher) is type(self.prefetcher)
            and getattr(prefetcher, "instance", None) is self.first
        ):
            return False
        if querysets is None or self.querysets is None:
            if querysets is not self.querysets:
                return False
        elif len(querysets) != len(self.querysets) or any(
            a is not b for a, b in zip(querysets, self.querysets, strict=True)
        ):
            return False
        return len(instances) == len(self.instances) and all(
            a is b for a, b in zip(instances, self.instances, strict=True)
        )

    def finished(self) -> bool:
        if self.outcome is not None or self.error is not None:
            return True
        future = self.future
        if future is None or not future.done() or future.cancelled():
            return False
        self.error = future.exception()
        if self.error is None:
            self.outcome = future.result()
        return True

    def take_over(self) -> bool:
        """Run the query here if no worker has started it; True if it ran here."""
        if self.future is not None and not self.future.cancel():
            return False
        try:
            self.outcome = self.call()
        except Exception as exc:
            self.error = exc
        return True


class _Run:
    """One ``prefetch_related_objects()`` call: the steps started ahead, by path."""

    def __init__(self, model_instances: Any) -> None:
        first = next(iter(model_instances))
        self.alias = getattr(getattr(first, "_state", None), "db", None) or "default"
        self.timeout = get_settings().timeout
        self.steps: dict[str, _Step] = {}
        #: Paths whose rows some step will fetch: a lookup through one waits for it.
        self.expected: set[str] = set()
        #: (lookup, level) to predict once the step of a path has its rows.
        self.children: dict[str, list[tuple[Prefetch, int]]] = {}

    # -- Predicting Django's steps ---------------------------------------------------

    def look_ahead(self, lookup: Prefetch, level: int, obj_list: Any) -> None:
        """Start the query of ``lookup``'s next step from ``level`` on, if its inputs
        are known now: what Django will ask when it gets there.

        A mistake found here (a bad lookup) is left for Django to raise, in order.
        """
        with contextlib.suppress(Exception):
            self._look_ahead(lookup, level, obj_list)

    def _look_ahead(self, lookup: Prefetch, level: int, obj_list: Any) -> None:
        through_attrs = lookup.prefetch_through.split(LOOKUP_SEP)
        while level < len(through_attrs):
            if not obj_list:
                return
            path = lookup.get_current_prefetch_to(level)
            if path in self.expected:
                # Django takes this level's objects from that step's rows.
                if level + 1 < len(through_attrs):
                    self.children.setdefault(path, []).append((lookup, level + 1))
                return
            first = next(iter(obj_list))
            through_attr = through_attrs[level]
            descriptor = getattr(type(first), through_attr, None)
            if not _known_relation(descriptor):
                return  # a property, a custom prefetcher: Django's turn, in order
            to_attr = lookup.get_current_to_attr(level)[0]
            found: Any = django_query.get_prefetcher(first, through_attr, to_attr)
            prefetcher, is_fetched = found[0], found[3]
            if not hasattr(prefetcher, "get_prefetch_querysets"):
                return
            to_fetch = [obj for obj in obj_list if not _is_fetched(is_fetched, obj)]
            if to_fetch:
                self.expected.add(path)
                if level + 1 < len(through_attrs):
                    self.children.setdefault(path, []).append((lookup, level + 1))
                self.start(
                    _Step(
                        path,
                        prefetcher,
                        first,
                        to_fetch,
                        lookup.get_current_querysets(level),
                    )
                )
                return
            if level == len(through_attrs) - 1:
                return
            # All cached (select_related, an earlier prefetch): go through the
            # caches as Django will, which runs no query for these relations.
            obj_list = _through_caches(obj_list, through_attr)
            level += 1

    def start(self, step: _Step) -> None:
        # Fields caches are created lazily; create them here, on the thread that
        # assigns, so a worker reading an instance never races their creation.
        for obj in (step.first, *step.instances):
            obj._state.fields_cache  # noqa: B018
        self.steps[step.path] = step
        fn = instrumented(step.call, self.alias, f"prefetch of {step.path!r}", False)
        try:
            step.future = (
                get_pool()
                .submit_job(
                    read_with_reconnect,
                    (self.alias, fn),
                    writes=False,
                    description=f"prefetch of {step.path!r}",
                )
                .future
            )
        except PoolClosed:
            step.future = None  # shutdown() is running: Django's step runs here

    def advance(self) -> None:
        """Predict the steps below each step whose rows are back."""
        for step in list(self.steps.values()):
            if not step.advanced and step.finished():
                step.advanced = True
                if step.outcome is not None:
                    self.rows_back(step.path, step.outcome[0])

    def rows_back(self, path: str, rows: Any) -> None:
        level = path.count(LOOKUP_SEP)
        waiting = self.children.pop(path, [])
        # Django goes on with the lookup that made the step, then with the lookups
        # the related queryset brought (prefetch_related() on it), then the rest.
        merged = [
            _prefixed(lookup, path)
            for lookup in getattr(rows, "_prefetch_related_lookups", ())
        ]
        for lookup, lookup_level in waiting[:1]:
            self.look_ahead(lookup, lookup_level, rows)
        for lookup in merged:
            self.look_ahead(lookup, level + 1, rows)
        for lookup, lookup_level in waiting[1:]:
            self.look_ahead(lookup, lookup_level, rows)

    # -- Django's steps --------------------------------------------------------------

    def prefetch_one_level(
        self, instances: list[Any], prefetcher: Any, lookup: Prefetch, level: int
    ) -> tuple[list[Any], list[Any]]:
        """Django's step: its query from the step started ahead, if it matches."""
        path = lookup.get_current_prefetch_to(level)
        step = self.steps.pop(path, None)
        if step is not None and step.matches(
            instances, prefetcher, lookup.get_current_querysets(level)
        ):
            outcome = self.wait(step)
            result = django_query.prefetch_one_level(
                instances, _Fetched(outcome), lookup, level
            )
        else:
            if step is not None:
                self.drop(step)
            result = django_query.prefetch_one_level(
                instances, prefetcher, lookup, level
            )
            # Django goes on with this lookup, then with the ones the rows brought.
            self.look_ahead(lookup, level + 1, result[0])
            self.rows_back(path, _merged(result))
        return result

    def wait(self, step: _Step) -> tuple[Any, ...]:
        """The step's outcome; while it runs elsewhere, run queued steps here."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not step.finished():
            if step.take_over():
                break
            queued = next(
                (s for s in self.steps.values() if not s.finished() and s.take_over()),
                None,
            )
            if queued is None:
                running = [
                    s.future
                    for s in (step, *self.steps.values())
                    if s.future is not None and not s.finished()
                ]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"prefetch of {step.path!r} was not ready after "
                        f"{self.timeout:.2f} s; raise ASYNCHRORMOUS['TIMEOUT']."
                    )
                concurrent.futures.wait(
                    running, remaining, return_when=concurrent.futures.FIRST_COMPLETED
                )
            self.advance()
        if step.error is not None:
            raise step.error
        assert step.outcome is not None
        if not step.advanced:
            step.advanced = True
            self.rows_back(step.path, step.outcome[0])
        return step.outcome

    def drop(self, step: _Step) -> None:
        """A step Django does not take: dropped if queued; its outcome ignored."""
        if step.future is not None:
            step.future.cancel()

    def close(self) -> None:
        """Queries no step used are dropped if queued; a running one ends alone."""
        for step in self.steps.values():
            self.drop(step)
        self.steps.clear()


def _is_fetched(is_fetched: Callable[[Any], bool], obj: Any) -> bool:
    """Django's ``is_fetched(obj)``, before Django gave ``obj`` its empty
    ``_prefetched_objects_cache`` (which is then all that test reads)."""
    if not hasattr(obj, "_prefetched_objects_cache"):
        try:
            return is_fetched(obj)
        except AttributeError:
            return False
    return is_fetched(obj)


def _merged(result: tuple[list[Any], list[Any]]) -> _Rows:
    rows = _Rows(result[0])
    rows._prefetch_related_lookups = result[1]
    return rows


class _Made:
    """A lookup the rows brought, with the copy Django's ``copy.copy()`` gets."""

    def __init__(self, made: Prefetch) -> None:
        self.made = made

    def __copy__(self) -> Prefetch:
        return self.made


def _prefixed(lookup: Any, prefix: str) -> Prefetch:
    """``lookup`` under ``prefix``, as Django will normalize its copy of it.

    A Prefetch is shared with that copy, queryset included, not copied again.
    """
    if isinstance(lookup, _Made):
        lookup = lookup.made
    if isinstance(lookup, Prefetch):
        view = type(lookup).__new__(type(lookup))
        view.__dict__.update(vars(lookup))
        lookup = view
    else:
        lookup = Prefetch(lookup)
    lookup.add_prefix(prefix)
    return lookup


def _through_caches(obj_list: Any, through_attr: str) -> list[Any]:
    """Django's way from one level to the next when nothing needs fetching."""
    new_obj_list: list[Any] = []
    for obj in obj_list:
        if through_attr in getattr(obj, "_prefetched_objects_cache", ()):
            new_obj = list(obj._prefetched_objects_cache.get(through_attr))
        else:
            try:
                new_obj = getattr(obj, through_attr)
            except exceptions.ObjectDoesNotExist:
                continue
        if new_obj is None:
            continue
        if isinstance(new_obj, list):
            new_obj_list.extend(new_obj)
        else:
            new_obj_list.append(new_obj)
    return new_obj_list
