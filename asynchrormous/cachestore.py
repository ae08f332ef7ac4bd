"""Cached results and the table generations that keep them fresh, in Django's cache.

Every table of a database has a *generation*: a random token in the cache, replaced
by each committed write to the table (``bump``). A cached result is stored with the
generations it was read under, taken before the query ran, and is served only while
they are all still current: a write that commits after that snapshot makes the entry
unreachable for everyone, in every process that shares the cache. Tokens are random,
not counters, so a generation the cache evicted comes back as a new one, never as
an old one that stale entries still carry.

The cache is never needed for correctness: when a call fails (server down, timeout),
reads go to the database for ``RETRY`` seconds, one warning is logged per outage,
and the tables a process could not invalidate are read from the database only, by
that process, until it has delivered the invalidation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pickle
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.core.signals import setting_changed

from . import outages
from .conf import get_settings
from .sqltables import ALL

__all__ = [
    "MISSING",
    "RETRY",
    "Found",
    "Store",
    "calling_the_cache",
    "current_store",
    "database_id",
    "in_a_cache_call",
    "session_id",
]

logger = logging.getLogger("asynchrormous")

#: Seconds a process leaves the cache alone after a failed call.
RETRY = 1.0

MISSING = object()


def _memoized(function: Any) -> Any:
    """``function(connection)``, kept on the connection while its settings are the
    same (tests change NAME to the test database's), in this process."""

    def memoized(connection: Any) -> str:
        conf = connection.settings_dict
        state = (id(conf), conf.get("NAME"), os.getpid())
        memo = vars(connection).setdefault("_asynchrormous_ids", {})
        kept = memo.get(function)
        if kept is None or kept[0] != state:
            kept = memo[function] = (state, function(connection))
        return str(kept[1])

    memoized.__doc__ = function.__doc__
    return memoized


@_memoized
def database_id(connection: Any) -> str:
    """The database a connection reads, the same in every process that shares it:
    the generations of its tables.

    Two aliases of one database share it, however their settings spell it; an
    in-memory SQLite database exists in one process only.
    """
    conf = connection.settings_dict
    name = str(conf.get("NAME") or "")
    if connection.vendor == "sqlite":
        if connection.is_in_memory_db():
            name = f"{name} in {os.getpid()}"
        else:
            name = os.path.realpath(name)
    parts = [
        connection.vendor,
        str(conf.get("HOST") or "").lower(),
        str(conf.get("PORT") or ""),
        name,
    ]
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


@_memoized
def session_id(connection: Any) -> str:
    """What else decides a connection's answers: its user and its OPTIONS (a
    ``search_path``, an ``init_command``). Results are shared only between
    connections that agree on it."""
    conf = connection.settings_dict
    parts = [database_id(connection), conf.get("USER"), repr(conf.get("OPTIONS"))]
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


_calling = threading.local()


@contextlib.contextmanager
def calling_the_cache() -> Iterator[None]:
    """While the cache itself runs statements (Django's DatabaseCache): they are
    the cache's own, and invalidate nothing."""
    outer = getattr(_calling, "active", False)
    _calling.active = True
    try:
        yield
    finally:
        _calling.active = outer


def in_a_cache_call() -> bool:
    return getattr(_calling, "active", False)


def _reuse_clients(client: Any) -> None:
    """Give a RedisCacheClient one redis.Redis per connection pool."""
    made: dict[int, Any] = {}
    get_client = client.get_client

    def reused(key: Any = None, *, write: bool = False) -> Any:
        pool = client._get_connection_pool(write)
        redis = made.get(id(pool))
        if redis is None or redis.connection_pool is not pool:
            redis = made[id(pool)] = get_client(key, write=write)
        return redis

    client.get_client = reused


class Unreadable(Exception):
    """A value in the cache that cannot be unpickled: no outage, a miss."""


_UNREADABLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)


class Found(NamedTuple):
    """What ``Store.lookup`` found: ``value`` (MISSING unless kept under the
    current generations), ``generations`` (the snapshot to keep a new value under;
    None when the cache is unavailable: keep nothing) and ``cost`` (the seconds
    the query took when it was last kept, whatever its generations)."""

    value: Any
    generations: tuple[Any, ...] | None
    cost: float | None


