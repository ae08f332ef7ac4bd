"""What the reliability scenarios measure from outside the library.

The server's own view of this process's sessions, read on a connection of its own
(never one of Django's, so it is not one of the sessions it counts), the process's
resident memory, and a least-squares slope.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection

from tests.testapp.apps import BACKEND_THREADS

WORKER_PREFIX = "asynchrormous-"
#: The sessions of ServerSessions objects themselves: never counted.
_PROBES: set[int] = set()


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (0.0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def kind_of(backend_id: int) -> str:
    """Who opened this session: ``worker``, ``caller`` or ``other``.

    ``worker`` is a pool thread's Django connection, ``caller`` any other thread's
    Django connection in this process (submitters, the asyncio loop, the test),
    ``other`` a session no Django connection of this process opened (MariaDB's
    short-lived ``KILL QUERY`` connections).
    """
    thread = BACKEND_THREADS.get(backend_id)
    if thread is None:
        return "other"
    return "worker" if thread.startswith(WORKER_PREFIX) else "caller"


class ServerSessions:
    """The test database's sessions, as the server lists them, seen from outside.

    PostgreSQL: ``pg_stat_activity`` rows of client backends on the test database.
    MariaDB: ``information_schema.processlist`` rows on the test database. Only this
    process uses its test database (its name carries TOX_ENV_NAME), and the
    sessions of these objects themselves are left out.
    """

    def __init__(self) -> None:
        self.vendor = connection.vendor
        params = connection.settings_dict
        if self.vendor == "postgresql":
            import psycopg

            self._conn: Any = psycopg.connect(
                host=params["HOST"],
                port=params["PORT"],
                user=params["USER"],
                dbname=params["NAME"],
                autocommit=True,
                application_name="reliability-sampler",
            )
            self._sql = (
                "SELECT pid, state FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend'"
            )
            own = "SELECT pg_backend_pid()"
        elif self.vendor == "mysql":
            import MySQLdb

            self._conn = MySQLdb.connect(
                host=params["HOST"],
                port=params["PORT"],
                user=params["USER"],
                database=params["NAME"],
                autocommit=True,
            )
            self._sql = (
                "SELECT ID, COMMAND FROM information_schema.processlist WHERE DB = %s"
            )
            own = "SELECT CONNECTION_ID()"
        else:
            raise RuntimeError(f"no server sessions to list on {self.vendor}")
        self._name = params["NAME"]
        cursor = self._conn.cursor()
        cursor.execute(own)
        self.backend_id = cursor.fetchone()[0]
        cursor.close()
        _PROBES.add(self.backend_id)

    def now(self) -> list[tuple[int, bool]]:
        """``(backend id, busy)`` for each session: busy is PostgreSQL's state !=
        idle, MariaDB's command != Sleep."""
        cursor = self._conn.cursor()
        try:
            cursor.execute(self._sql, [self._name])
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if self.vendor == "postgresql":
            found = [(pid, state != "idle") for pid, state in rows]
        else:
            found = [(pid, command != "Sleep") for pid, command in rows]
        return [(pid, busy) for pid, busy in found if pid not in _PROBES]

    def count(self) -> Counter[str]:
        """Sessions by kind (see ``kind_of``), now."""
        return Counter(kind_of(pid) for pid, _ in self.now())

    def busy(self) -> list[int]:
        """The sessions running a statement (or in a transaction) now."""
        return [pid for pid, busy in self.now() if busy]

    def wait_until(
        self, done: Callable[[list[tuple[int, bool]]], bool], timeout: float
    ) -> tuple[bool, float]:
        """Poll (every 10 ms) until ``done(self.now())``; (whether it did, seconds)."""
        start = time.monotonic()
        while True:
            if done(self.now()):
                return True, time.monotonic() - start
            if time.monotonic() - start > timeout:
                return False, time.monotonic() - start
            time.sleep(0.01)

    def close(self) -> None:
        self._conn.close()
        _PROBES.discard(self.backend_id)


class Sampler:
    """A thread that samples the server's sessions and this process's RSS.

    Each sample is ``(seconds since start, progress(), rss bytes, session ids)``;
    the sessions are classified at the end (``max_by_kind``), when every Django
    connection of the run has told ``BACKEND_THREADS`` which thread opened it.
    """

    def __init__(
        self,
        progress: Callable[[], int],
        interval: float = 0.05,
        sessions: bool = True,
    ) -> None:
        self.progress = progress
        self.interval = interval
        self.server = ServerSessions() if sessions else None
        self.samples: list[tuple[float, int, int, list[int]]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reliability-sampler")

    def __enter__(self) -> Sampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.server is not None:
            self.server.close()

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # reported by the scenario, not lost
                self.errors.append(exc)
                return
            if self._stop.wait(self.interval):
                self.sample()
                return

    def sample(self) -> None:
        ids = [pid for pid, _ in self.server.now()] if self.server else []
        self.samples.append(
            (time.monotonic() - self._start, self.progress(), rss_bytes(), ids)
        )

    def max_by_kind(self) -> dict[str, int]:
        """The most sessions of each kind seen in one sample, and in total."""
        most: Counter[str] = Counter()
        for _, _, _, ids in self.samples:
            kinds = Counter(kind_of(pid) for pid in ids)
            kinds["total"] = len(ids)
            for kind, n in kinds.items():
                most[kind] = max(most[kind], n)
        return {k: most[k] for k in ("worker", "caller", "other", "total")}

    def distinct(self, kind: str) -> int:
        """How many different sessions of ``kind`` were seen over the run."""
        return len({pid for s in self.samples for pid in s[3] if kind_of(pid) == kind})

    def rss_slope(self, after: float = 0.5) -> tuple[float, int]:
        """RSS growth in bytes per unit of progress over the run's last ``1 - after``,
        and the number of samples it is fitted on."""
        if not self.samples:
            return 0.0, 0
        end = max(s[1] for s in self.samples)
        tail = [(p, rss) for _, p, rss, _ in self.samples if p >= after * end]
        return slope([p for p, _ in tail], [r for _, r in tail]), len(tail)


def error_counts(errors: Iterable[BaseException]) -> dict[str, int]:
    """Errors by type name, for the figures."""
    return dict(Counter(type(e).__name__ for e in errors))


#: Seconds any one wait of the fault scenarios may take (a restart takes 1-3 s).
TIMEOUT = 20.0


def from_another_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` called by a new thread: a caller of its own, so its background writes
    do not wait for this thread's reads (as they would for one caller)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(TIMEOUT)
    assert out, "the thread failed or did not finish"
    return out[0]


def outcome(result: Any) -> Any:
    """The value, or the clear error the caller would see; never more than
    TIMEOUT."""
    from django.db import InterfaceError, OperationalError

    from asynchrormous import resolve

    try:
        return resolve(result, timeout=TIMEOUT)
    except (OperationalError, InterfaceError) as exc:
        return exc
