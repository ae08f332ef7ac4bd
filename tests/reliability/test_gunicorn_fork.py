"""Scenario 5, fork: gunicorn --preload -w 2, its master's pool warm at the fork.

The app (``gunicorn_app.py``) runs background queries at import, in the master, so the
master's workers hold open sessions when gunicorn forks. The test drives the two
gunicorn workers over 127.0.0.1 and checks every answer, gunicorn's log, the sessions
each process holds (every process writes the sessions it opens to a file named after
its pid) and that the master's sessions are untouched, also after a worker exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Sum

from tests.reliability.conftest import scaled
from tests.testapp.models import Author, Book

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("ASYNCHRORMOUS_TEST_DB") not in ("postgres", "mariadb"),
        reason="the fork scenario runs on PostgreSQL and MariaDB",
    ),
    pytest.mark.django_db(transaction=True),
]

ROOT = Path(__file__).resolve().parents[2]
GUNICORN_WORKERS = 2
#: gunicorn_app.WARM_UP (importing the app would set Django up and run it here).
WARM_UP = "gunicorn-master-warm-up"
BOOKS = 60
YEARS = range(1990, 2020)
#: A line of gunicorn's log (or of the app's own warnings) that means trouble.
TROUBLE = re.compile(
    r"Traceback|Error|error|exception|SSL|ssl|lost|gone away|closed|terminat|"
    r"WORKER TIMEOUT|was sent|asynchrormous",
)


def wait_until(check, timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(every)


def sessions_of(directory: Path) -> dict[int, list[tuple[int, str]]]:
    """pid -> [(backend id, thread name)] of every session each process opened."""
    found: dict[int, list[tuple[int, str]]] = {}
    for f in directory.iterdir():
        lines = [line.split(" ", 1) for line in f.read_text().splitlines() if line]
        found[int(f.name)] = [(int(b), t) for b, t in lines]
    return found


def alive(backends: list[int]) -> dict[int, Any]:
    """The given sessions still open: backend id -> (start, state, last query)."""
    if not backends:
        return {}
    marks = ", ".join(["%s"] * len(backends))
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pid, backend_start, state, query FROM pg_stat_activity "
                f"WHERE pid IN ({marks})",
                backends,
            )
        else:
            cursor.execute(
                "SELECT id, NULL, command, info FROM information_schema.processlist "
                f"WHERE id IN ({marks})",
                backends,
            )
        return {row[0]: row[1:] for row in cursor.fetchall()}


@pytest.fixture
def catalogue() -> dict[int, dict[str, Any]]:
    """Committed books; the answer the view must give for each year."""
    authors = [Author.objects.create(name=f"Author {i}") for i in range(3)]
    Book.objects.bulk_create(
        Book(
            title=f"Book {i}",
            author=authors[i % 3],
            pages=100 + 7 * i,
            year=YEARS[i % len(YEARS)],
        )
        for i in range(BOOKS)
    )
    expected = {}
    for year in YEARS:
        recent = Book.objects.filter(year__gte=year).order_by("pk")
        expected[year] = {
            "titles": list(recent.values_list("title", flat=True)),
            "count": recent.count(),
            "first": recent.order_by("year", "pk").first().title,
            "pages": recent.aggregate(total=Sum("pages"))["total"],
        }
    return expected


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """gunicorn --preload -w 2 on a free loopback port; always stopped afterwards."""
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RELIABILITY_DB_NAME": connection.settings_dict["NAME"],
        "RELIABILITY_SESSIONS_DIR": str(sessions),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--preload",
                "--workers",
                str(GUNICORN_WORKERS),
                "--bind",
                "127.0.0.1:0",
                "--timeout",
                "60",
                "--graceful-timeout",
                "20",
                "--log-level",
                "info",
                "tests.reliability.gunicorn_app:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> str | None:
            text = log.read_text(errors="replace")
            if process.poll() is not None:
                raise AssertionError(f"gunicorn exited {process.returncode}:\n{text}")
            booted = text.count("Booting worker")
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            return found.group(1) if found and booted >= GUNICORN_WORKERS else None

        port = int(wait_until(listening, 60, "gunicorn listening with its workers"))
        yield {"process": process, "port": port, "log": log, "sessions": sessions}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def get(port: int, year: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/books/?year={year}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_gunicorn_preload_workers_serve_right_answers_and_leave_the_master_alone(
    catalogue, gunicorn, figures
):
    process, port, sessions_dir = (
        gunicorn["process"],
        gunicorn["port"],
        gunicorn["sessions"],
    )
    workers = settings.ASYNCHRORMOUS["WORKERS"]
    master = process.pid
    before = sessions_of(sessions_dir)
    master_sessions = [b for b, _ in before.get(master, [])]
    assert master_sessions, "the master opened no session at import"
    assert all(t.startswith("asynchrormous-") for _, t in before[master])
    master_state = alive(master_sessions)
    assert set(master_state) == set(master_sessions), "a master session is gone"
    if connection.vendor == "postgresql":  # each one's last statement: the warm-up
        assert all(WARM_UP in query for _, _, query in master_state.values())

    requests = scaled(100, 400)
    years = [YEARS[i % len(YEARS)] for i in range(requests)]
    wrong: list[str] = []
    pids: dict[int, int] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def one(year: int) -> None:
        body = get(port, year)
        pid = body.pop("pid")
        with lock:
            pids[pid] = pids.get(pid, 0) + 1
            if body != catalogue[year]:
                wrong.append(f"year {year} from pid {pid}: {body}")

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(one, years))
    seconds = time.monotonic() - started

    after = sessions_of(sessions_dir)
    children = {pid: after.get(pid, []) for pid in pids}
    alive_per_child = {
        pid: len(alive([b for b, _ in opened])) for pid, opened in children.items()
    }
    figures.update(
        requests=requests,
        seconds=round(seconds, 2),
        requests_per_second=round(requests / seconds, 1),
        wrong_answers=len(wrong),
        answers_per_worker=sorted(pids.values()),
        master_sessions=len(master_sessions),
        sessions_opened_per_worker=sorted(len(s) for s in children.values()),
        sessions_alive_per_worker=sorted(alive_per_child.values()),
        pool_workers=workers,
    )
    assert not wrong, wrong[:5]
    assert set(pids) <= set(after) - {master}, "an answer came from no forked worker"
    assert len(pids) == GUNICORN_WORKERS, f"answers came from {sorted(pids)}"
    for pid, opened in children.items():
        # Only the pool's threads touch the database; each has one session at most.
        assert all(t.startswith("asynchrormous-") for _, t in opened), opened
        assert len(opened) <= workers, f"worker {pid} opened {len(opened)} sessions"
    # The master's sessions: still open, the same sessions, unused since the warm-up.
    assert after[master] == before[master], "the master opened sessions after import"
    assert alive(master_sessions) == master_state

    # One worker exits (TTOU: one fewer); its sessions close, the master's stay.
    process.send_signal(signal.SIGTTOU)
    (leaving,) = wait_until(
        lambda: [pid for pid in pids if not Path(f"/proc/{pid}").exists()],
        30,
        "a worker exiting on TTOU",
    )
    leaving_sessions = [b for b, _ in after[leaving]]
    wait_until(
        lambda: not alive(leaving_sessions), 10, "the exited worker's sessions closing"
    )
    assert alive(master_sessions) == master_state, "a worker's exit touched the master"
    assert sessions_of(sessions_dir)[master] == before[master]

    # The master stops; gunicorn's log shows no connection or protocol error.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    everyone = [b for opened in sessions_of(sessions_dir).values() for b, _ in opened]
    wait_until(lambda: not alive(everyone), 10, "every session closing at exit")
    log = gunicorn["log"].read_text(errors="replace")
    trouble = [line for line in log.splitlines() if TROUBLE.search(line)]
    figures.update(log_lines=len(log.splitlines()), log_trouble=len(trouble))
    assert not trouble, "\n".join(trouble)
