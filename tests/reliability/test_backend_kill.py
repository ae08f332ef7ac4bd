"""Scenario 2: the server ends every worker's session, while idle and under load.

``pg_terminate_backend`` on PostgreSQL, ``KILL`` on MariaDB. A session killed while
idle must cost no write (the worker notices before its next job); one killed inside
a statement fails that statement only: a read is retried on a new session, a write
is reported (``OperationalError``/``InterfaceError``), never run twice, and the pool
goes on answering. Queries wait on a lock the test holds (a "gate"), so the kills
land while each worker is inside a statement, whatever the machine's speed.
"""

from __future__ import annotations

import logging
import threading
import time
import timeit
from collections.abc import Callable
from typing import Any

import pytest
from django.db import (
    InterfaceError,
    OperationalError,
    connection,
    connections,
)
from django.db.models import BooleanField, F, IntegerField
from django.db.models.expressions import RawSQL

from asynchrormous import resolve
from asynchrormous.pool import _ended_by_server
from asynchrormous.results import job_of, submit
from tests.reliability.conftest import scaled
from tests.reliability.probes import TIMEOUT, from_another_thread, outcome
from tests.testapp.apps import BACKEND_ID_SQL, BACKEND_THREADS
from tests.testapp.models import Author, Book

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has no sessions"),
]

WORKERS = 4

KILL_SQL = {"postgresql": "SELECT pg_terminate_backend(%s)", "mysql": "KILL %s"}
# The sessions of this test database other than the test's own.
SESSIONS_SQL = {
    "postgresql": "SELECT pid FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    "mysql": "SELECT id FROM information_schema.processlist "
    "WHERE db = DATABASE() AND id <> CONNECTION_ID()",
}
# ... of which those waiting on the gate.
WAITING_SQL = {
    "postgresql": SESSIONS_SQL["postgresql"]
    + " AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
    "mysql": SESSIONS_SQL["mysql"] + " AND state = 'User lock'",
}
# The gate: the test holds it; a gated statement takes it shared, or in turn.
CLOSE_GATE_SQL = {
    "postgresql": "SELECT pg_advisory_lock(%s)",
    "mysql": "SELECT GET_LOCK(%s, 0)",
}
OPEN_GATE_SQL = {
    "postgresql": "SELECT pg_advisory_unlock(%s)",
    "mysql": "SELECT RELEASE_LOCK(%s)",
}
PASS_GATE_SQL = {  # 1 once the gate is open
    "postgresql": "(pg_advisory_xact_lock_shared(%s) IS NOT NULL)::int",
    "mysql": "(GET_LOCK(%s, 30) + RELEASE_LOCK(%s) - 1)",
}


def _sessions(sql: str) -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return {row[0] for row in cursor.fetchall()}


def _until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll the server until ``check()`` is true; bounded."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)  # the server's own progress: nothing to wait on but it
    return found


def kill(sessions: set[int]) -> None:
    """End ``sessions`` from the server side, and wait until they are gone.

    From a thread of its own: on this thread, ``KILL`` (not a SELECT) would first
    wait for the test's background reads, as any write of their caller does.
    """

    def end() -> None:
        try:
            with connection.cursor() as cursor:
                for session in sessions:
                    cursor.execute(KILL_SQL[connection.vendor], [session])
        finally:
            connection.close()

    from_another_thread(end)
    _until(
        "the killed sessions to go",
        lambda: not sessions & _sessions(SESSIONS_SQL[connection.vendor]),
    )


