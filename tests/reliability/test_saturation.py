"""Saturation: far more callers than workers, jobs that wait on other jobs.

Fifty submitter threads share one or two workers. Each makes background writes,
reads, and jobs that themselves wait on background results (a ``Prefetch`` of a
background queryset, and a job that resolves lazy results): with every worker
busy, such nested work must run inline, or the pool deadlocks. Meanwhile the
test's own thread polls a long statement with ``resolve(x, timeout=1)``: the
``ResultTimeout`` must come on time, and the statement go on and run once. A
second scenario proves that ``override_settings(ASYNCHRORMOUS=...)`` resizes
the pool, by the worker threads and server sessions that jobs report.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from django.db import connection
from django.db.models import Prefetch

from asynchrormous import ResultTimeout, is_ready, resolve
from asynchrormous.results import submit
from asynchrormous.signals import job_finished
from tests.helpers import backend_id_expr, sleep_expr
from tests.reliability.conftest import scaled
from tests.reliability.probes import Sampler, ServerSessions, error_counts
from tests.testapp.models import AuditEntry, Author, Book

pytestmark = pytest.mark.django_db(transaction=True)

SUBMITTERS = 50
ROUNDS = scaled(4, 20)  # per submitter; each round is four background calls
WAIT = 30.0
POLLS = scaled(3, 5)  # timed-out resolve() calls on a long statement
LONG = 1.5  # seconds that statement takes, once it runs


def nested_job(pks: list[int]) -> tuple[int, list[int]]:
    """A job that waits on background results of its own."""
    n = Book.objects.run_async().count()
    rows = Book.objects.order_by("pk").start()
    return resolve(n, WAIT), [b.pk for b in resolve(rows, WAIT)]


def submitter(t, books, errors):
    pks = [b.pk for b in books]
    by_author = {}
    for b in books:
        by_author.setdefault(b.author_id, []).append(b.pk)
    try:
        for k in range(ROUNDS):
            try:
                # Fire and forget: the writes must land, in this thread's order.
                AuditEntry.objects.run_async().create(action=f"s{t}-{k}")
                authors = (
                    Author.objects.order_by("pk")
                    .prefetch_related(
                        Prefetch(
                            "books", queryset=Book.objects.order_by("pk").run_async()
                        )
                    )
                    .start()
                )
                job = submit(
                    nested_job, pks, alias="default", writes=False, description="nest"
                )
                n = Book.objects.run_async().count()
                found = {a.pk: [b.pk for b in a.books.all()] for a in resolve(authors)}
                assert found == by_author, found
                assert job.result(WAIT) == (len(pks), pks)
                assert resolve(n, WAIT) == len(pks)
            except Exception as exc:
                errors.append(exc)
        # The last write, read back by this thread: its own writes come first.
        assert AuditEntry.objects.filter(action=f"s{t}-{ROUNDS - 1}").exists()
    except Exception as exc:
        errors.append(exc)
    finally:
        connection.close()


class LongStatements:
    """Counts the runs of statements that sleep (only the long one here)."""

    def __init__(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()

    def __call__(self, *, sql, **kwargs):
        if any("sleep" in s.lower() for s in sql):
            with self.lock:
                self.runs += 1


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.timeout(scaled(120, 300))
def test_saturation(workers, books, settings, figures):
    settings.ASYNCHRORMOUS = {"WORKERS": workers, "TIMEOUT": WAIT}
    errors: list[Exception] = []
    threads = [
        threading.Thread(
            target=submitter, args=(t, books, errors), name=f"submitter-{t}"
        )
        for t in range(SUBMITTERS)
    ]
    long_runs = LongStatements()
    job_finished.connect(long_runs, weak=False)
    late, polled = [], []
    start = time.monotonic()
    sampler = Sampler(progress=lambda: 0, sessions=connection.vendor != "sqlite")
    sampler.__enter__()
    try:
        for thread in threads:
            thread.start()
        # While the submitters saturate the pool: a long statement, polled.
        for i in range(POLLS):
            slow = (
                Book.objects.filter(pk=books[i].pk)
                .annotate(z=sleep_expr(LONG))
                .values_list("pk", "z")
                .run_async()
                .get()
            )
            asked = time.monotonic()
            with pytest.raises(ResultTimeout):
                resolve(slow, timeout=1)
            late.append(time.monotonic() - asked - 1)
            polled.append(not is_ready(slow))  # a timeout is not a cancellation
            assert resolve(slow, WAIT)[0] == books[i].pk
        deadline = time.monotonic() + scaled(100, 280)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        job_finished.disconnect(long_runs)
        sampler.__exit__()
    duration = time.monotonic() - start
    sessions = sampler.max_by_kind()
    hung = [t.name for t in threads if t.is_alive()]
    # Each submitter's entries, in the order they landed (ids grow with inserts).
    landed: dict[str, list[int]] = {}
    for action in AuditEntry.objects.order_by("pk").values_list("action", flat=True):
        who, k = action.split("-")
        landed.setdefault(who, []).append(int(k))
    out_of_order = [w for w, ks in landed.items() if ks != list(range(ROUNDS))]
    figures.update(
        {
            "workers": workers,
            "submitters": SUBMITTERS,
            "background_calls": SUBMITTERS * ROUNDS * 4,
            "nested_jobs": SUBMITTERS * ROUNDS * 2,
            "duration_s": round(duration, 1),
            "errors": error_counts(errors),
            "hung_callers": len(hung),
            "writes_landed": sum(len(ks) for ks in landed.values()),
            "submitters_out_of_order": len(out_of_order),
            "timeout_polls": POLLS,
            "timeout_late_max_ms": round(max(late) * 1000, 1),
            "timeout_late_mean_ms": round(sum(late) / len(late) * 1000, 1),
            "long_statement_runs": long_runs.runs,
            "max_worker_sessions": sessions["worker"] if sampler.server else None,
        }
    )
    assert not hung, f"deadlocked or hung: {hung[:5]}"
    assert not errors, [repr(e) for e in errors[:5]]
    assert len(landed) == SUBMITTERS and not out_of_order, out_of_order[:5]
    # The timeout came on time, left the job running, and nothing ran twice.
    assert max(late) < 0.5, late
    assert all(polled)
    assert long_runs.runs == POLLS
    assert sessions["worker"] <= workers, sessions


def worker_report(barrier: threading.Barrier | None) -> tuple[str, int]:
    """The worker thread that ran this job, and its session's backend id."""
    if barrier is not None:
        barrier.wait()
    backend = Book.objects.annotate(b=backend_id_expr()).values_list("b", flat=True)
    return threading.current_thread().name, backend[0]


