"""Caching under concurrency: no stale result is reachable once a write committed.

Each interleaving is forced with events inside the statements themselves (an
execute wrapper of the thread that must wait), never with sleeps.
"""

import concurrent.futures
import contextlib
import json
import os
import random
import subprocess
import sys
import threading

import pytest
from django.conf import settings as django_settings
from django.core.cache import caches
from django.db import connection, transaction
from django.db.models import F

from asynchrormous import cache as caching_module
from asynchrormous.cache import invalidate
from asynchrormous.cachestore import current_store, database_id
from tests.cache_helpers import closing, recording, slow_values, turn_on
from tests.testapp.models import Book, Gauge

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


def is_select(sql):
    return str(sql).lstrip().upper().startswith("SELECT")


@contextlib.contextmanager
def held_before_storing(thread_name, read_done, go_on):
    """The cached read of thread ``thread_name`` has its rows from the database
    and is about to keep them: it waits there for ``go_on``."""
    store = current_store()

    def store_then(key, generations, value, timeout, cost):
        if threading.current_thread().name == thread_name:
            read_done.set()
            assert go_on.wait(TIMEOUT)
        return type(store).store(store, key, generations, value, timeout, cost)

    store.store = store_then
    try:
        yield
    finally:
        del store.store


def pages_of(pk):
    return Book.objects.cache().filter(pk=pk).values_list("pages", flat=True).get()


@pytest.mark.parametrize("in_atomic", [False, True], ids=["autocommit", "atomic"])
def test_rows_read_before_a_commit_and_stored_after_it_are_never_served(
    books, caching, in_atomic
):
    """The reader snapshots the generations and reads the old row; the writer
    commits (and invalidates); only then does the reader store the old row. It
    was stored under the old generations, so nobody is served it."""
    book = books[0]
    read_done, go_on = threading.Event(), threading.Event()
    with (
        concurrent.futures.ThreadPoolExecutor(1, "reader") as pool,
        held_before_storing("reader_0", read_done, go_on),
    ):
        old = pool.submit(closing(pages_of), book.pk)
        assert read_done.wait(TIMEOUT)
        if in_atomic:
            with transaction.atomic():
                Book.objects.filter(pk=book.pk).update(pages=999)
        else:
            Book.objects.filter(pk=book.pk).update(pages=999)
        go_on.set()
        assert old.result(TIMEOUT) == book.pages  # read before the commit
    assert caching.take() == ["miss"]
    assert pages_of(book.pk) == 999
    assert caching.take() == ["miss"]
    assert pages_of(book.pk) == 999
    assert caching.take() == ["hit"]


def test_a_write_on_another_thread_is_seen_once_its_commit_returned(books, caching):
    book = books[0]
    assert pages_of(book.pk) == book.pages
    committed = threading.Event()

    def writer():
        with transaction.atomic():
            Book.objects.filter(pk=book.pk).update(pages=F("pages") + 1)
            assert pages_of(book.pk) == book.pages + 1  # its own write
        committed.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(closing(writer)).result(TIMEOUT)
    assert committed.is_set()
    assert pages_of(book.pk) == book.pages + 1
    assert caching.take() == ["miss", "bypass", "miss"]


def test_an_evicted_generation_comes_back_new_never_as_an_old_one(books, caching):
    """A write replaced the table's generation, then the cache evicted it: the
    generation made anew must not be the one the stale entry carries."""
    book = books[0]
    assert pages_of(book.pk) == book.pages
    Book.objects.filter(pk=book.pk).update(pages=7)
    store = current_store()
    caches[store.alias].delete(
        store.generation_key(database_id(connection), "testapp_book")
    )
    assert pages_of(book.pk) == 7
    assert caching.take() == ["miss", "miss"]


def test_concurrent_misses_of_one_query_run_it_once(books, caching):
    """Six threads ask for the same rows; the first one's SELECT is held until
    the other five wait for it. One SELECT reaches the database."""
    book = books[0]
    release = threading.Event()
    selects = []
    lock = threading.Lock()

    def counting(execute, sql, params, many, context):
        # Only the book query: a new MariaDB connection asks for its version first.
        if is_select(sql) and "testapp_book" in sql:
            with lock:
                selects.append(threading.current_thread().name)
            assert release.wait(TIMEOUT)
        return execute(sql, params, many, context)

    def reader():
        with connection.execute_wrapper(counting):
            return pages_of(book.pk)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(closing(reader)) for _ in range(6)]
        waiting = threading.Event()
        for _ in range(TIMEOUT * 100):  # bounded: until five followers wait
            flights = list(caching_module._flights.values())
            if flights and len(flights[0]._condition._waiters) == 5:
                break
            waiting.wait(0.01)
        else:
            pytest.fail("the five followers never waited for the first reader")
        release.set()
        assert [a.result(TIMEOUT) for a in answers] == [book.pages] * 6
    assert len(selects) == 1
    assert selects[0] != threading.current_thread().name


