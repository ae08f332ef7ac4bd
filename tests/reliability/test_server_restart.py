"""Scenario 3: the PostgreSQL server restarts, and stops then starts, under load.

The suite's own cluster (Debian's ``pg_createcluster``, port 5439, trust on
127.0.0.1), created and started here when missing and stopped at the end, behind a
Django alias of its own (``restart``) that exists only in this module. Every pending
result ends with a value or a clear ``OperationalError`` within its timeout, later
queries succeed in the same process, no write is lost or doubled, and the outage
logs one warning for the alias.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, connections
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL

import asynchrormous
from asynchrormous import outages
from tests.reliability.conftest import scaled
from tests.reliability.probes import TIMEOUT, from_another_thread, outcome
from tests.testapp.models import Author, Book, Publisher

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="restarts a PostgreSQL cluster"
    ),
    # Full counts: ten restarts and ten stop/starts, and maybe the cluster's creation.
    pytest.mark.timeout(600),
]

CLUSTER = "reliability"
PORT = 5439
ALIAS = "restart"
DATABASE = "asynchrormous_reliability"
WORKERS = 4


def _version() -> str | None:
    """The newest PostgreSQL major version installed the Debian way."""
    versions = sorted(
        (p.name for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()),
        key=int,
    )
    return versions[-1] if versions else None


def _run(*command: str, check: bool = True) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")


def _ctl(action: str, check: bool = True) -> None:
    command = ("pg_ctlcluster", "--skip-systemctl-redirect", VERSION, CLUSTER, action)
    _run(*command, check=check)


def _accepting() -> bool:
    import psycopg

    try:
        psycopg.connect(_dsn("postgres"), connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def _until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> float:
    """Poll until ``check()`` is true, bounded; the monotonic time it became so."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)  # the server's own progress: nothing to wait on but it
    return time.monotonic()


def _dsn(dbname: str) -> str:
    return f"host=127.0.0.1 port={PORT} user=postgres dbname={dbname}"


VERSION = _version() or ""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "pg_createcluster and pg_ctlcluster need root"
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_lsclusters"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's postgresql-common)"
    if not VERSION:
        return "no PostgreSQL server under /usr/lib/postgresql"
    return None


@contextlib.contextmanager
def _cluster_lock() -> Iterator[None]:
    """One run at a time restarts the cluster (two checkouts on one machine)."""
    with open(f"/tmp/asynchrormous-{CLUSTER}-cluster.lock", "w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "another run holds the cluster"
                time.sleep(0.5)  # another process's run: nothing to wait on but it
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The suite's own cluster, created when missing, running until the module ends."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    with _cluster_lock():
        yield from _running_cluster()


def _running_cluster() -> Iterator[None]:
    if not Path(f"/etc/postgresql/{VERSION}/{CLUSTER}").exists():
        _create()
    try:
        if not _accepting():
            _ctl("start")
        _until("the cluster to accept connections", _accepting)
        yield
    finally:
        _ctl("stop", check=False)  # kept, stopped: the next run only starts it


def _create() -> None:
    try:
        _run(
            "pg_createcluster",
            "--start-conf=manual",  # never started at boot: the suite starts it
            "-p",
            str(PORT),
            "-o",
            "max_connections=30",
            "-o",
            "shared_buffers=16MB",
            VERSION,
            CLUSTER,
            "--",
            "--auth=trust",
        )
    except Exception:
        # Half made would hide the failure from the next run: leave nothing.
        _run("pg_dropcluster", "--stop", VERSION, CLUSTER, check=False)
        raise


@pytest.fixture
def restart_db(cluster, django_db_blocker, settings) -> Iterator[None]:
    """The ``restart`` alias: a fresh database on the cluster, with the test tables.

    No Django test case around it: one would refuse an alias it was not told of.
    """
    import psycopg

    settings.ASYNCHRORMOUS = {"WORKERS": WORKERS, "TIMEOUT": TIMEOUT}
    with psycopg.connect(_dsn("postgres"), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DATABASE}")
    config = copy.deepcopy(connections.settings["default"])
    config.update(NAME=DATABASE, PORT=PORT, HOST="127.0.0.1", USER="postgres")
    connections.settings[ALIAS] = config
    with django_db_blocker.unblock():
        try:
            with connections[ALIAS].schema_editor() as editor:
                for model in (Author, Publisher, Book):
                    editor.create_model(model)
            connections[ALIAS].close()
            yield
        finally:
            asynchrormous.shutdown(timeout=TIMEOUT)
            connections[ALIAS].close()
            del connections[ALIAS]
            del connections.settings[ALIAS]
            outages.down.pop(ALIAS, None)


class Gate:
    """An advisory lock the test holds on its own session: gated statements wait
    inside the server, so a restart finds every worker in a statement."""

    KEY = 5439

    def __init__(self) -> None:
        import psycopg

        self.session = psycopg.connect(_dsn(DATABASE), autocommit=True)
        self.session.execute("SELECT pg_advisory_lock(%s)", [self.KEY])

    def passed(self) -> RawSQL:
        """A condition that holds once the statement got through the gate."""
        sql = "pg_advisory_xact_lock_shared(%s) IS NOT NULL"
        return RawSQL(sql, [self.KEY], BooleanField())

    def all_waiting(self) -> bool:
        (waiting,) = self.session.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            [DATABASE],
        ).fetchone()
        return waiting == WORKERS


def books() -> Any:
    return Book.objects.using(ALIAS).run_async()


