"""A hostile review of query-result caching (issue 14): wrong rows, stale rows after
a commit, hangs, and the attacks the library survives.

Each finding is a strict xfail whose reason is the diagnosis; the plain tests are
guards: attacks that fail today would make them fail. Interleavings are forced with
events inside the statements themselves; waits are bounded, never sleeps.
"""

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from django.conf import settings as django_settings
from django.core.cache import caches
from django.db import (
    DatabaseError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import F
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now
from django.db.utils import load_backend

from asynchrormous import cache as cache_module
from asynchrormous import cachestore, outages
from asynchrormous.cache import invalidate
from asynchrormous.cachestore import current_store, database_id
from tests.cache_helpers import closing, recording, turn_on
from tests.cache_servers import memcached_fixture, redis_fixture  # noqa: F401
from tests.helpers import in_a_forked_child, own_connection_in_child
from tests.testapp.models import Author, Book, Gauge, Note, Publisher

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10
VENDOR = connection.vendor
only_on = {
    vendor: pytest.mark.skipif(VENDOR != vendor, reason=f"{vendor} only")
    for vendor in ("postgresql", "mysql", "sqlite")
}
not_on_sqlite = pytest.mark.skipif(VENDOR == "sqlite", reason="no users, no schemas")


@pytest.fixture
def cached(settings):
    """Caching on in the shared Redis, under keys of this test's own; yields the
    outcomes of the test's cached reads."""
    turn_on(settings, "redis", CACHE_PREFIX=f"ch-{uuid.uuid4().hex}")
    outcomes = recording()
    yield outcomes
    outcomes.stop()


def raw(sql, params=(), using="default"):
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)


def in_another_thread(fn, *args):
    with concurrent.futures.ThreadPoolExecutor(1, "other") as pool:
        return pool.submit(closing(fn), *args).result(TIMEOUT)


def pages_of(pk, using="default"):
    return (
        Book.objects.using(using)
        .cache()
        .filter(pk=pk)
        .values_list("pages", flat=True)
        .get()
    )


@contextlib.contextmanager
def alias(name, **changes):
    """A second database alias of this thread: the default's settings, with
    ``changes`` (made as Django's test case allows: not in settings.DATABASES)."""
    conf = {**connections["default"].settings_dict, **changes}
    connections[name] = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, name)
    try:
        yield name
    finally:
        connections[name].close()
        del connections[name]


def denied_or(fn):
    """``fn()``, or "denied" when the database refuses it."""
    try:
        return fn()
    except DatabaseError:
        return "denied"


# == Wrong rows ====================================================================


@pytest.fixture
def other_namespace():
    """Another namespace of the same database holding an empty testapp_author: a
    PostgreSQL schema (django-tenants' way), a MariaDB database. Yields the
    statement that makes the connection read it, and the one that switches back."""
    suffix = os.environ.get("TOX_ENV_NAME", "local").replace("-", "_")
    if VENDOR == "postgresql":
        name = f"ch_tenant_{suffix}"
        raw(f"CREATE SCHEMA {name}")
        raw(
            f"CREATE TABLE {name}.testapp_author "
            "(LIKE public.testapp_author INCLUDING ALL)"
        )
        yield f"SET search_path TO {name}, public", "SET search_path TO public"
        raw(f"DROP SCHEMA {name} CASCADE")
    else:
        own = connection.settings_dict["NAME"]
        name = f"ch_other_{suffix}"
        raw(f"DROP DATABASE IF EXISTS {name}")
        raw(f"CREATE DATABASE {name}")
        raw(f"CREATE TABLE {name}.testapp_author LIKE {own}.testapp_author")
        yield f"USE {name}", f"USE {own}"
        raw(f"DROP DATABASE {name}")


