"""A second hostile review of the sliced started querysets, cancel() of shared
results, the pool retired on a settings change and the cache's statement checks.

Each test shows the plain behaviour (or the documented rule) and pins the library
to it on a real database; interleavings are forced with events, every wait is
bounded.
"""

import threading
import time

import pytest
from django.db import connection

import asynchrormous
from asynchrormous import cancel
from tests.cache_helpers import closing, turn_on
from tests.helpers import occupy_a_worker
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)


def _read_elsewhere(pk):
    """The cached name of author ``pk``, read by another thread (its own
    connection, outside any transaction)."""
    names = []
    thread = threading.Thread(
        target=closing(
            lambda: names.extend(a.name for a in Author.objects.cache().filter(pk=pk))
        )
    )
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    return names


# -- cancel() of every result that shares a job ------------------------------------


def test_cancelling_every_result_of_a_shared_fetch_drops_the_fetch(
    books, one_busy_worker
):
    """``cancel(n)`` then ``cancel(qs)``: nobody is left to use the fetch, as after
    ``cancel(qs)`` alone had nobody shared it. It stayed queued and ran anyway (a
    worker and a connection held for rows nobody reads; its failure logged as
    never retrieved)."""
    qs = Book.objects.run_async().start()
    job = qs._fetch_job
    n = qs.count()
    assert cancel(n) is True
    assert cancel(qs) is True
    assert job.future.cancelled()


def test_dropping_the_last_result_a_cancelled_one_shares_drops_the_fetch(
    books, one_busy_worker
):
    """``cancel(n)``, then the started queryset itself is dropped unused: only the
    cancelled count holds the fetch, and nobody can use its rows."""
    qs = Book.objects.run_async().start()
    future = qs._fetch_job.future
    n = qs.count()
    assert cancel(n) is True
    del qs
    assert future.cancelled()
    assert n is not None


# -- shutdown() waits at most its timeout, retired pools included ------------------


def test_shutdown_waits_at_most_its_timeout_for_every_retired_pool(settings):
    """Three settings changes each retire a pool whose worker is busy: shutdown
    (timeout=1) waited one second per pool, three in all (DESIGN: ``shutdown()``
    is bounded by its timeout)."""
    release = threading.Event()
    blockers = []
    try:
        for workers in (1, 2, 3):
            settings.ASYNCHRORMOUS = {"WORKERS": workers, "TIMEOUT": 30.0}
            blockers.append(occupy_a_worker(release, timeout=20))
        started = time.monotonic()
        asynchrormous.shutdown(timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 2.5, f"shutdown(timeout=1.0) took {elapsed:.2f} s"
    assert [b.result(20) for b in blockers] == [True] * 3


# -- A transaction begun or ended with commented SQL is followed --------------------


def test_a_write_after_a_commented_commit_invalidates_the_cache(settings):
    """``BEGIN`` ... ``-- note\\nCOMMIT`` sent as SQL: the connection was still
    taken to be in that transaction, so its later (autocommitted) writes were held
    for a COMMIT that never came, and other connections read the old rows from
    the cache."""
    turn_on(settings, "locmem")
    ann = Author.objects.create(name="Ann")
    assert _read_elsewhere(ann.pk) == ["Ann"]  # cached
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("-- end of the batch\nCOMMIT")
    Author.objects.filter(pk=ann.pk).update(name="Ann 2")
    assert _read_elsewhere(ann.pk) == ["Ann 2"]


def test_rows_read_in_a_commented_begin_are_not_cached_past_its_rollback(settings):
    """``/* batch */ BEGIN``: the transaction was not seen, so a read inside it
    cached the rows it had written, and after its ROLLBACK other connections read
    those rows, which never existed."""
    turn_on(settings, "locmem")
    ann = Author.objects.create(name="Ann")
    with connection.cursor() as cursor:
        cursor.execute("/* batch */ BEGIN")
        Author.objects.filter(pk=ann.pk).update(name="rolled back")
        assert [a.name for a in Author.objects.cache().filter(pk=ann.pk)] == [
            "rolled back"
        ]
        cursor.execute("ROLLBACK")
    assert _read_elsewhere(ann.pk) == ["Ann"]


@pytest.mark.parametrize(
    ("sql", "begun"),
    [
        ("/* batch */ BEGIN", True),
        ("  -- note\n  START TRANSACTION", True),
        ("# note\nbegin", True),
        ("-- note\nCOMMIT", False),
        ("/* a */ /* b */ ROLLBACK", False),
    ],
)
def test_a_comment_before_begin_or_commit_does_not_hide_it(settings, sql, begun):
    from asynchrormous import invalidation
    from asynchrormous.cachestore import current_store

    turn_on(settings, "locmem")
    vars(connection)["_asynchrormous_begun"] = not begun
    try:
        assert invalidation._raw_transaction(connection, current_store(), sql)
        assert vars(connection).get("_asynchrormous_begun", False) is begun
    finally:
        vars(connection).pop("_asynchrormous_begun", None)


def test_a_comment_before_set_does_not_hide_a_session_change():
    from asynchrormous.sqltables import changes_the_session

    assert changes_the_session("/* app */ SET search_path TO other")
    assert changes_the_session("-- app\nUSE other")
    assert not changes_the_session("/* SET x */ SELECT 1")
