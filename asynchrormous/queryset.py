"""AsyncQuerySet: a Django QuerySet that can run its database work in the background.

``run_async()`` puts a queryset in background mode: evaluations are submitted to the
worker pool when asked for, terminals return lazy results, and the caller blocks only
where a result is used. Without it, the queryset is exactly Django's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, TypeVar

from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections, router
from django.db.models import Manager, Model, QuerySet
from django.db.models.expressions import ResolvedOuterRef
from django.db.models.query import RawQuerySet
from django.db.models.sql import Query
from django.db.models.sql.where import WhereNode

from . import aio, prefetch
from .cache import check_timeout, default_timeout, reading, timeout_for, uncached
from .calls import (
    Deferred,
    Recording,
    check_transaction,
    compile_fetch,
    dry_run,
    encode,
    frozen,
    replaying,
)
from .exceptions import AsynchrormousError, ResultTimeout
from .pool import read_with_reconnect
from .results import DEFAULT, Job, await_job, lazy_result, submit

__all__ = ["AsyncManager", "AsyncQuerySet", "AsyncQuerySetMixin", "AsyncRawQuerySet"]

_T = TypeVar("_T", bound=Model)

# Terminals that write; after update() and delete() Django drops the result cache.
_WRITES = frozenset(
    name
    for name, attr in vars(QuerySet).items()
    if getattr(attr, "alters_data", False) and not name.startswith(("a", "_"))
)
_INVALIDATING = frozenset({"update", "delete"})

# Guards a queryset's pending fetch when threads share the queryset.
_fetch_lock = threading.Lock()


def _new_fetch_lock() -> None:
    # A forked child has no thread that could release the parent's.
    global _fetch_lock
    _fetch_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_fetch_lock)


def _fetch_rows(queryset: QuerySet[Any], compiled: Recording | None) -> list[Any]:
    # Its prefetch lookups run side by side (prefetch.py).
    with replaying(compiled), prefetch.fetching(queryset):
        queryset._fetch_all()
    rows = queryset._result_cache
    assert rows is not None
    return rows


def _fetch(queryset: QuerySet[Any], compiled: Recording | None = None) -> list[Any]:
    return read_with_reconnect(queryset.db, _fetch_rows, queryset, compiled)


def _expressions(node: Any) -> Iterator[Any]:
    """Every expression under ``node``, down into subqueries' own queries."""
    if isinstance(node, Query):
        for root in (node.where, *node.annotations.values()):
            yield from _expressions(root)
    elif isinstance(node, WhereNode):
        for child in node.children:
            yield from _expressions(child)
    else:
        yield node
        # Not every node is an expression: none() puts a NothingNode in the WHERE.
        for source in getattr(node, "get_source_expressions", list)():
            if source is not None:
                yield from _expressions(source)


def _refers_to_outer_query(query: Query) -> bool:
    """Whether the query can only run as a subquery (OuterRef), so not on its own.

    An OuterRef nested deeper may refer to this query itself: then the slice only
    loses its early start, never its result.
    """
    return any(isinstance(e, ResolvedOuterRef) for e in _expressions(query))


def _after_mixin(cls: type, name: str) -> Any:
    """The attribute ``name`` as the class after AsyncQuerySetMixin in ``cls``'s MRO
    has it: Django's method, or a base's override of it."""
    mro = cls.__mro__
    for base in mro[mro.index(AsyncQuerySetMixin) + 1 :]:
        if name in vars(base):
            return vars(base)[name]
    raise AttributeError(name)


def _cached(method: Callable[..., Any]) -> Callable[..., Any]:
    """A read terminal that a cached queryset (``cache()``) answers from the cache."""

    @functools.wraps(method)
    def read(self: AsyncQuerySetMixin[Any], *args: Any, **kwargs: Any) -> Any:
        if not self._cache_timeout:
            return method(self, *args, **kwargs)
        with reading(self._cache_timeout):
            return method(self, *args, **kwargs)

    return read