def run_concurrently(jobs: int, parties: int | None) -> list[tuple[str, int]]:
    """``jobs`` jobs submitted from as many threads at once; with ``parties``,
    the first ``parties`` of them can only finish together (all running at once)."""
    barrier = threading.Barrier(parties, timeout=10) if parties else None
    found: list = []
    lock = threading.Lock()

    def one(i):
        try:
            job = submit(
                worker_report,
                barrier if barrier and i < parties else None,
                alias="default",
                writes=False,
                description="report",
            )
            with lock:
                found.append(job.result(WAIT))
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(found) == jobs
    return found


@pytest.mark.timeout(scaled(120, 300))
def test_a_settings_change_resizes_the_pool(books, settings, figures):
    server = ServerSessions() if connection.vendor != "sqlite" else None
    phases = []
    try:
        for size in (1, 3, 1):
            settings.ASYNCHRORMOUS = {"WORKERS": size, "TIMEOUT": WAIT}
            # With `size` workers, `size` jobs that wait for each other all finish.
            found = run_concurrently(4 * size + 4, parties=size if size > 1 else None)
            threads = Counter(name for name, _ in found)
            sessions = {backend for _, backend in found}
            on_server = server.count()["worker"] if server else None
            phases.append((size, len(threads), len(sessions), on_server))
    finally:
        if server:
            server.close()
    figures.update(
        {
            "phases": [
                {
                    "workers": size,
                    "distinct_threads": t,
                    "distinct_sessions": s,
                    "worker_sessions_on_server": on_server,
                }
                for size, t, s, on_server in phases
            ]
        }
    )
    for size, distinct_threads, distinct_sessions, on_server in phases:
        assert distinct_threads == size, phases
        assert distinct_sessions == size, phases
        # The old pool's sessions are gone: a restart closed them.
        assert on_server in (None, size), phases
