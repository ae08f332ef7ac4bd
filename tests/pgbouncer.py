"""PgBouncer in transaction mode on a loopback port, in front of the PostgreSQL server.

``PgBouncer`` starts Debian's ``pgbouncer`` (installed with apt-get when missing and
this runs as root) with a generated ini: transaction pooling, trust authentication, a
wildcard database entry for 127.0.0.1:5432. Loaded as a pytest plugin
(``-p tests.pgbouncer``, tox's ``pgbouncer`` env) with
``ASYNCHRORMOUS_TEST_DB=postgres-pgbouncer``, it runs one for the session before
Django reads the settings, which find its port in ``ASYNCHRORMOUS_PGBOUNCER_PORT``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.debian import debian_program

SERVER = ("127.0.0.1", 5432)
DEBIAN_BINARY = "/usr/sbin/pgbouncer"


def binary() -> str | None:
    """The pgbouncer executable, installed with apt-get when missing and root."""
    return debian_program("pgbouncer", "pgbouncer", DEBIAN_BINARY)


UNAVAILABLE = (
    "pgbouncer is not installed and cannot be here (not root, or no apt-get):"
    " apt-get install pgbouncer"
)


class Unavailable(RuntimeError):
    """No pgbouncer executable, and none could be installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    """One pgbouncer process; ``start()`` returns when it accepts connections."""

    def __init__(self, **settings: str | int) -> None:
        self.settings = {
            "listen_addr": "127.0.0.1",
            "unix_socket_dir": "",
            "auth_type": "trust",
            "pool_mode": "transaction",
            "max_client_conn": 500,
            "default_pool_size": 20,
            **settings,
        }
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="asynchrormous-pgbouncer-"))

    @property
    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 20.0) -> PgBouncer:
        """Start on a free port, or on the same port again after ``stop()``."""
        executable = binary()
        if executable is None:
            raise Unavailable(UNAVAILABLE)
        self.port = self.port or free_port()
        users = self.directory / "users.txt"
        users.write_text('"postgres" ""\n')
        ini = self.directory / "pgbouncer.ini"
        lines = ["[databases]", f"* = host={SERVER[0]} port={SERVER[1]}", "[pgbouncer]"]
        lines += [f"listen_port = {self.port}", f"auth_file = {users}"]
        lines += [f"{key} = {value}" for key, value in self.settings.items()]
        ini.write_text("\n".join(lines) + "\n")
        command = [executable, str(ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            user = "postgres"
            with contextlib.suppress(KeyError):
                pwd.getpwnam(user)
                command[1:1] = ["-u", user]
            if len(command) == 2:
                command[1:1] = ["-u", "nobody"]
            self.directory.chmod(0o755)
            for f in (users, ini):
                f.chmod(0o644)
        ready = f"listening on 127.0.0.1:{self.port}"
        listening = self.log.count(ready) + 1  # this process's line, not an earlier one
        with open(self.directory / "pgbouncer.log", "ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while self.log.count(ready) < listening:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- The pytest plugin (tox's pgbouncer env) -------------------------------------

_session_bouncer: PgBouncer | None = None
_session_unavailable = False


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> Iterator[None]:
    """Before pytest-django reads the settings: start the session's pgbouncer."""
    global _session_bouncer, _session_unavailable
    if os.environ.get("ASYNCHRORMOUS_TEST_DB") == "postgres-pgbouncer":
        try:
            _session_bouncer = PgBouncer().start()
        except Unavailable:
            _session_unavailable = True  # every test is skipped, saying why
        else:
            os.environ["ASYNCHRORMOUS_PGBOUNCER_PORT"] = str(_session_bouncer.port)
            _destroy_test_databases_by_force()
    return (yield)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_bouncer is not None:
        _session_bouncer.close()


def _destroy_test_databases_by_force() -> None:
    """DROP DATABASE ... WITH (FORCE): pgbouncer keeps idle server sessions to it."""
    from django.db.backends.postgresql.creation import DatabaseCreation

    def _destroy_test_db(
        self: DatabaseCreation, test_database_name: str, verbosity: int
    ) -> None:
        name = self.connection.ops.quote_name(test_database_name)
        with self._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")

    DatabaseCreation._destroy_test_db = _destroy_test_db  # type: ignore[method-assign]


#: Tests that cannot hold behind transaction pooling, by node id prefix: the reason.
#: A client's statements there run on whichever server session PgBouncer lends, so
#: a server session is no longer the connection of one thread.
KILLS = (
    "ends a worker's server session: behind PgBouncer that session is PgBouncer's,"
    " shared by every client, and the test's own connection loses it too"
)
SESSIONS = (
    "compares server sessions (pg_backend_pid, pg_stat_activity): behind PgBouncer"
    " they are PgBouncer's, lent per transaction, not one per client connection"
)
NOT_BEHIND_PGBOUNCER = {
    "tests/test_faults.py::": KILLS,
    "tests/test_caller_runs_hostile.py::test_a_write_is_not_run_on_the_callers_": (
        KILLS
    ),
    "tests/test_caller_runs_hostile.py::test_a_jobs_answer_does_not_depend_on_": (
        "session variables belong to PgBouncer's server sessions, lent per "
        "transaction: the caller's own are not kept between its statements"
    ),
    "tests/test_prefetch_concurrency.py::test_lookups_run_side_by_side_on_their_": (
        SESSIONS
    ),
    "tests/test_replay_hostile.py::test_a_read_retried_on_a_replaced_connection_": (
        KILLS
    ),
    "tests/test_pool.py::test_a_connection_killed_while_idle_": KILLS,
    "tests/test_cache_hostile.py::test_an_alias_whose_user_may_not_read_": (
        "PgBouncer lets in only the users of its own configuration: the test's "
        "restricted role cannot log in through it"
    ),
    "tests/test_background.py::test_query_runs_on_a_worker_thread_and_connection": (
        SESSIONS
    ),
    "tests/test_pool.py::test_a_connection_older_than_its_max_age_is_replaced": (
        SESSIONS
    ),
    "tests/test_pool.py::test_sessions_stay_within_workers_": SESSIONS,
    "tests/test_pool.py::test_idle_workers_close_their_connections": SESSIONS,
    "tests/test_pool.py::test_a_forked_child_builds_its_own_pool_": SESSIONS,
    "tests/test_transaction.py::test_a_task_created_inside_a_block_does_not_join": (
        SESSIONS
    ),
    "tests/test_transaction.py::test_the_decorator_form_opens_a_block_per_call": (
        SESSIONS
    ),
    "tests/test_asyncio.py::test_cancelling_a_running_statement_leaves_the_": (
        SESSIONS
    ),
    "tests/test_thread_and_fork_safety.py::test_pytest_django_drops_the_test_": (
        "PgBouncer keeps idle server sessions to the test database, so a plain DROP"
        " DATABASE fails; this plugin drops test databases WITH (FORCE)"
    ),
}


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if _session_unavailable:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=UNAVAILABLE))
    if _session_bouncer is None:
        return
    for item in items:
        for prefix, reason in NOT_BEHIND_PGBOUNCER.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=f"PgBouncer: {reason}"))