@not_on_sqlite
def test_a_connection_that_switched_namespace_is_not_served_the_others_rows(
    cached, other_namespace
):
    switch, back = other_namespace
    Author.objects.create(name="in the default namespace")
    assert Author.objects.cache().count() == 1
    raw(switch)
    try:
        assert Author.objects.count() == 0  # the other namespace's table: empty
        tenant = Author.objects.cache().count()
        # Another connection, still in the default namespace, meanwhile.
        default = in_another_thread(lambda: Author.objects.cache().count())
    finally:
        raw(back)
    assert (tenant, default) == (0, 1), (
        f"one namespace's rows answered the other's: {cached.take()}"
    )


@pytest.fixture
def restricted_user():
    """A database user that may read testapp_publisher but not testapp_author."""
    suffix = os.environ.get("TOX_ENV_NAME", "local").replace("-", "_")
    user = f"ch_reader_{suffix}"
    if VENDOR == "postgresql":
        raw(f"DROP ROLE IF EXISTS {user}")
        raw(f"CREATE ROLE {user} LOGIN")
        raw(f"GRANT SELECT ON testapp_publisher TO {user}")
        yield user
        for conn in connections.all():
            conn.close()
        raw(f"DROP OWNED BY {user}")
        raw(f"DROP ROLE {user}")
    else:
        db = connection.settings_dict["NAME"]
        raw(f"DROP USER IF EXISTS '{user}'@'%%'")
        raw(f"CREATE USER '{user}'@'%%'")
        raw(f"GRANT SELECT ON {db}.testapp_publisher TO '{user}'@'%%'")
        yield user
        raw(f"DROP USER '{user}'@'%%'")


@not_on_sqlite
def test_an_alias_whose_user_may_not_read_a_table_is_not_served_its_rows(
    cached, restricted_user
):
    Author.objects.create(name="secret")
    with alias("restricted", USER=restricted_user) as name:
        assert Publisher.objects.using(name).count() == 0  # it connects, and reads
        assert denied_or(lambda: Author.objects.using(name).count()) == "denied"
        assert Author.objects.cache().count() == 1  # the privileged alias keeps it
        cached.take()
        answer = denied_or(lambda: Author.objects.using(name).cache().count())
    assert answer == "denied", f"the restricted user was served {answer!r}"


