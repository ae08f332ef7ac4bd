"""A cache server that stops, or stops answering, costs cached reads nothing but
their speed: they read the database, one warning is logged per outage, writes never
fail, and an invalidation that could not be delivered is delivered before the
process reads that table from the cache again."""

import concurrent.futures
import logging
import os
import signal
import threading

import pytest
from django.db import transaction

from asynchrormous.cachestore import current_store
from tests.cache_helpers import closing, recording, turn_on
from tests.cache_servers import memcached_fixture, redis_fixture  # noqa: F401
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


@pytest.fixture(params=["redis", "memcached"])
def server(request, settings):
    """A disposable cache server of the test's own, with caching turned on in it."""
    disposable = request.getfixturevalue(f"disposable_{request.param}")
    turn_on(settings, request.param, disposable.location)
    return disposable


@pytest.fixture
def outcomes():
    recorded = recording()
    yield recorded
    recorded.stop()


def count():
    return Book.objects.cache().count()


def paused(server):
    """SIGSTOP the server, and return once it is stopped (kill() only queues it)."""
    os.kill(server.process.pid, signal.SIGSTOP)
    stat = f"/proc/{server.process.pid}/stat"
    for _ in range(TIMEOUT * 100):  # bounded: until the kernel has stopped it
        with open(stat) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        threading.Event().wait(0.01)
    pytest.fail(f"{server.name} did not stop")


def retry_now():
    """As if the store's pause after a failed call (RETRY) had passed."""
    current_store()._down_until = 0.0


def test_a_stopped_server_is_one_warning_and_reads_from_the_database(
    books, server, outcomes, caplog
):
    assert count() == 6 and count() == 6
    assert outcomes.take() == ["miss", "hit"]
    server.stop()
    with caplog.at_level(logging.DEBUG, logger="asynchrormous"):
        for expected in (6, 5, 4):
            assert count() == expected
            Book.objects.filter(pk=Book.objects.order_by("pk")[0].pk).delete()
            retry_now()
    # The first read finds the server gone; the next ones owe it an invalidation.
    assert outcomes.take() == ["miss", "bypass", "bypass"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    caplog.clear()
    server.start()
    retry_now()
    with caplog.at_level(logging.INFO, logger="asynchrormous"):
        assert count() == 3 and count() == 3
    assert outcomes.take() == ["miss", "hit"]
    (back,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert "answers again" in back.getMessage()


def test_a_call_that_fails_after_the_recovery_it_began_before_is_no_new_outage(
    books, server, caplog
):
    """As for a database (test_outage_logging.py): a cache call under way while the
    cache came back, which fails after, is a failure of the outage that ended."""
    store = current_store()
    entered, release = threading.Event(), threading.Event()

    def late():
        if threading.current_thread().name.startswith("late") and not entered.is_set():
            entered.set()
            release.wait(TIMEOUT)
            raise ConnectionError("an answer from before the recovery")
        return type(store)._cache(store)

    store._cache = late
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="asynchrormous"),
            concurrent.futures.ThreadPoolExecutor(1, "late") as pool,
        ):
            first = pool.submit(closing(count))
            assert entered.wait(TIMEOUT)
            server.stop()
            assert count() == 6  # the outage begins
            server.start()
            retry_now()
            assert count() == 6  # and ends
            release.set()
            assert first.result(TIMEOUT) == 6
    finally:
        release.set()
        del store._cache
    levels = [r.levelno for r in caplog.records if r.name == "asynchrormous"]
    assert levels.count(logging.WARNING) == 1
    assert levels.count(logging.INFO) == 1


@pytest.mark.parametrize("in_atomic", [False, True], ids=["autocommit", "atomic"])
def test_an_invalidation_that_could_not_be_delivered_is_delivered_before_a_read(
    books, server, outcomes, in_atomic
):
    """The server hangs (SIGSTOP) while a write commits: its invalidation cannot
    be delivered, and the cached count survives in the server's memory. Once the
    server answers again, this process delivers the invalidation before it reads
    the table from the cache: never the stale count."""
    assert count() == 6 and count() == 6
    paused(server)
    try:
        if in_atomic:
            with transaction.atomic():
                Book.objects.filter(pk=books[0].pk).delete()
        else:
            Book.objects.filter(pk=books[0].pk).delete()  # does not fail
        assert count() == 5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    retry_now()
    assert count() == 5 and count() == 5
    assert outcomes.take() == ["miss", "hit", "bypass", "miss", "hit"]


def test_a_hanging_server_holds_a_read_for_its_socket_timeout_only(
    books, server, outcomes
):
    paused(server)
    try:
        assert count() == 6  # the client's 0.5 s timeout, then the database
        assert count() == 6  # no call at all until RETRY has passed
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert outcomes.take() == ["miss", "miss"]