def _uncached(method: Callable[..., Any]) -> Callable[..., Any]:
    """A write terminal: the rows it looks at first (delete()'s collector) come
    from the database, even on a cached queryset."""

    @functools.wraps(method)
    def write(self: AsyncQuerySetMixin[Any], *args: Any, **kwargs: Any) -> Any:
        if not self._cache_timeout:
            return method(self, *args, **kwargs)
        with uncached():
            return method(self, *args, **kwargs)

    return write


def _save_new(obj: Any, using: str) -> Any:
    obj.save(force_insert=True, using=using)
    return obj


class _AwaitableRows:
    """``await x`` gives the list of rows and ``async for`` iterates it."""

    async def _afetch(self) -> list[Any]:
        raise NotImplementedError

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._afetch().__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        async def rows() -> AsyncIterator[Any]:
            for row in await self:
                yield row

        return rows()


class AsyncQuerySetMixin(_AwaitableRows, QuerySet[_T]):
    """Adds background evaluation to a QuerySet; mix it into custom QuerySets first."""

    # Class attributes so Django's __init__ and _clone need no override for defaults.
    _background = False
    _fetch_job: Job | None = None
    _cache_timeout = 0.0  # seconds; 0: not cached

    # -- Entering background mode ------------------------------------------------

    def run_async(self) -> AsyncQuerySetMixin[_T]:
        """A clone in background mode; it runs nothing until it is started or used.

        Of an evaluated queryset (a prefetched related manager's, say) the clone
        answers from the same result cache, as the queryset itself would.
        """
        clone = self._chain()  # type: ignore[attr-defined]
        clone._background = True
        clone._result_cache = self._result_cache
        clone._prefetch_done = self._prefetch_done
        return clone

    def cache(self, timeout: float | None = None) -> AsyncQuerySetMixin[_T]:
        """A clone whose reads are answered from ``ASYNCHRORMOUS["CACHE"]``.

        Kept ``timeout`` seconds (None: ``CACHE_TIMEOUT``; 0: not cached), and
        dropped as soon as a write to any table they read commits (README,
        Caching). ``iterator()``, ``select_for_update()`` and reads in a
        transaction that wrote their tables go to the database.
        """
        clone = self._chain()  # type: ignore[attr-defined]
        clone._cache_timeout = timeout_for(timeout)
        return clone

    def start(self) -> AsyncQuerySetMixin[_T]:
        """Put this queryset in background mode and submit its fetch now; idempotent."""
        self._background = True
        self._started_fetch()
        return self

    def _started_fetch(self) -> Job | None:
        """The pending fetch of this queryset, submitted now if there is none yet.

        None when the result cache is filled. Threads that share one queryset use
        the fetch one of them started; two that start it at the same moment may
        both query, as two threads evaluating one Django queryset do.
        """
        job = self._fetch_job
        if job is not None or self._result_cache is not None:
            return job
        job = self._submit_fetch()  # not under the lock: it may run inline
        with _fetch_lock:
            if self._result_cache is not None:
                return None
            if self._fetch_job is None:
                self._fetch_job = job
            return self._fetch_job

    def _submit_fetch(self) -> Job:
        db = self.db
        check_transaction(db)
        clone = self._fetch_clone(db)
        # Compile on the caller: a bad query raises here, not where it is used; the
        # worker sends the same SQL. From async code, a compilation needing the
        # server's version is left to the worker.
        compiled = None
        with contextlib.suppress(SynchronousOnlyOperation):
            compiled = compile_fetch(clone.query, db)
        return submit(
            _fetch,
            clone,
            compiled,
            alias=db,
            writes=False,
            description=f"fetch of {self._describe()}",
        )

    def _fetch_clone(self, db: str) -> AsyncQuerySetMixin[_T]:
        """A private copy for the worker to evaluate, the plain Django way."""
        clone = self._clone()
        clone._background = False
        clone._db = db  # type: ignore[attr-defined]
        return clone

    def _collect_fetch(self, job: Job, timeout: float | None = DEFAULT) -> None:
        try:
            rows = job.result(timeout)
        except ResultTimeout:
            raise  # the fetch goes on: the next use waits for the same one
        except BaseException:
            # As in Django, a failed evaluation is retried on the next use.
            self._forget_fetch(job)
            raise
        self._fetched(job, rows)

    def _fetched(self, job: Job, rows: list[Any]) -> None:
        # In this order: a thread sharing the queryset that sees the rows must not
        # run their prefetch lookups again (Django's _fetch_all() would).
        self._prefetch_done = True
        self._result_cache = rows
        self._forget_fetch(job)

    def _forget_fetch(self, job: Job) -> None:
        """Drop the pending fetch ``job``, if it is still this queryset's."""
        with _fetch_lock:
            if self._fetch_job is job:
                self._fetch_job = None

    def _describe(self, method: str | None = None) -> str:
        name = f"{self.model.__name__} queryset" if self.model else "queryset"
        return name if method is None else f"{name}.{method}()"

    # -- Hooks for resolve(), wait(), is_ready(), cancel() ----------------------

    def _background_job(self) -> Job | None:
        return self._fetch_job

    def _resolve_background(self, timeout: float | None) -> None:
        self._background = True
        job = self._started_fetch()
        if job is not None:
            self._collect_fetch(job, timeout)

    # -- Django's evaluation points ----------------------------------------------

    def _fetch_all(self) -> None:
        if self._result_cache is None and (self._background or self._fetch_job):
            job = self._started_fetch()
            if job is not None:
                self._collect_fetch(job)
        if self._result_cache is None and self._cache_timeout:
            with reading(self._cache_timeout):
                super()._fetch_all()
        else:
            super()._fetch_all()

    def _prefetch_related_objects(self) -> None:
        """Django's step; a background fetch runs its lookups side by side."""
        if prefetch.in_background_fetch(self) and (
            _after_mixin(type(self), "_prefetch_related_objects")
            is QuerySet._prefetch_related_objects  # type: ignore[attr-defined]
        ):
            lookups = self._prefetch_related_lookups  # type: ignore[attr-defined]
            prefetch.prefetch_related_objects(self._result_cache, *lookups)
            self._prefetch_done = True
        else:
            super()._prefetch_related_objects()  # type: ignore[misc]

    def _clone(self) -> AsyncQuerySetMixin[_T]:
        clone = super()._clone()  # type: ignore[misc]
        clone._background = self._background
        clone._cache_timeout = self._cache_timeout
        return clone

    def __getitem__(self, k: Any) -> Any:
        job = self._fetch_job
        plain_slice = isinstance(k, slice) and k.step is None
        if job is not None and self._result_cache is None and not plain_slice:
            # Integer indexes and stepped slices answer from the started fetch.
            self._collect_fetch(job)
        result = super().__getitem__(k)
        if job is not None and isinstance(result, AsyncQuerySetMixin):
            # A plain slice stays a QuerySet, as in Django (``qs[:4][1:].count()``
            # works); its rows are those of the started fetch, sliced.
            result._fetch_job = job.derive(
                lambda rows: rows[k], self._describe() + f"[{k.start}:{k.stop}]"
            )
            result._background = True
            return result
        if (
            self._background
            and isinstance(result, AsyncQuerySetMixin)
            and not _refers_to_outer_query(result.query)
        ):
            result.start()
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncQuerySetMixin[_T]:
        # The copy starts without the pending fetch, as it starts without the
        # rows; the original keeps it for the threads that may be evaluating it.
        if self._fetch_job is not None:
            memo[id(self._fetch_job)] = None
        return super().__deepcopy__(memo)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_fetch_job", None)
        return state

    # -- Terminals: lazy results in background mode ------------------------------

    def _terminal_clone(self, writes: bool) -> tuple[Any, str]:
        """A plain-Django copy that sees this queryset's cache, and its database.

        The database is routed here, on the caller's thread, as Django would.
        """
        qs = self._chain()  # type: ignore[attr-defined]
        qs._background = False
        qs._result_cache = self._result_cache
        qs._prefetch_done = self._prefetch_done
        qs._for_write = qs._for_write or writes
        qs._db = qs.db
        return qs, qs._db

    def _background_call(
        self,
        name: str,
        resultclass: type | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run terminal ``name`` with Django's checks now and its database work later.

        The method is the one after this mixin in the class's MRO (Django's, or a
        base's): an override above the mixin, which called us through ``super()``,
        has run already, once, here. It first runs on the caller up to its first
        statement (see ``calls.dry_run``); if it answers without one (a filled
        result cache), that was its one run, and that is the value. Otherwise it
        runs again on a worker, which sends the first statement as the dry run
        compiled it (``calls.replaying``). Its arguments are captured at the call
        (``frozen``: iterators made lists, containers copied), so both runs see
        the same values.
        """
        writes = name in _WRITES
        args, kwargs = frozen(args), frozen(kwargs)
        qs, db = self._terminal_clone(writes)
        method = getattr(super(AsyncQuerySetMixin, qs), name)
        recording: Recording | None = None
        try:
            with dry_run(db) as recording:
                return method(*args, **kwargs)
        except Deferred:
            pass
        except SynchronousOnlyOperation:
            # Called from async code, Django wanted the server's version first;
            # the worker will do those checks, and compile.
            recording = None
        qs._result_cache = None
        if name in _INVALIDATING:
            self._invalidate()
        job = submit(
            _call if writes else _read,
            method,
            args,
            kwargs,
            recording,
            alias=db,
            writes=writes,
            description=self._describe(name),
        )
        return lazy_result(job, resultclass)

    def _invalidate(self) -> None:
        """What Django does after update() and delete(): the rows may be stale.

        A pending fetch is stale too: the next use fetches again, after the write.
        """
        self._result_cache = None
        job = self._fetch_job
        if job is not None:
            job.abandon()
            self._forget_fetch(job)

    def _derived(
        self, transform: Callable[[list[Any]], Any], resultclass: type, name: str
    ) -> Any:
        """A lazy result computed from this queryset's started fetch."""
        job = self._fetch_job
        if job is None or self._result_cache is not None:
            return None
        return lazy_result(job.derive(transform, self._describe(name)), resultclass)

    @_cached
    def count(self) -> int:
        if not self._background:
            return super().count()
        derived = self._derived(len, int, "count")
        return self._background_call("count", int) if derived is None else derived

    @_cached
    def exists(self) -> bool:
        if not self._background:
            return super().exists()
        derived = self._derived(bool, bool, "exists")
        return self._background_call("exists", bool) if derived is None else derived

    @_cached
    def contains(self, obj: Any) -> bool:
        if not self._background:
            return super().contains(obj)
        return self._background_call("contains", bool, obj)

    @_cached
    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self._background:
            return super().aggregate(*args, **kwargs)
        return self._background_call("aggregate", dict, *args, **kwargs)

    @_cached
    def in_bulk(self, id_list: Any = None, *, field_name: str = "pk") -> dict[Any, _T]:
        if not self._background:
            return super().in_bulk(id_list, field_name=field_name)
        return self._background_call("in_bulk", dict, id_list, field_name=field_name)

    @_cached
    def get(self, *args: Any, **kwargs: Any) -> _T:
        if not self._background:
            return super().get(*args, **kwargs)
        return self._background_call("get", None, *args, **kwargs)

    @_cached
    def first(self) -> _T | None:
        if not self._background:
            return super().first()
        return self._background_call("first", None)

    @_cached
    def last(self) -> _T | None:
        if not self._background:
            return super().last()
        return self._background_call("last", None)

    @_cached
    def earliest(self, *fields: Any) -> _T:
        if not self._background:
            return super().earliest(*fields)
        return self._background_call("earliest", None, *fields)

    @_cached
    def latest(self, *fields: Any) -> _T:
        if not self._background:
            return super().latest(*fields)
        return self._background_call("latest", None, *fields)

    def explain(self, *, format: Any = None, **options: Any) -> str:
        if not self._background:
            return super().explain(format=format, **options)
        return self._background_call("explain", str, format=format, **options)

    def create(self, **kwargs: Any) -> _T:
        if not self._background:
            return super().create(**kwargs)
        if _after_mixin(type(self), "create") is not QuerySet.create:
            # A base below the mixin has its own create(): run that, once.
            return self._background_call("create", None, **kwargs)
        # Build the instance here (bad fields raise now, signals fire once, in the
        # worker's save) and save it in the background.
        reverse_one_to_one = frozenset(kwargs).intersection(
            self.model._meta._reverse_one_to_one_field_names  # type: ignore[attr-defined]
        )
        if reverse_one_to_one:
            super().create(**kwargs)  # raises Django's own ValueError
        # Field values as they are now; an iterator is left for the field to reject.
        kwargs = frozen(kwargs, iterators=False)
        self._for_write = True
        db = self.db
        check_transaction(db)
        connection = connections[db]
        obj: Any = self.model(**kwargs)
        # What Django checks while it prepares the INSERT, checked here, at the call:
        # unsaved related objects, and each value as the field sends it ("Field
        # 'pages' expected a number but got ...", a JSON value json cannot encode).
        obj._prepare_related_fields_for_save(operation_name="save")
        with contextlib.suppress(SynchronousOnlyOperation):
            for field in obj._meta.concrete_fields:
                if field.generated:
                    continue  # computed by the database, not sent
                value = field.value_from_object(obj)
                if not hasattr(value, "resolve_expression"):
                    encode(field.get_db_prep_save(value, connection))
        job = submit(
            _save_new,
            obj,
            db,
            alias=db,
            writes=True,
            description=self._describe("create"),
        )
        return lazy_result(job, None)

    def get_or_create(self, defaults: Any = None, **kwargs: Any) -> tuple[_T, bool]:
        if not self._background:
            return super().get_or_create(defaults, **kwargs)
        return self._background_call("get_or_create", tuple, defaults, **kwargs)

    def update_or_create(
        self, defaults: Any = None, create_defaults: Any = None, **kwargs: Any
    ) -> tuple[_T, bool]:
        if not self._background:
            return super().update_or_create(defaults, create_defaults, **kwargs)
        return self._background_call(
            "update_or_create", tuple, defaults, create_defaults, **kwargs
        )

    def bulk_create(self, objs: Any, *args: Any, **kwargs: Any) -> list[_T]:
        if not self._background:
            return super().bulk_create(objs, *args, **kwargs)
        return self._background_call("bulk_create", list, objs, *args, **kwargs)

    def bulk_update(self, objs: Any, fields: Any, batch_size: int | None = None) -> int:
        if not self._background:
            return super().bulk_update(objs, fields, batch_size)
        return self._background_call("bulk_update", int, objs, fields, batch_size)

    @_uncached
    def update(self, **kwargs: Any) -> int:
        if not self._background:
            return super().update(**kwargs)
        return self._background_call("update", int, **kwargs)

    @_uncached
    def delete(self) -> tuple[int, dict[str, int]]:
        if not self._background:
            return super().delete()
        return self._background_call("delete", tuple)

    # Keep Model.objects.delete() impossible, as in Django.
    delete.queryset_only = True  # type: ignore[attr-defined]

    # -- asyncio: the same queryset, awaited on the pool ---------------------------

    async def _afetch(self) -> list[_T]:
        """``await qs``: the list of results, from a worker (or the started fetch)."""
        if self._result_cache is None:
            if self._fetch_job is None:
                db = self.db
                self._result_cache = await aio.run(
                    _fetch,
                    self._fetch_clone(db),
                    alias=db,
                    writes=False,
                    description=f"fetch of {self._describe()}",
                )
                self._prefetch_done = True
                return self._result_cache
            job = self._fetch_job
            try:
                rows = await await_job(job, owned=False)
            except (ResultTimeout, asyncio.CancelledError):
                raise  # the fetch goes on: the next use waits for the same one
            except BaseException:
                self._forget_fetch(job)  # as in Django, a failed fetch is retried
                raise
            self._fetched(job, rows)
        return self._result_cache  # type: ignore[return-value]

    async def _arun(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Django's ``name`` on a worker, awaited: the body of every ``a*`` method."""
        writes = name in _WRITES
        qs, db = self._terminal_clone(writes)
        result = await aio.run(
            _call if writes else _read,
            getattr(qs, name),  # as Django's a* methods: overrides included
            args,
            kwargs,
            alias=db,
            writes=writes,
            description=self._describe("a" + name),
        )
        if name in _INVALIDATING:
            self._invalidate()
        return result

    async def acount(self) -> int:
        return await self._arun("count")

    async def aexists(self) -> bool:
        return await self._arun("exists")

    async def acontains(self, obj: Any) -> bool:
        return await self._arun("contains", obj)

    async def aaggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await self._arun("aggregate", *args, **kwargs)

    async def ain_bulk(
        self, id_list: Any = None, *, field_name: str = "pk"
    ) -> dict[Any, _T]:
        return await self._arun("in_bulk", id_list, field_name=field_name)

    async def aget(self, *args: Any, **kwargs: Any) -> _T:
        return await self._arun("get", *args, **kwargs)

    async def afirst(self) -> _T | None:
        return await self._arun("first")

    async def alast(self) -> _T | None:
        return await self._arun("last")

    async def aearliest(self, *fields: Any) -> _T:
        return await self._arun("earliest", *fields)

    async def alatest(self, *fields: Any) -> _T:
        return await self._arun("latest", *fields)

    async def aexplain(self, *, format: Any = None, **options: Any) -> str:
        return await self._arun("explain", format=format, **options)

    async def acreate(self, **kwargs: Any) -> _T:
        return await self._arun("create", **kwargs)

    async def aget_or_create(
        self, defaults: Any = None, **kwargs: Any
    ) -> tuple[_T, bool]:
        return await self._arun("get_or_create", defaults, **kwargs)

    async def aupdate_or_create(
        self, defaults: Any = None, create_defaults: Any = None, **kwargs: Any
    ) -> tuple[_T, bool]:
        return await self._arun("update_or_create", defaults, create_defaults, **kwargs)

    async def abulk_create(self, objs: Any, *args: Any, **kwargs: Any) -> list[_T]:
        return await self._arun("bulk_create", list(objs), *args, **kwargs)

    async def abulk_update(
        self, objs: Any, fields: Any, batch_size: int | None = None
    ) -> int:
        return await self._arun("bulk_update", list(objs), fields, batch_size)

    async def aupdate(self, **kwargs: Any) -> int:
        return await self._arun("update", **kwargs)

    async def adelete(self) -> tuple[int, dict[str, int]]:
        return await self._arun("delete")

    adelete.queryset_only = True  # type: ignore[attr-defined]

    async def aiterator(self, chunk_size: int = 2000) -> AsyncIterator[_T]:
        """Stream from a worker, a chunk ahead; honours DISABLE_SERVER_SIDE_CURSORS."""
        if chunk_size <= 0:
            raise ValueError("Chunk size must be strictly positive.")
        db = self.db
        if await aio.on_callers_sync_thread(db):
            async for row in super().aiterator(chunk_size):
                yield row
            return
        qs = self._chain()  # type: ignore[attr-defined]
        qs._background = False
        qs._db = db
        async for row in aio.stream(
            lambda: qs.iterator(chunk_size),
            chunk_size,
            alias=db,
            description=self._describe("aiterator"),
        ):
            yield row

    def raw(
        self,
        raw_query: Any,
        params: Any = (),
        translations: dict[str, str] | None = None,
        using: str | None = None,
    ) -> AsyncRawQuerySet:
        raw = super().raw(raw_query, params, translations, using)
        raw.__class__ = AsyncRawQuerySet  # Django's own set-up, plus await
        return raw  # type: ignore[return-value]


def _call(
    method: Callable[..., Any],
    args: Any,
    kwargs: Any,
    recording: Recording | None = None,
) -> Any:
    with replaying(recording):
        return method(*args, **kwargs)


def _read(
    method: Callable[..., Any],
    args: Any,
    kwargs: Any,
    recording: Recording | None = None,
) -> Any:
    db = method.__self__.db  # type: ignore[attr-defined]
    return read_with_reconnect(db, _call, method, args, kwargs, recording)


class AsyncQuerySet(AsyncQuerySetMixin[_T]):
    """Django's QuerySet with ``run_async()`` and ``start()``."""


def _fetch_raw(queryset: RawQuerySet) -> list[Any]:
    return list(queryset)


class AsyncRawQuerySet(_AwaitableRows, RawQuerySet):
    """An AsyncQuerySet's RawQuerySet: awaitable on the pool, no background mode."""

    def __repr__(self) -> str:
        return f"<RawQuerySet: {self.query}>"  # as Django's, which code compares

    async def _afetch(self) -> list[Any]:
        if self._result_cache is None:  # type: ignore[has-type]
            self._result_cache = await aio.run(
                _fetch_raw,
                self._clone(),  # type: ignore[attr-defined]
                alias=self.db,
                writes=False,
                description=f"raw query {self.raw_query!r}",
            )
            self._prefetch_done = True
        return self._result_cache

    def run_async(self) -> None:
        raise AsynchrormousError(
            "run_async() is not supported on a RawQuerySet (Model.objects.raw()); run "
            "it in the background with a QuerySet, or iterate it directly."
        )

    start = run_async


# Django's related managers define these as ``sync_to_async(self.<name>)``, which run
# on one thread, one after another.
_RELATED_WRITES = (
    "create",
    "get_or_create",
    "update_or_create",
    "add",
    "remove",
    "clear",
    "set",
)
_RELATED_FACTORIES = (
    "create_reverse_many_to_one_manager.",
    "create_forward_many_to_many_manager.",
)


def _on_the_pool(name: str) -> Callable[..., Any]:
    """``a<name>()`` of a related manager, running ``<name>()`` on the pool."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        instance = getattr(self, "instance", None)
        return await aio.run(
            functools.partial(getattr(self, name), *args, **kwargs),
            alias=self._db or router.db_for_write(self.model, instance=instance),
            writes=True,
            description=f"{type(self).__name__}.a{name}()",
        )

    method.__name__ = method.__qualname__ = f"a{name}"
    method.alters_data = True  # type: ignore[attr-defined]
    return method


class AsyncManager(Manager.from_queryset(AsyncQuerySet)):  # type: ignore[misc]
    """The manager to put on models: ``objects = AsyncManager()``.

    ``AsyncManager(cache=True)`` caches every queryset it makes, for
    ``CACHE_TIMEOUT`` seconds (``cache=300``: 300 seconds), while
    ``ASYNCHRORMOUS["CACHE"]`` is set. A model's related managers
    (``author.book_set``) cache as the related model's default manager.
    """

    def __init__(self, *, cache: bool | float = False) -> None:
        super().__init__()
        if not isinstance(cache, bool):
            check_timeout(cache)  # a bad value fails here, at import
        self._cache = cache

    def get_queryset(self) -> AsyncQuerySet[Any]:
        queryset = super().get_queryset()
        setting = self._cache
        if "instance" in vars(self):
            # A related manager: made by Django from the default manager's class.
            setting = getattr(self.model._default_manager, "_cache", False)
        if setting is not False:
            queryset._cache_timeout = default_timeout(setting)
        return queryset

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Django builds a model's related managers by subclassing its default
        # manager: give them pool-backed writes too (only Django's own wrappers).
        for name in _RELATED_WRITES:
            method = cls.__dict__.get(f"a{name}")
            if method is not None and method.__qualname__.startswith(
                _RELATED_FACTORIES
            ):
                setattr(cls, f"a{name}", _on_the_pool(name))
