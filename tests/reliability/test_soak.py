"""Soak: thousands of background queries from many threads and an event loop at once.

Sixteen submitter threads (``start()``, lazy ``count()``/``get()``/``exists()``,
``update()`` followed by a read of the written row) and one asyncio loop with eight
concurrent lanes (``await qs``, ``acount()``, ``aget()``, ``aaggregate()``,
``asave()`` and a read back, ``acreate()``) run against known rows. Every result is
checked, every wait is bounded, and a sampler thread with its own connection reads
the server's list of this process's sessions and the process's resident memory
throughout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

import asynchrormous
from asynchrormous import resolve
from tests.reliability.conftest import scaled
from tests.reliability.probes import Sampler, ServerSessions, error_counts
from tests.testapp.apps import BACKEND_THREADS
from tests.testapp.models import AuditEntry, Author, Book

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor not in ("postgresql", "mysql"),
        reason="counts server sessions: PostgreSQL and MariaDB",
    ),
]

WORKERS = 8
SUBMITTERS = 16
LANES = 8  # concurrent coroutines on the event loop
WAIT = 30.0  # the bound on every wait, and the pool's TIMEOUT
QUERIES = scaled(1_000, 10_000)
# A fifth of the queries come from the event loop, the rest from the threads.
PER_LANE = QUERIES // 5 // LANES
PER_THREAD = (QUERIES - PER_LANE * LANES) // SUBMITTERS
# Resident memory may grow by at most this over the run's second half: a leak of one
# result (a few hundred bytes) per query would take ~2 MB there at full scale. The
# short run's few samples are noisier.
RSS_GROWTH_LIMIT = scaled(8, 4) * 1024 * 1024


class Known:
    """The rows the scenario reads, and what every query must answer."""

    def __init__(self) -> None:
        authors = [Author.objects.create(name=f"Author {a}") for a in range(4)]
        owner = Author.objects.create(name="Owner")
        self.books = [
            Book.objects.create(
                title=f"Cat {i}",
                author=authors[i % 4],
                year=1990 + i % 10,
                pages=100 + i,
            )
            for i in range(40)
        ]
        self.authors = [a.pk for a in authors]
        self.by_author = {
            a.pk: [b.pk for b in self.books if b.author_id == a.pk] for a in authors
        }
        self.count_from = {
            y: sum(b.year >= y for b in self.books) for y in range(1990, 2000)
        }
        self.titles = {b.pk: b.title for b in self.books}
        self.pages_total = sum(b.pages for b in self.books)
        # One row per writer, written by it alone (year 1980: outside every count).
        self.own = [
            Book.objects.create(title=f"Own {w}", author=owner, year=1980, pages=0)
            for w in range(SUBMITTERS + LANES)
        ]


def check(found: Any, expected: Any) -> None:
    if found != expected:
        raise AssertionError(f"expected {expected!r}, got {found!r}")


def submitter(t: int, known: Known, done: list[int], errors: list[Exception]) -> None:
    own = known.own[t].pk
    pks = [b.pk for b in known.books]
    pending_update = None
    try:
        for i in range(PER_THREAD):
            step, pk = i % 5, pks[(t * 7 + i) % len(pks)]
            author = known.authors[(t + i) % 4]
            year = 1990 + (t + i) % 10
            try:
                if step == 0:
                    qs = Book.objects.filter(author_id=author).order_by("pk").start()
                    check([b.pk for b in resolve(qs, WAIT)], known.by_author[author])
                elif step == 1:
                    n = Book.objects.filter(year__gte=year).run_async().count()
                    check(resolve(n, WAIT), known.count_from[year])
                elif step == 2:
                    book = Book.objects.run_async().get(pk=pk)
                    check(resolve(book, WAIT).title, known.titles[pk])
                elif step == 3:
                    # Not waited for: the next read of the row must come after it.
                    pending_update = (
                        Book.objects.filter(pk=own).run_async().update(pages=i)
                    )
                else:
                    pages = (
                        Book.objects.filter(pk=own)
                        .values_list("pages", flat=True)
                        .run_async()
                        .get()
                    )
                    check(resolve(pages, WAIT), i - 1)
                    check(resolve(pending_update, WAIT), 1)
            except Exception as exc:
                errors.append(exc)
            done[t] += 1
    finally:
        connection.close()


async def lane(
    n: int, known: Known, done: list[int], errors: list[Exception], created: list[int]
) -> None:
    slot = SUBMITTERS + n
    own = known.own[slot]
    pks = [b.pk for b in known.books]
    for i in range(PER_LANE):
        step, pk = i % 7, pks[(n * 11 + i) % len(pks)]
        author = known.authors[(n + i) % 4]
        year = 1990 + (n + i) % 10
        try:
            async with asyncio.timeout(WAIT):
                if step == 0:
                    rows = await Book.objects.filter(author_id=author).order_by("pk")
                    check([b.pk for b in rows], known.by_author[author])
                elif step == 1:
                    check(
                        await Book.objects.filter(year__gte=year).acount(),
                        known.count_from[year],
                    )
                elif step == 2:
                    check((await Book.objects.aget(pk=pk)).title, known.titles[pk])
                elif step == 3:
                    own.pages = i
                    await own.asave(update_fields=["pages"])
                elif step == 4:
                    pages = Book.objects.filter(pk=own.pk).values_list(
                        "pages", flat=True
                    )
                    check(await pages.aget(), i - 1)
                elif step == 5:
                    total = await Book.objects.filter(
                        title__startswith="Cat"
                    ).aaggregate(Sum("pages"))
                    check(total, {"pages__sum": known.pages_total})
                else:
                    await AuditEntry.objects.acreate(action=f"lane {n} step {i}")
                    created[n] += 1
        except Exception as exc:
            errors.append(exc)
        done[slot] += 1


def event_loop(
    known: Known, done: list[int], errors: list[Exception], created: list[int]
) -> None:
    async def main() -> None:
        await asyncio.gather(
            *(lane(n, known, done, errors, created) for n in range(LANES))
        )

    try:
        asyncio.run(main())
    finally:
        connection.close()


@pytest.mark.timeout(scaled(120, 900))
def test_soak(settings, figures):
    settings.ASYNCHRORMOUS = {"WORKERS": WORKERS, "TIMEOUT": WAIT}
    known = Known()
    errors: list[Exception] = []
    done = [0] * (SUBMITTERS + LANES)
    created = [0] * LANES
    server = ServerSessions()
    baseline = {pid for pid, _ in server.now()}
    opened_before = set(BACKEND_THREADS)
    threads = [
        threading.Thread(
            target=submitter, args=(t, known, done, errors), name=f"submitter-{t}"
        )
        for t in range(SUBMITTERS)
    ]
    threads.append(
        threading.Thread(
            target=event_loop, args=(known, done, errors, created), name="asyncio-loop"
        )
    )
    start = time.monotonic()
    with Sampler(progress=lambda: sum(done), interval=0.01) as sampler:
        for thread in threads:
            thread.start()
        deadline = start + scaled(100, 800)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    duration = time.monotonic() - start
    hung = [t.name for t in threads if t.is_alive()]
    sessions = sampler.max_by_kind()
    stopping = time.monotonic()
    asynchrormous.shutdown(timeout=WAIT)
    stopped = time.monotonic() - stopping
    back, after = server.wait_until(
        lambda rows: {pid for pid, _ in rows} <= baseline, timeout=10
    )
    server.close()
    growth, fitted = sampler.rss_slope()
    # Every Django connection the run opened, from connection_created: those of
    # the workers, however short-lived (the sampler could miss one).
    opened = [
        pid
        for pid, thread in list(BACKEND_THREADS.items())
        if pid not in opened_before and thread.startswith("asynchrormous-")
    ]
    rss = [s[2] for s in sampler.samples]
    figures.update(
        {
            "queries": sum(done),
            "threads": SUBMITTERS,
            "event_loop_lanes": LANES,
            "duration_s": round(duration, 1),
            "queries_per_second": round(sum(done) / duration),
            "errors": error_counts(errors),
            "hung_callers": len(hung),
            "workers": WORKERS,
            "max_worker_sessions": sessions["worker"],
            "max_caller_sessions": sessions["caller"],
            "max_other_sessions": sessions["other"],
            "max_sessions": sessions["total"],
            "distinct_worker_sessions_seen": sampler.distinct("worker"),
            "worker_connections_opened": len(opened),
            "baseline_sessions": len(baseline),
            "shutdown_s": round(stopped, 3),
            "back_to_baseline_after_shutdown_s": round(after, 2),
            "rss_start_mb": round(rss[0] / 2**20, 1),
            "rss_end_mb": round(rss[-1] / 2**20, 1),
            "rss_slope_per_1000_queries_kb": round(growth * 1000 / 1024, 1),
            "rss_samples": fitted,
        }
    )
    assert not sampler.errors, sampler.errors
    assert not hung, f"callers still waiting after the deadline: {hung}"
    assert not errors, [repr(e) for e in errors[:5]]
    assert sum(done) == PER_THREAD * SUBMITTERS + PER_LANE * LANES
    # Every write landed: the last value of each writer's row, every created entry.
    pages = dict(
        Book.objects.filter(title__startswith="Own").values_list("pk", "pages")
    )
    last_update = max(i for i in range(PER_THREAD) if i % 5 == 3)
    last_save = max(i for i in range(PER_LANE) if i % 7 == 3)
    assert [pages[b.pk] for b in known.own] == [last_update] * SUBMITTERS + [
        last_save
    ] * LANES
    assert AuditEntry.objects.count() == sum(created)
    # The pool's sessions: never more than WORKERS. A caller's own connection (the
    # submitters compile and open transactions on theirs, the test's thread made the
    # rows) is counted apart; "other" is MariaDB's short KILL QUERY sessions.
    assert sessions["worker"] <= WORKERS, sessions
    # No worker opened a second connection: never more than WORKERS, none replaced.
    assert len(opened) <= WORKERS, figures
    assert sessions["caller"] <= SUBMITTERS + 2, sessions
    assert back, "the workers' sessions outlived shutdown()"
    assert stopped < WAIT
    assert growth * (sum(done) / 2) < RSS_GROWTH_LIMIT, figures