@not_on_sqlite
def test_a_snapshot_transaction_is_not_answered_rows_newer_than_its_snapshot(
    cached, books
):
    def count():
        return Book.objects.cache().count()

    def delete_one_and_count():
        Book.objects.filter(pk=books[0].pk).delete()
        return count()  # a miss, kept: rows of the latest commit

    assert count() == 6
    with transaction.atomic():
        raw("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert Book.objects.count() == 6  # the snapshot is taken here
        assert in_another_thread(delete_one_and_count) == 5
        plain = Book.objects.count()
        answered = count()
    assert (plain, answered) == (6, 6), f"seen: {cached.take()}"


def test_guard_aliases_with_another_time_zone_convert_the_shared_rows_themselves(
    cached,
):
    """A hit through an alias with its own TIME_ZONE gives what a database read
    through it gives: the rows are kept as the database sent them."""
    if VENDOR == "postgresql":
        pytest.skip("PostgreSQL refuses TIME_ZONE with USE_TZ (native time zones)")
    Note.objects.create(text="n")
    with alias("tokyo", TIME_ZONE="Asia/Tokyo") as name:
        fresh = list(Note.objects.using(name).values_list("stamped", flat=True))
        assert list(Note.objects.cache().values_list("stamped", flat=True)) != fresh
        cached.take()
        hit = list(Note.objects.using(name).cache().values_list("stamped", flat=True))
    assert cached.take() == ["hit"]
    assert hit == fresh


# == Stale rows after a commit =====================================================


def other_spelling():
    """The default database, spelled differently: the PORT as the string Django's
    documentation shows, or the SQLite file's path through "."."""
    conf = connections["default"].settings_dict
    if VENDOR == "sqlite":
        if connections["default"].is_in_memory_db():
            pytest.skip("an in-memory database has one spelling: its URI")
        head, tail = os.path.split(conf["NAME"])
        return {"NAME": os.path.join(head, ".", tail)}
    return {"PORT": str(conf["PORT"])}


def test_a_write_through_one_alias_invalidates_the_same_database_read_through_another(
    cached, books
):
    book = books[0]
    with alias("spelled", **other_spelling()) as name:
        assert pages_of(book.pk, using=name) == book.pages
        Book.objects.filter(pk=book.pk).update(pages=999)  # through "default"
        assert Book.objects.using(name).get(pk=book.pk).pages == 999
        cached.take()
        after = pages_of(book.pk, using=name)
    assert after == 999, f"stale: {cached.take()}"


def test_guard_two_aliases_spelled_alike_share_invalidations(cached, books):
    book = books[0]
    with alias("twin") as name:
        assert pages_of(book.pk, using=name) == book.pages
        Book.objects.filter(pk=book.pk).update(pages=999)
        assert pages_of(book.pk, using=name) == 999


@pytest.fixture
def book_view():
    raw("CREATE VIEW ch_book_pages AS SELECT id, pages FROM testapp_book")
    yield "ch_book_pages"
    raw("DROP VIEW ch_book_pages")


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Stale after commit: a read of a database VIEW (an unmanaged model on a "
    "view, a RawSQL over it) depends on the view's name only (sqltables.tables_in), "
    "and a write to the table under it bumps that table, never the view. Resolve "
    "views' base tables from the catalog (pg_depend / information_schema "
    "VIEW_TABLE_USAGE / sqlite_master) when naming the tables a read depends on, or "
    "refuse to cache and document it.",
)
def test_a_write_to_a_table_under_a_view_invalidates_a_read_of_the_view(
    cached, books, book_view
):
    Publisher.objects.create(name="P")

    def total():
        sql = f"SELECT SUM(pages) FROM {book_view}"
        qs = Publisher.objects.cache().filter(name="P")
        return qs.annotate(total=RawSQL(sql, ())).values_list("total", flat=True).get()

    before = total()
    Book.objects.filter(pk=books[0].pk).update(pages=F("pages") + 1000)
    cached.take()
    after = total()
    assert after == before + 1000, f"stale: {cached.take()}"


@pytest.fixture
def raw_tables():
    """Two tables no model knows: ch_a (id) and ch_b (id, v), one row each."""
    raw("CREATE TABLE ch_a (id integer PRIMARY KEY)")
    raw("CREATE TABLE ch_b (id integer PRIMARY KEY, v integer)")
    raw("INSERT INTO ch_a (id) VALUES (1)")
    raw("INSERT INTO ch_b (id, v) VALUES (1, 1)")
    yield
    raw("DROP TABLE ch_a")
    raw("DROP TABLE ch_b")


def sum_of_b():
    """A cached read of ch_b, named after FROM: the tables it depends on are right."""
    sql = "SELECT SUM(v) FROM ch_b"
    qs = Publisher.objects.cache().annotate(total=RawSQL(sql, ()))
    return qs.values_list("total", flat=True).get()


# Reads whose SQL names ch_b where sqltables does not look for a name.
READS_OF_B = {
    "extra_tables": lambda: (
        Publisher.objects.cache().extra(tables=["ch_b"], where=["ch_b.v > 1"]).count()
    ),
    "comma_join": lambda: (
        Publisher.objects.cache()
        .annotate(
            total=RawSQL(
                "SELECT SUM(ch_b.v) FROM ch_a, ch_b WHERE ch_a.id = ch_b.id", ()
            )
        )
        .values_list("total", flat=True)
        .get()
    ),
}


@pytest.mark.parametrize("read", list(READS_OF_B))
def test_a_read_of_a_table_in_a_from_list_is_invalidated_by_its_writes(
    cached, raw_tables, read
):
    Publisher.objects.create(name="P")
    before = READS_OF_B[read]()
    raw("UPDATE ch_b SET v = v + 10")
    cached.take()
    after = READS_OF_B[read]()
    assert after != before, f"stale: {cached.take()}"


# Writes to ch_b that sqltables.written_tables() does not see as writes of ch_b.
WRITES_OF_B = [
    pytest.param("UPDATE ONLY ch_b SET v = v + 10", marks=only_on["postgresql"]),
    pytest.param("DELETE FROM ONLY ch_b", marks=only_on["postgresql"]),
    pytest.param("UPDATE OR REPLACE ch_b SET v = v + 10", marks=only_on["sqlite"]),
    pytest.param("INSERT ch_b (id, v) VALUES (2, 10)", marks=only_on["mysql"]),
    pytest.param("REPLACE ch_b (id, v) VALUES (2, 10)", marks=only_on["mysql"]),
    pytest.param("UPDATE LOW_PRIORITY ch_b SET v = v + 10", marks=only_on["mysql"]),
    pytest.param(
        "UPDATE ch_a, ch_b SET ch_b.v = ch_b.v + 10 WHERE ch_a.id = ch_b.id",
        marks=only_on["mysql"],
    ),
]


@pytest.mark.parametrize("write", WRITES_OF_B)
def test_a_write_of_a_table_no_model_knows_spelled_with_a_modifier_invalidates(
    cached, raw_tables, write
):
    Publisher.objects.create(name="P")
    before = sum_of_b()
    raw(write)
    cached.take()
    after = sum_of_b()
    assert after != before, f"stale: {cached.take()}"


def test_guard_comments_lowercase_and_ctes_before_a_write_invalidate(cached, books):
    book = books[0]
    for n, sql in enumerate(
        [
            "/* hint */ UPDATE testapp_book SET pages = %s WHERE id = %s",
            "-- note\nupdate testapp_book set pages = %s where id = %s",
            "with x as (select 1) update testapp_book set pages = %s where id = %s",
        ][: 2 if VENDOR == "mysql" else 3]  # MariaDB has no WITH before UPDATE
    ):
        assert pages_of(book.pk) == (book.pages if n == 0 else 500 + n - 1)
        raw(sql, [500 + n, book.pk])
        assert pages_of(book.pk) == 500 + n


def test_an_atomic_block_inside_a_manual_transaction_invalidates_at_commit(
    cached, books
):
    book = books[0]
    assert pages_of(book.pk) == book.pages
    transaction.set_autocommit(False)
    try:
        with transaction.atomic():
            Book.objects.filter(pk=book.pk).update(pages=999)
        transaction.commit()
        right_after = in_another_thread(pages_of, book.pk)
        transaction.rollback()  # nothing left to roll back
    finally:
        transaction.set_autocommit(True)
    later = pages_of(book.pk)
    assert (right_after, later) == (999, 999), f"stale: {cached.take()}"


def test_a_transaction_begun_with_raw_sql_invalidates_at_its_raw_commit(cached, books):
    book = books[0]
    assert pages_of(book.pk) == book.pages
    raw("START TRANSACTION" if VENDOR == "mysql" else "BEGIN")
    try:
        raw("UPDATE testapp_book SET pages = 999 WHERE id = %s", [book.pk])
        # Another thread reads before the commit: the old row, as it should.
        assert in_another_thread(pages_of, book.pk) == book.pages
    finally:
        raw("COMMIT")
    cached.take()
    after = pages_of(book.pk)
    assert after == 999, f"stale: {cached.take()}"


# == Volatile statements ===========================================================

VOLATILE = {
    "order_by_random": lambda: Book.objects.cache().order_by("?").first(),
    "now": lambda: Note.objects.cache().annotate(now=Now()).values("now").first(),
}


@pytest.mark.parametrize("read", list(VOLATILE))
def test_a_volatile_statement_is_not_answered_from_the_cache(cached, books, read):
    Note.objects.create(text="n")
    VOLATILE[read]()
    VOLATILE[read]()
    assert "hit" not in cached.take()


# == Hangs =========================================================================


def test_a_child_forked_during_a_cached_read_does_not_wait_for_it(settings, books):
    turn_on(settings, "redis", CACHE_PREFIX=f"ch-{uuid.uuid4().hex}")
    settings.ASYNCHRORMOUS = {**settings.ASYNCHRORMOUS, "TIMEOUT": 4.0}
    book = books[0]
    entered, release = threading.Event(), threading.Event()

    def held(execute, sql, params, many, context):
        if "testapp_book" in str(sql):
            entered.set()
            assert release.wait(TIMEOUT)
        return execute(sql, params, many, context)

    def leader():
        with connection.execute_wrapper(held):
            return pages_of(book.pk)

    with concurrent.futures.ThreadPoolExecutor(1, "leader") as pool:
        first = pool.submit(closing(leader))
        assert entered.wait(TIMEOUT)
        assert cache_module._flights

        def child():
            own_connection_in_child()
            started = time.monotonic()
            pages = pages_of(book.pk)
            return f"{pages} after {time.monotonic() - started:.2f} s"

        try:
            report = in_a_forked_child(child)
        finally:
            release.set()
        assert first.result(TIMEOUT) == book.pages
    assert report.startswith(f"{book.pages} "), report
    seconds = float(report.split()[-2])
    assert seconds < 2.0, f"the child waited for its parent's read: {report}"


# Each lock of the caching code, as the test finds it.
FORK_LOCKS = {
    "cache._install_lock": lambda: cache_module._install_lock,
    "cachestore._store_lock": lambda: cachestore._store_lock,
    "Store._lock": lambda: current_store()._lock,
    "outages._lock": lambda: outages._lock,
}


@pytest.mark.parametrize("lock", FORK_LOCKS)
def test_a_child_forked_while_a_thread_holds_a_cache_lock_can_use_the_cache(
    cached, books, monkeypatch, lock
):
    """A thread holds the lock at the fork; the child, which has no such thread,
    reads through the cache and invalidates, by the paths that take the lock."""
    # As before the process's first cached read: the child installs the hook.
    monkeypatch.setattr(cache_module, "_installed", False)
    if lock == "cachestore._store_lock":  # the child makes the store
        monkeypatch.setattr(cachestore, "_store", None)
    if lock == "outages._lock":  # the child's first call to the cache ends an outage
        store = current_store()
        store._outages.failed(store.alias, ConnectionError("a test's"), outages.epoch)
    held = FORK_LOCKS[lock]()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with held:
            holding.set()
            release.wait(TIMEOUT)

    def child():
        own_connection_in_child()
        pages = pages_of(books[0].pk)
        invalidate(Book)
        return pages

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(TIMEOUT)
        report = in_a_forked_child(child, timeout=TIMEOUT)
    finally:
        release.set()
        holder.join(TIMEOUT)
    assert report == str(books[0].pages)


def test_guard_followers_of_a_leader_that_fails_read_the_database(cached, books):
    """The first reader's SELECT fails (a database error) while two others wait for
    its rows: they run the query themselves, at once, and answer."""
    book = books[0]
    connected = threading.Barrier(3, timeout=TIMEOUT)
    entered, release = threading.Event(), threading.Event()

    def failing(execute, sql, params, many, context):
        if "testapp_book" in str(sql):
            entered.set()
            assert release.wait(TIMEOUT)
            raise OperationalError("the leader's statement failed")
        return execute(sql, params, many, context)

    def leader():
        connection.ensure_connection()
        connected.wait()
        with connection.execute_wrapper(failing):
            return pages_of(book.pk)

    def follower():
        connection.ensure_connection()
        connected.wait()
        assert entered.wait(TIMEOUT)
        return pages_of(book.pk)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(closing(leader))
        followers = [pool.submit(closing(follower)) for _ in range(2)]
        for _ in range(TIMEOUT * 100):  # bounded: until both wait for the leader
            flights = list(cache_module._flights.values())
            if flights and len(flights[0]._condition._waiters) == 2:
                break
            release.wait(0.01)
        else:
            pytest.fail("the followers never waited for the leader")
        started = time.monotonic()
        release.set()
        with pytest.raises(OperationalError):
            first.result(TIMEOUT)
        assert [f.result(TIMEOUT) for f in followers] == [book.pages] * 2
        assert time.monotonic() - started < 5
    assert cache_module._flights == {}


async def test_guard_a_cancelled_awaited_read_leaves_no_flight(cached, books):
    """An awaited cached read is cancelled (asyncio.timeout) while its worker is
    between the query and the store: the flight ends with the worker's read, and a
    read after it answers at once."""
    import asyncio

    book = books[0]
    store = current_store()
    entered, release = threading.Event(), threading.Event()

    def store_then(key, generations, value, timeout, cost):
        entered.set()
        assert release.wait(TIMEOUT)
        return type(store).store(store, key, generations, value, timeout, cost)

    store.store = store_then
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await (
                    Book.objects.cache().filter(pk=book.pk).values_list("pages").aget()
                )
        assert entered.is_set()
    finally:
        release.set()
        del store.store
    for _ in range(TIMEOUT * 100):  # bounded: until the worker's read ended
        if not cache_module._flights:
            break
        await asyncio.sleep(0.01)
    assert cache_module._flights == {}
    row = await Book.objects.cache().filter(pk=book.pk).values_list("pages").aget()
    assert row == (book.pages,)


# == Other processes, and a cache that forgets =====================================


@pytest.mark.skipif(
    os.environ.get("ASYNCHRORMOUS_TEST_DB") == "sqlite-memory",
    reason="an in-memory database lives in one process",
)
def test_a_write_whose_invalidation_was_not_delivered_is_not_stale_elsewhere(
    settings, disposable_redis, monkeypatch
):
    monkeypatch.setattr(cachestore, "RETRY", 60.0)  # the pause outlasts the test
    turn_on(settings, "redis", disposable_redis.location)
    gauge = Gauge.fresh.create(name="shared", value=1)
    env = {
        **os.environ,
        "CACHE_PEER_DB": connection.settings_dict["NAME"],
        "CACHE_PEER_BACKEND": "redis",
        "CACHE_PEER_LOCATION": disposable_redis.location,
    }
    peer = subprocess.Popen(
        [sys.executable, "-m", "tests.cache_peer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=django_settings.BASE_DIR,
    )

    def ask(command):
        peer.stdin.write(command + "\n")
        peer.stdin.flush()
        return json.loads(peer.stdout.readline())

    try:
        assert ask(f"read {gauge.pk}")["value"] == 1
        assert ask(f"read {gauge.pk}") == {"value": 1, "outcome": ["hit"]}
        # One cache call of this process times out (the server hangs for a
        # moment); the server answers again at once, for everyone.
        os.kill(disposable_redis.process.pid, signal.SIGSTOP)
        try:
            assert Gauge.objects.get(pk=gauge.pk).value == 1
        finally:
            os.kill(disposable_redis.process.pid, signal.SIGCONT)
        assert ask(f"read {gauge.pk}") == {"value": 1, "outcome": ["hit"]}
        # A write commits while this process still leaves the cache alone (RETRY).
        Gauge.fresh.filter(pk=gauge.pk).update(value=2)
        assert Gauge.fresh.get(pk=gauge.pk).value == 2
        answer = ask(f"read {gauge.pk}")
    finally:
        peer.stdin.close()
        peer.wait(TIMEOUT)
        peer.stdout.close()
    assert answer["value"] == 2, f"the other process read a stale value: {answer}"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Stale after a cache restart from a snapshot (Redis RDB/AOF, or a "
    "failover to a replica that missed the last writes): entries and generations "
    "come back together, as of the snapshot, so an entry stored before a write "
    "matches the generations again. Random tokens defend against eviction, not "
    "against a consistent rollback. At least document that a persisted or "
    "replicated cache must be flushed on restart/failover; or keep an epoch that "
    "the cache cannot roll back (a process-start token checked against a "
    "server-run-id, Redis INFO run_id, in every lookup).",
)
def test_a_cache_restored_from_a_snapshot_serves_no_pre_write_rows(
    settings, books, disposable_redis
):
    turn_on(settings, "redis", disposable_redis.location)
    outcomes = recording()
    book = books[0]
    try:
        assert pages_of(book.pk) == book.pages and pages_of(book.pk) == book.pages
        assert outcomes.take() == ["miss", "hit"]
        caches["redis"]._cache.get_client(write=True).save()  # the snapshot
        Book.objects.filter(pk=book.pk).update(pages=999)
        disposable_redis.stop()
        disposable_redis.start()  # loads dump.rdb, as a restart would
        current_store()._down_until = 0.0
        after = pages_of(book.pk)
        seen = outcomes.take()
    finally:
        outcomes.stop()
    assert after == 999, f"stale after the restart: {seen}"


def test_an_unreadable_entry_is_a_miss_not_an_outage(cached, books, caplog):
    book = books[0]
    assert pages_of(book.pk) == book.pages
    store = current_store()
    backend = caches[store.alias]
    client = backend._cache.get_client(write=True)
    (entry,) = client.scan_iter(match=backend.make_key(f"{store.prefix}:r:") + "*")
    client.set(entry, b"not a pickle")  # another program wrote this key
    cached.take()
    with caplog.at_level(logging.WARNING, logger="asynchrormous"):
        assert pages_of(book.pk) == book.pages
        assert pages_of(book.pk) == book.pages
    warnings = [r.getMessage() for r in caplog.records]
    assert (warnings, cached.take()) == ([], ["miss", "hit"])


def test_guard_a_generation_another_program_overwrote_is_never_an_old_one(
    cached, books
):
    book = books[0]
    assert pages_of(book.pk) == book.pages
    store = current_store()
    generation = store.generation_key(database_id(connection), "testapp_book")
    caches[store.alias].set(generation, None)  # another program wrote this key
    Book.objects.filter(pk=book.pk).update(pages=7)
    assert pages_of(book.pk) == 7
    caches[store.alias].set(generation, 12345)
    assert pages_of(book.pk) == 7


def test_guard_a_result_too_large_for_memcached_is_read_from_the_database(
    settings, books, disposable_memcached
):
    turn_on(settings, "memcached", disposable_memcached.location)
    outcomes = recording()
    try:
        big = "x" * (1100 * 1024)

        def read():
            qs = Book.objects.cache().annotate(big=RawSQL("%s", (big,)))
            return [len(v) for v in qs.values_list("big", flat=True)]

        assert read() == [len(big)] * 6
        assert read() == [len(big)] * 6
        assert outcomes.take() == ["miss", "miss"]
        assert Book.objects.cache().count() == 6 and Book.objects.cache().count() == 6
        assert outcomes.take() == ["miss", "hit"]  # the cache still works
    finally:
        outcomes.stop()


# == The API =======================================================================


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_timeout_that_is_not_finite_is_refused(cached, bad):
    try:
        Book.objects.cache(timeout=bad)
    except ValueError:
        refused = True
    else:
        refused = False
    assert refused, f"cache(timeout={bad!r}) was accepted"


def test_guard_a_short_timeout_expires(settings, books):
    turn_on(settings, "locmem", CACHE_PREFIX=f"ch-{uuid.uuid4().hex}")
    outcomes = recording()
    try:
        assert Book.objects.cache(timeout=0.3).count() == 6
        assert Book.objects.cache(timeout=0.3).count() == 6
        assert outcomes.take() == ["miss", "hit"]
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # bounded poll until it expired
            Book.objects.cache(timeout=0.3).count()
            if outcomes.take() == ["miss"]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the entry never expired")
    finally:
        outcomes.stop()


async def test_guard_uncached_reaches_an_awaited_read_on_the_worker(cached, books):
    with cache_module.uncached():
        assert await Book.objects.cache().acount() == 6
        assert len(await Book.objects.cache().order_by("pk")) == 6
    assert cached.take() == []


async def test_guard_an_async_block_reads_its_own_write_through_the_cache(
    cached, books
):
    from asynchrormous import atomic

    book = books[0]
    qs = Book.objects.cache().filter(pk=book.pk).values_list("pages", flat=True)
    assert await qs.aget() == book.pages
    async with atomic():
        await Book.objects.filter(pk=book.pk).aupdate(pages=999)
        assert await qs.aget() == 999
    assert await qs.aget() == 999
    assert cached.take() == ["miss", "bypass", "miss"]
