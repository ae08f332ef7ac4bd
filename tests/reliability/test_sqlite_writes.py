"""SQLite: eight threads of background writes and reads on one file database.

With the README's recommended OPTIONS (a busy ``timeout``, ``transaction_mode``
IMMEDIATE, WAL), background writes from many threads wait for each other instead
of failing with "database is locked": not one may fail, every committed row must
be there, and each thread reads its own writes.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from django.db import connection

from asynchrormous import resolve
from tests.reliability.conftest import scaled
from tests.reliability.probes import error_counts
from tests.testapp.models import AuditEntry, Author, Book

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "sqlite"
        or connection.settings_dict["TEST"].get("NAME") is None,
        reason="SQLite file database",
    ),
]

THREADS = 8
ROUNDS = scaled(50, 500)  # per thread; each round is three writes and a read
WAIT = 30.0


def writer(t, author_id, errors, calls):
    prefix = f"t{t}-"
    pending = []
    try:
        for i in range(ROUNDS):
            try:
                # Not waited for: the thread's later reads must see them.
                pending.append(
                    Book.objects.run_async().create(
                        title=f"{prefix}{i}", author_id=author_id, pages=i
                    )
                )
                pending.append(
                    Book.objects.filter(title__startswith=prefix)
                    .run_async()
                    .update(year=2000 + i)
                )
                AuditEntry.objects.run_async().create(action=f"{prefix}{i}")
                mine = Book.objects.filter(title__startswith=prefix, year=2000 + i)
                assert resolve(mine.run_async().count(), WAIT) == i + 1
                calls[t] += 4
            except Exception as exc:
                errors.append(exc)
        for lazy in pending:
            try:
                resolve(lazy, WAIT)
            except Exception as exc:
                errors.append(exc)
    finally:
        connection.close()


@pytest.mark.timeout(scaled(120, 600))
def test_sqlite_background_writes(settings, figures, caplog):
    settings.ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": WAIT}
    options = connection.settings_dict["OPTIONS"]
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
    author = Author.objects.create(name="Writer")
    errors: list[Exception] = []
    calls = [0] * THREADS
    threads = [
        threading.Thread(target=writer, args=(t, author.pk, errors, calls))
        for t in range(THREADS)
    ]
    caplog.set_level(logging.ERROR, logger="asynchrormous")
    start = time.monotonic()
    for thread in threads:
        thread.start()
    deadline = start + scaled(100, 550)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    duration = time.monotonic() - start
    hung = [t.name for t in threads if t.is_alive()]
    locked = [e for e in errors if "locked" in str(e)]
    logged = [r for r in caplog.records if r.name == "asynchrormous"]
    titles = set(Book.objects.values_list("title", flat=True))
    expected = {f"t{t}-{i}" for t in range(THREADS) for i in range(ROUNDS)}
    entries = AuditEntry.objects.count()
    figures.update(
        {
            "threads": THREADS,
            "background_calls": sum(calls),
            "writes": THREADS * ROUNDS * 3,
            "duration_s": round(duration, 1),
            "errors": error_counts(errors),
            "database_is_locked": len(locked),
            "logged_errors": len(logged),
            "rows_missing": len(expected - titles) + THREADS * ROUNDS - entries,
            "journal_mode": journal,
            "busy_timeout_s": options.get("timeout"),
            "transaction_mode": options.get("transaction_mode"),
        }
    )
    assert journal == "wal"
    assert not hung, hung
    assert not errors, [repr(e) for e in errors[:5]]
    assert not logged, [r.getMessage() for r in logged[:5]]
    assert titles == expected
    assert entries == THREADS * ROUNDS
    assert set(Book.objects.values_list("year", flat=True)) == {2000 + ROUNDS - 1}