def _token() -> str:
    return secrets.token_hex(8)


class Store:
    """The cache named by ``ASYNCHRORMOUS["CACHE"]``, as this library uses it."""

    def __init__(self, alias: str, prefix: str) -> None:
        self.alias = alias
        self.prefix = prefix
        self._lock = threading.Lock()
        _stores.add(self)
        self._down_until = 0.0
        self._outages = outages.Outages(
            began="Cache %r is unavailable (%s): cached queries read the database "
            "until it answers again.",
            failing="Cache %r still unavailable: %r",
            ended="Cache %r answers again after %.1f s (%d failed calls).",
        )
        # Generations this process could not replace: {database id: {table, ...}}.
        self._undelivered: dict[str, set[str]] = {}

    # -- Keys ---------------------------------------------------------------------

    def generation_key(self, database: str, table: str) -> str:
        digest = hashlib.blake2b(table.encode(), digest_size=8).hexdigest()
        return f"{self.prefix}:g:{database}:{digest}"

    def entry_key(self, database: str, material: Any) -> str | None:
        """The key of a result, from everything that decides it; None when some
        part cannot be pickled (the result is then not cached)."""
        try:
            dumped = pickle.dumps((database, material), protocol=5)
        except Exception:
            return None
        return f"{self.prefix}:r:{hashlib.blake2b(dumped, digest_size=20).hexdigest()}"

    def generation_keys(self, database: str, tables: Iterable[str]) -> list[str]:
        """The generations a result of ``tables`` depends on: the database's first."""
        return [
            self.generation_key(database, table) for table in (ALL, *sorted(tables))
        ]

    # -- Outages ------------------------------------------------------------------

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _cache(self) -> Any:
        """This thread's backend of the cache (Django keeps one per thread)."""
        backend = caches[self.alias]
        client = getattr(backend, "_cache", None)  # RedisCache's RedisCacheClient
        if isinstance(backend, RedisCache) and "get_client" not in vars(client):
            # Django makes a redis.Redis for every call (about 0.1 ms); one per
            # connection pool, over the same pool, serves them all.
            _reuse_clients(client)
        return backend

    def _call(
        self, method: str, *args: Any, always: bool = False, **kwargs: Any
    ) -> Any:
        """A call to the cache; MISSING when it failed (then noted as an outage).

        During the pause after a failure only an ``always`` call is tried (an
        invalidation: bounded by the client's timeout). A value that cannot be
        unpickled (another program's, another version's) raises UNREADABLE.
        """
        if not (always or self.available()):
            return MISSING
        since = outages.epoch
        try:
            with calling_the_cache():
                result = getattr(self._cache(), method)(*args, **kwargs)
        except _UNREADABLE_ERRORS as exc:
            raise Unreadable from exc
        except Exception as exc:
            self._down_until = time.monotonic() + RETRY
            self._outages.failed(self.alias, exc, since)
            return MISSING
        if self._outages.succeeded(self.alias, since):
            self._down_until = 0.0
            for database in list(self._undelivered):  # what is owed, first
                self.bump(database, ())
        return result

    # -- Generations --------------------------------------------------------------

    def bump(self, database: str, tables: Iterable[str]) -> None:
        """Make every result read from ``tables`` unreachable; never raises.

        What could not be delivered is kept, and delivered before this process
        reads those tables from the cache again.
        """
        tables = set(tables)
        with self._lock:
            pending = self._undelivered.pop(database, set())
        tables |= pending
        if not tables:
            return
        new = {self.generation_key(database, table): _token() for table in tables}
        # set_many() answers the keys it could not set (memcached's client marks a
        # server dead and skips it rather than raise).
        try:
            failed = self._call("set_many", new, timeout=None, always=True)
        except Unreadable:  # set_many() reads nothing: cannot happen
            failed = MISSING
        if failed is MISSING or failed:
            with self._lock:
                self._undelivered.setdefault(database, set()).update(tables)

    def blocked(self, database: str, tables: Iterable[str]) -> bool:
        """Whether this process owes an invalidation of some of ``tables``: it
        then delivers it first, or reads them from the database."""
        if not self._undelivered.get(database):
            return False
        self.bump(database, ())
        pending = self._undelivered.get(database)
        if not pending:
            return False
        return ALL in pending or not pending.isdisjoint(tables)

    def lookup(self, key: str, generation_keys: list[str]) -> Found:
        """The entry under ``key`` and the current generations, in one round trip.

        Generations that do not exist yet are created here.
        """
        try:
            found = self._call("get_many", [key, *generation_keys])
        except Unreadable:
            # The entry is not one of ours (the generations are plain strings):
            # a miss, and the rows read now replace it.
            try:
                found = self._call("get_many", generation_keys)
            except Unreadable:
                found = MISSING
        if found is MISSING:
            return Found(MISSING, None, None)
        absent = [k for k in generation_keys if k not in found]
        if absent:
            for k in absent:
                token: Any = _token()
                added = self._call("add", k, token, timeout=None)
                if added is MISSING:
                    return Found(MISSING, None, None)
                if not added:  # created meanwhile by another reader or a writer
                    try:
                        token = self._call("get", k)
                    except Unreadable:
                        token = None
                    if token is None or token is MISSING:
                        return Found(MISSING, None, None)
                found[k] = token
        generations = tuple(found[k] for k in generation_keys)
        entry = found.get(key)
        if not (isinstance(entry, tuple) and len(entry) == 3):
            return Found(MISSING, generations, None)  # none, or not one of ours
        stored_under, cost, value = entry
        if stored_under != generations:
            return Found(MISSING, generations, cost)
        return Found(value, generations, cost)

    def claim(self, key: str, seconds: float) -> bool:
        """Whether this process may run the query of ``key`` now: no other process
        is running it (a short lock in the cache), or the cache cannot tell."""
        added = self._call("add", f"{key}:lock", 1, timeout=max(1, round(seconds * 2)))
        return added is MISSING or bool(added)

    def release(self, key: str) -> None:
        self._call("delete", f"{key}:lock")

    def wait_for(
        self, key: str, generation_keys: list[str], found: Found, seconds: float
    ) -> Any:
        """The rows another process is reading under ``found``'s generations, once
        it has kept them: at most ``seconds`` (then MISSING, as when the
        generations change meanwhile: the caller then reads the database)."""
        deadline = time.monotonic() + seconds
        pause = min(seconds / 10, 0.01)
        while time.monotonic() < deadline:
            time.sleep(pause)
            now = self.lookup(key, generation_keys)
            if now.value is not MISSING or now.generations != found.generations:
                return now.value
        return MISSING

    def store(
        self,
        key: str,
        generations: tuple[Any, ...],
        value: Any,
        timeout: float,
        cost: float,
    ) -> None:
        """Keep ``value`` under the generations it was read under, with the
        seconds its query took (a later miss knows what waiting for it is worth).

        A refusal (a value too large for memcached) is no outage: nothing is kept.
        """
        if not self.available():
            return
        try:
            with calling_the_cache():
                self._cache().set(
                    key,
                    (generations, cost, value),
                    # Whole seconds: Redis and memcached would round 0.5 down to 0.
                    timeout=math.ceil(timeout),
                )
        except Exception as exc:
            logger.debug("Cache %r did not keep a result: %r", self.alias, exc)


_store: Store | None = None
_store_lock = threading.Lock()
# Every Store still in use (a transaction's _Commit keeps one past a settings change).
_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock another thread held at the fork is never released in the child."""
    global _store_lock
    _store_lock = threading.Lock()
    for store in _stores:
        store._lock = threading.Lock()


def current_store() -> Store | None:
    """The Store of ``ASYNCHRORMOUS["CACHE"]``; None when caching is off."""
    store = _store
    if store is not None:
        return store
    conf = get_settings()
    if conf.cache is None:
        return None
    return _new_store(conf.cache, conf.cache_prefix)


def _new_store(alias: str, prefix: str) -> Store:
    global _store
    with _store_lock:
        if _store is None:
            _store = Store(alias, prefix)
        return _store


def _reload(*, setting: str, **kwargs: Any) -> None:
    global _store
    if setting in ("ASYNCHRORMOUS", "CACHES"):
        with _store_lock:
            _store = None


setting_changed.connect(_reload)
os.register_at_fork(after_in_child=_after_fork_in_child)