class Gate:
    """A lock the test holds: gated statements wait inside the server until it opens."""

    def __init__(self) -> None:
        self.key = abs(hash(connection.settings_dict["NAME"])) % 2**31
        self.name = f"asynchrormous-{connection.settings_dict['NAME']}"

    def _arg(self) -> Any:
        return self.key if connection.vendor == "postgresql" else self.name

    def close(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(CLOSE_GATE_SQL[connection.vendor], [self._arg()])
            assert cursor.fetchone()[0] in (None, "", 1), "the gate is taken"

    def open(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(OPEN_GATE_SQL[connection.vendor], [self._arg()])

    def passed(self) -> RawSQL:
        """An expression that is 1 once the statement got through the gate."""
        params = [self._arg()] * (1 if connection.vendor == "postgresql" else 2)
        return RawSQL(PASS_GATE_SQL[connection.vendor], params, IntegerField())

    def condition(self) -> RawSQL:
        sql = f"{PASS_GATE_SQL[connection.vendor]} = 1"
        params = [self._arg()] * (1 if connection.vendor == "postgresql" else 2)
        return RawSQL(sql, params, BooleanField())

    def all_waiting(self) -> set[int]:
        """The sessions waiting at the gate, once every worker's is; else empty."""
        waiting = _sessions(WAITING_SQL[connection.vendor])
        return waiting if len(waiting) == WORKERS else set()


@pytest.fixture
def pool(settings):
    settings.ASYNCHRORMOUS = {"WORKERS": WORKERS, "TIMEOUT": TIMEOUT}


def on_every_worker(fn: Callable[[], Any], *, writes: bool) -> list[Any]:
    """``fn()`` once on each worker: each job waits for all the others to start."""
    barrier = threading.Barrier(WORKERS)

    def job() -> Any:
        value = fn()
        barrier.wait(TIMEOUT)
        return value

    jobs = [
        from_another_thread(
            lambda: submit(job, alias="default", writes=writes, description="on every")
        )
        for _ in range(WORKERS)
    ]
    return [job.result(TIMEOUT) for job in jobs]


def worker_session() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT " + BACKEND_ID_SQL[connection.vendor])
        return cursor.fetchone()[0]


def test_idle_kills_of_every_worker_cost_no_write(pool, figures):
    """Every worker's session is ended while idle; each worker's next job is a write."""
    author = Author.objects.create(name="idle")
    rounds = scaled(5, 50)
    failed = 0
    killed = 0
    for i in range(rounds):
        sessions = set(on_every_worker(worker_session, writes=False))
        assert len(sessions) == WORKERS
        kill(sessions)
        killed += len(sessions)

        def write(i: int = i) -> Any:
            try:
                Book.objects.create(title=f"idle {i}", author=author)
            except (OperationalError, InterfaceError) as exc:
                return exc
            return worker_session()

        after = on_every_worker(write, writes=True)
        failed += sum(isinstance(session, Exception) for session in after)
        assert not sessions & set(after), "a worker kept a killed session"
    rows = Book.objects.filter(author=author).count()
    figures.update(
        rounds=rounds,
        sessions_killed_idle=killed,
        writes=rounds * WORKERS,
        failed_writes=failed,
        rows=rows,
    )
    assert failed == 0
    assert rows == rounds * WORKERS


def test_idle_check_cost(figures):
    """The per-job price of noticing a killed idle session: one poll of the socket."""
    connection.ensure_connection()
    raw = connection.connection
    number = 20000
    best = min(timeit.repeat(lambda: _ended_by_server(raw), number=number, repeat=5))
    assert not _ended_by_server(raw)
    figures.update(idle_check_us=round(best / number * 1e6, 2))


def test_kills_inside_statements_fail_only_those_statements(pool, figures, caplog):
    """Each worker waits inside a statement when its session is killed."""
    caplog.set_level(logging.DEBUG, logger="asynchrormous")
    author = Author.objects.create(name="load")
    counters = [
        Book.objects.create(title=f"counter {i}", author=author) for i in range(2)
    ]
    gate = Gate()
    rounds = scaled(3, 20)
    backlog = scaled(40, 200)
    seen: dict[str, int] = dict.fromkeys(
        (
            "reads_ok",
            "reads_failed",
            "writes_ok",
            "writes_failed",
            "creates_ok",
            "creates_failed",
        ),
        0,
    )
    killed = 0
    slowest = 0.0
    for r in range(rounds):
        gate.close()
        try:
            # Two gated reads and two gated writes: one on each worker.
            reads = [
                Book.objects.run_async().filter(gate.condition(), author=author).count()
                for _ in range(2)
            ]
            writes = [
                from_another_thread(
                    lambda c=c: (
                        Book.objects.run_async()
                        .filter(pk=c.pk)
                        .update(pages=F("pages") + gate.passed())
                    )
                )
                for c in counters
            ]
            waiting = _until("every worker at the gate", gate.all_waiting)
            # Queued behind them: plain reads and creates.
            more_reads = [
                Book.objects.run_async().filter(author=author).count()
                for _ in range(backlog // 2)
            ]
            creates = [
                from_another_thread(
                    lambda i=i, r=r: Book.objects.run_async().create(
                        title=f"load {r} {i}", author=author
                    )
                )
                for i in range(backlog // 2)
            ]
            kill(waiting)
            killed += len(waiting)
        finally:
            gate.open()
        started = time.monotonic()
        for result in reads + more_reads:
            value = outcome(result)
            seen["reads_ok" if isinstance(value, int) else "reads_failed"] += 1
            assert isinstance(value, Exception) or value >= len(counters)
        for counter, result in zip(counters, writes, strict=True):
            value = outcome(result)
            if isinstance(value, int):
                assert value == 1
                seen["writes_ok"] += 1
                counter.pages += 1
            else:
                seen["writes_failed"] += 1
        created = 0
        for result in creates:
            value = outcome(result)
            created += not isinstance(value, Exception)
        seen["creates_ok"] += created
        seen["creates_failed"] += len(creates) - created
        slowest = max(slowest, time.monotonic() - started)
        # No write lost or run twice.
        for counter in counters:
            assert Book.objects.get(pk=counter.pk).pages == counter.pages
        titles = Book.objects.filter(title__startswith=f"load {r} ")
        titles = list(titles.values_list("title", flat=True))
        assert len(titles) == len(set(titles)) == created
    # The pool answers afterwards.
    assert (
        resolve(Book.objects.run_async().filter(author=author).count(), timeout=TIMEOUT)
        >= 2
    )
    retried = sum(
        "replacing a lost connection" in r.getMessage() for r in caplog.records
    )
    figures.update(
        rounds=rounds,
        sessions_killed_in_statements=killed,
        reads_retried=retried,
        warnings_logged=sum(r.levelno == logging.WARNING for r in caplog.records),
        slowest_drain_s=round(slowest, 2),
        **seen,
    )
    assert seen["reads_failed"] == 0
    assert seen["creates_failed"] == 0
    assert seen["writes_failed"] == 2 * rounds  # the killed ones, reported


SLOW_SQL = {"postgresql": "pg_sleep(%s) IS NOT NULL", "mysql": "SLEEP(%s) = 0"}


def test_kills_at_any_moment_under_load(pool, figures, caplog):
    """A stream of reads and writes while every worker's session is killed, again
    and again, wherever each worker is: in a statement, between jobs, connecting.

    A write killed after its commit but before its answer is reported failed yet
    landed: so a failed write may have landed, a successful one has, none twice.
    """
    caplog.set_level(logging.DEBUG, logger="asynchrormous")
    author = Author.objects.create(name="storm")
    counters = [
        Book.objects.create(title=f"tally {i}", author=author) for i in range(4)
    ]
    jobs = scaled(600, 6000)
    kills = scaled(10, 100)
    finished = threading.Semaphore(0)  # one release per job done
    slow = RawSQL(SLOW_SQL[connection.vendor], [0.002], BooleanField())

    def stream(counter: Book) -> list[tuple[str, Any, Any]]:
        """One caller's jobs: reads, creates and increments, in turn."""
        made = []
        for i in range(jobs // len(counters)):
            qs = Book.objects.run_async()
            kind = ("read", "create", "increment")[i % 3]
            if kind == "read":
                key: Any = counter.pk
                result = qs.filter(slow, pk=counter.pk).count()
            elif kind == "create":
                key = f"storm {counter.pk} {i}"
                result = qs.create(title=key, author=author)
            else:
                key = counter.pk
                result = qs.filter(pk=counter.pk).update(pages=F("pages") + 1)
            job = job_of(result)
            assert job is not None
            job.future.add_done_callback(lambda _: finished.release())
            made.append((kind, key, result))
        return made

    callers: list[list[tuple[str, Any, Any]]] = []
    threads = [
        threading.Thread(target=lambda c=c: callers.append(stream(c))) for c in counters
    ]
    for thread in threads:
        thread.start()
    killed = 0
    # Each kill after the next share of the jobs is done: amid the stream.
    for _ in range(kills):
        for _ in range(jobs // kills // 2):
            assert finished.acquire(timeout=TIMEOUT), "the jobs stopped"
        workers = {s for s, t in BACKEND_THREADS.items() if t.startswith("asynchr")}
        sessions = workers & _sessions(SESSIONS_SQL[connection.vendor])
        kill(sessions)
        killed += len(sessions)
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(callers) == len(counters), "a caller failed to submit"

    ok = dict.fromkeys(("read", "create", "increment"), 0)
    failed = dict.fromkeys(("read", "create", "increment"), 0)
    increments = {c.pk: [0, 0] for c in counters}  # ok, failed
    created: dict[str, bool] = {}
    started = time.monotonic()
    for made in callers:
        for kind, key, result in made:
            value = outcome(result)  # a value or a clear error, within TIMEOUT
            failure = isinstance(value, Exception)
            (failed if failure else ok)[kind] += 1
            if kind == "read" and not failure:
                assert value == 1
            elif kind == "create":
                created[key] = not failure
            elif kind == "increment":
                increments[key][failure] += 1
    drain = time.monotonic() - started

    # No write lost (each success landed) or doubled (none landed twice).
    rows: dict[str, int] = {}
    for title in Book.objects.filter(title__startswith="storm ").values_list(
        "title", flat=True
    ):
        rows[title] = rows.get(title, 0) + 1
    assert max(rows.values()) == 1
    assert all(rows.get(title) == 1 for title, landed in created.items() if landed)
    for counter in counters:
        pages = Book.objects.get(pk=counter.pk).pages - counter.pages
        done, unknown = increments[counter.pk]
        assert done <= pages <= done + unknown
    # The pool answers afterwards.
    assert resolve(Book.objects.run_async().count(), timeout=TIMEOUT) >= len(rows)
    figures.update(
        jobs=jobs,
        kill_rounds=kills,
        sessions_killed=killed,
        reads_ok=ok["read"],
        reads_failed=failed["read"],
        reads_retried=sum(
            "replacing a lost connection" in r.getMessage() for r in caplog.records
        ),
        warnings_logged=sum(r.levelno == logging.WARNING for r in caplog.records),
        writes_ok=ok["create"] + ok["increment"],
        writes_failed=failed["create"] + failed["increment"],
        failed_writes_that_landed=sum(
            1 for title, landed in created.items() if not landed and title in rows
        )
        + sum(
            Book.objects.get(pk=c.pk).pages - c.pages - increments[c.pk][0]
            for c in counters
        ),
        drain_s=round(drain, 2),
    )