class Load:
    """Background reads and creates, submitted and later checked."""

    def __init__(self, author: Author) -> None:
        self.author = author
        self.reads: list[Any] = []
        self.creates: dict[str, Any] = {}
        self.results: dict[str, int] = dict.fromkeys(
            ("reads_ok", "reads_failed", "creates_ok", "creates_failed"), 0
        )

    def submit(self, label: str, n: int) -> None:
        self.reads += [books().filter(author=self.author).count() for _ in range(n)]
        for i in range(n):
            title = f"{label} {i}"
            self.creates[title] = from_another_thread(
                lambda t=title: books().create(title=t, author=self.author)
            )

    def check(self) -> None:
        """Each result is a value or a clear error; no write lost or doubled."""
        for result in self.reads:
            value = outcome(result)
            failed = isinstance(value, Exception)
            self.results["reads_failed" if failed else "reads_ok"] += 1
        landed = {}
        for title, result in self.creates.items():
            landed[title] = not isinstance(outcome(result), Exception)
        self.results["creates_ok"] += sum(landed.values())
        self.results["creates_failed"] += len(landed) - sum(landed.values())
        rows: dict[str, int] = {}
        # The test's own connection, plain Django, may predate the restart.
        connections[ALIAS].close()
        titles = Book.objects.using(ALIAS).filter(author=self.author)
        for title in titles.values_list("title", flat=True):
            rows[title] = rows.get(title, 0) + 1
        assert not rows or max(rows.values()) == 1, "a write landed twice"
        lost = [t for t, ok in landed.items() if ok and rows.get(t) != 1]
        assert not lost, f"successful writes not in the table: {lost}"
        self.reads.clear()
        self.creates.clear()


def first_success_after(accepting_at: float) -> tuple[float, int]:
    """Seconds from the server accepting connections to the first background query
    that succeeds, and how many failed before it."""
    failures = 0
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = outcome(books().count())
        if not isinstance(value, Exception):
            return time.monotonic() - accepting_at, failures
        failures += 1
        assert time.monotonic() < deadline, f"no query succeeded: {value}"


def outage_records(caplog: Any) -> tuple[int, int]:
    ours = [r for r in caplog.records if r.name == "asynchrormous"]
    warnings = sum(r.levelno == logging.WARNING for r in ours)
    infos = sum(r.levelno == logging.INFO for r in ours)
    return warnings, infos


def test_restart_and_stop_start_under_load(restart_db, figures, caplog):
    caplog.set_level(logging.DEBUG, logger="asynchrormous")
    author = Author.objects.using(ALIAS).create(name="restart")
    anchor = Book.objects.using(ALIAS).create(title="anchor", author=author)
    load = Load(author)
    rounds = scaled(2, 10)
    per_round = scaled(20, 100)
    recovery: list[float] = []
    restart_s: list[float] = []
    warnings_per_outage: list[int] = []
    failed_after_accepting = 0
    restored_message = ""
    for r in range(rounds):
        # A restart while every worker waits inside a statement, more queued.
        gate = Gate()
        gated = [
            books().filter(gate.passed(), pk=anchor.pk).count() for _ in range(WORKERS)
        ]
        _until("every worker at the gate", gate.all_waiting)
        load.submit(f"restart {r}", per_round)
        caplog.clear()
        began = time.monotonic()
        _ctl("restart")  # fast: the server ends every session, the gate's too
        accepting_at = _until("the cluster to accept connections", _accepting)
        restart_s.append(accepting_at - began)
        for result in gated:
            value = outcome(result)
            assert isinstance(value, Exception) or value == 1
            load.results[
                "reads_failed" if isinstance(value, Exception) else "reads_ok"
            ] += 1
        gate.session.close()
        took, _ = first_success_after(accepting_at)
        recovery.append(took)
        load.check()
        warnings, infos = outage_records(caplog)
        assert warnings <= 1 and infos == warnings  # a restart may fail no query

        # Stop, queries while it is down, start.
        load.submit(f"before stop {r}", per_round)
        caplog.clear()
        _ctl("stop")
        down = [books().filter(author=author).count() for _ in range(per_round)]
        for result in down:
            assert isinstance(outcome(result), OperationalError)
        warnings, infos = outage_records(caplog)
        assert (warnings, infos) == (1, 0)
        _ctl("start")
        accepting_at = _until("the cluster to accept connections", _accepting)
        took, failures = first_success_after(accepting_at)
        recovery.append(took)
        failed_after_accepting = max(failed_after_accepting, failures)
        load.check()
        warnings, infos = outage_records(caplog)
        warnings_per_outage.append(warnings)
        assert (warnings, infos) == (1, 1)
        (restored,) = [r for r in caplog.records if r.levelno == logging.INFO]
        restored_message = restored.getMessage()
        # Later queries succeed, in the same process.
        load.submit(f"after {r}", per_round)
        before = dict(load.results)
        load.check()
        assert load.results["reads_failed"] == before["reads_failed"]
        assert load.results["creates_failed"] == before["creates_failed"]

    figures.update(
        rounds=rounds,
        restart_s_max=round(max(restart_s), 2),
        recovery_ms_max=round(max(recovery) * 1000, 1),
        recovery_ms_median=round(sorted(recovery)[len(recovery) // 2] * 1000, 1),
        warnings_logged_per_outage=max(warnings_per_outage),
        queries_failed_after_accepting=failed_after_accepting,
        last_restored_log=restored_message,
        **load.results,
    )