@pytest.mark.skipif(
    os.environ.get("ASYNCHRORMOUS_TEST_DB") == "sqlite-memory",
    reason="a shared-cache in-memory SQLite database refuses concurrent writers "
    "('database table is locked', with no busy timeout), cached or not",
)
@pytest.mark.parametrize("rounds", [300])
def test_randomised_readers_and_writers_never_read_a_stale_value(caching, rounds):
    """Writers raise a counter by one, each knowing the value it wrote: a
    compare-and-set in autocommit, or in atomic() under a row lock (with a
    savepoint rolled back, sometimes), and publish it once the write returned.
    A reader that starts afterwards must never see less: zero stale reads."""
    gauge = Gauge.fresh.create(name="counter", value=0)
    published = [0]
    lock = threading.Lock()
    stale = []
    done = threading.Event()

    def publish(value):
        with lock:
            published[0] = max(published[0], value)

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(rounds // 3):
            how = rng.choice(["autocommit", "atomic", "rolled back"])
            if how == "autocommit":
                current = Gauge.fresh.get(pk=gauge.pk).value
                rows = Gauge.fresh.filter(pk=gauge.pk, value=current).update(
                    value=current + 1
                )
                if rows:
                    publish(current + 1)
                continue
            with transaction.atomic():
                current = Gauge.fresh.select_for_update().get(pk=gauge.pk).value
                Gauge.fresh.filter(pk=gauge.pk).update(value=current + 1)
                if how == "rolled back":
                    try:
                        with transaction.atomic():
                            Gauge.fresh.filter(pk=gauge.pk).update(value=0)
                            raise ValueError
                    except ValueError:
                        pass
            publish(current + 1)

    def reader(seed):
        rng = random.Random(seed)
        reads = 0
        while not done.is_set() or reads < rounds // 3:
            with lock:
                floor = published[0]
            how = rng.choice(["get", "values", "count"])
            if how == "get":
                value = Gauge.objects.get(pk=gauge.pk).value
            elif how == "values":
                value = Gauge.objects.filter(pk=gauge.pk).values_list("value")[0][0]
            else:
                value = floor if Gauge.objects.filter(value__gte=floor).count() else -1
            if value < floor:
                stale.append((how, value, floor))
            reads += 1
        return reads

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        writers = [pool.submit(closing(writer), seed) for seed in (1, 2)]
        readers = [pool.submit(closing(reader), seed) for seed in (3, 4, 5)]
        for w in writers:
            w.result(TIMEOUT * 12)
        done.set()
        reads = sum(r.result(TIMEOUT * 12) for r in readers)
    assert stale == []
    assert reads >= rounds and published[0] > rounds // 3
    outcomes = caching.take()
    assert "hit" in outcomes and "miss" in outcomes


class Peer:
    """Another process on the test's database and cache (tests/cache_peer.py)."""

    def __init__(self, backend):
        env = {
            **os.environ,
            "CACHE_PEER_DB": connection.settings_dict["NAME"],
            "CACHE_PEER_BACKEND": backend,
            "CACHE_PEER_LOCATION": django_settings.CACHES[backend]["LOCATION"],
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cache_peer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=django_settings.BASE_DIR,
        )

    def send(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self):
        return json.loads(self.process.stdout.readline())

    def ask(self, command):
        self.send(command)
        return self.answer()

    def close(self):
        self.process.stdin.close()
        self.process.wait(TIMEOUT)
        self.process.stdout.close()


in_one_process_only = pytest.mark.skipif(
    os.environ.get("ASYNCHRORMOUS_TEST_DB") == "sqlite-memory",
    reason="an in-memory database lives in one process",
)


@in_one_process_only
@pytest.mark.parametrize("backend", ["redis", "memcached"])
def test_a_slow_query_missed_by_two_processes_at_once_runs_once(settings, backend):
    """The query took 0.3 s when it was last kept; this process is running it
    again (it holds the cache's lock) when another process misses it too: that
    one waits for the rows, and sends no statement."""
    turn_on(settings, backend)
    gauge = Gauge.fresh.create(name="slow", value=5)
    slow = f"slow {gauge.pk} 0.3"
    assert slow_values(gauge.pk, 0.3) == [5]  # kept, with what it cost
    invalidate(Gauge)
    executing = threading.Event()

    def marking(execute, sql, params, many, context):
        executing.set()
        return execute(sql, params, many, context)

    def leader():
        with connection.execute_wrapper(marking):
            return slow_values(gauge.pk, 0.3)

    peer = Peer(backend)
    try:
        assert peer.ask("ping") == {"pong": True}  # set up, before the leader runs
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(closing(leader))
            assert executing.wait(TIMEOUT)
            answer = peer.ask(slow)
            assert running.result(TIMEOUT) == [5]
    finally:
        peer.close()
    assert answer == {"value": [5], "outcome": ["hit"], "selects": 0}


@in_one_process_only
@pytest.mark.parametrize("backend", ["redis", "memcached"])
def test_two_processes_sharing_a_cache_see_each_others_invalidations(settings, backend):
    turn_on(settings, backend)
    outcomes = recording()
    gauge = Gauge.fresh.create(name="shared", value=1)
    peer = Peer(backend)
    ask = peer.ask
    try:
        assert Gauge.objects.get(pk=gauge.pk).value == 1  # this process caches it
        assert ask(f"read {gauge.pk}") == {"value": 1, "outcome": ["hit"]}
        assert ask(f"write {gauge.pk} 2") == {"written": 1}  # the peer writes
        assert Gauge.objects.get(pk=gauge.pk).value == 2
        assert ask(f"read {gauge.pk}") == {"value": 2, "outcome": ["hit"]}
        Gauge.fresh.filter(pk=gauge.pk).update(value=3)  # this process writes
        assert ask(f"read {gauge.pk}") == {"value": 3, "outcome": ["miss"]}
    finally:
        peer.close()
        outcomes.stop()
    assert outcomes.take() == ["miss", "miss"]
