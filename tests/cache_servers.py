"""Redis and memcached for the cache tests.

``redis_location()`` is a database of the shared Redis on 127.0.0.1:6379 (started the
way .ci/run would when it is down), claimed for this process so that parallel tox
environments never share one. ``memcached_location()`` is one memcached per process
on a free loopback port (Debian's ``memcached``, installed with apt-get when missing
and this runs as root). ``DisposableRedis`` and ``DisposableMemcached`` are private
servers a test can ``stop()`` and ``start()`` again on the same port: a cache outage.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.debian import debian_program

REDIS = ("127.0.0.1", 6379)
# Exactly what .ci/run runs when the shared Redis is down.
REDIS_SERVER = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]
#: The shared Redis's databases the test sessions claim, one each; the claims live
#: in database 0, and benchmarks/ (W7) uses databases 13 to 15.
TEST_DBS = range(1, 13)
CLAIM_KEY = "asynchrormous-tests:db:{}"
CLAIM_SECONDS = 24 * 60 * 60  # a session killed before its atexit frees it by then
READY_TIMEOUT = 10.0
DEBIAN_MEMCACHED = "/usr/bin/memcached"


class Unavailable(RuntimeError):
    """A server these tests need is not installed, and could not be installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, request: bytes, reply: bytes, host: str = "127.0.0.1") -> bool:
    """Whether a server on ``port`` answers ``request`` with ``reply`` first."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(request)
            return s.recv(64).startswith(reply)
    except OSError:
        return False


def refuses(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port`` any more."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def redis_answers(port: int) -> bool:
    return answers(port, b"PING\r\n", b"+PONG")


def memcached_answers(port: int) -> bool:
    return answers(port, b"version\r\n", b"VERSION ")


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition()`` every 20 ms until true; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} after {timeout:.0f} s")
        time.sleep(0.02)


# -- The shared Redis: one database of it per process ------------------------------

_redis_db: int | None = None


def redis_location() -> str:
    """``redis://127.0.0.1:6379/<db>``: a database of the shared Redis, emptied and
    claimed for this process until it exits; Redis is started when it is down."""
    global _redis_db
    if _redis_db is None:
        ensure_shared_redis()
        _redis_db = _claim_db()
        atexit.register(_release_db, _redis_db)
    return f"redis://{REDIS[0]}:{REDIS[1]}/{_redis_db}"


def ensure_shared_redis() -> None:
    """Start the shared Redis as .ci/run does when it does not answer a PING."""
    if redis_answers(REDIS[1]):
        return
    if shutil.which("redis-server") is None:
        raise Unavailable(
            "Redis does not answer on 127.0.0.1:6379 and redis-server is not "
            "installed: apt-get install redis-server"
        )
    done = subprocess.run(REDIS_SERVER, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(REDIS_SERVER)} exited with {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}"
        )
    poll(
        lambda: redis_answers(REDIS[1]),
        READY_TIMEOUT,
        "redis-server started but 127.0.0.1:6379 does not answer PING "
        "(see /var/log/redis/ci.log)",
    )


# Take over a claim only from the owner seen, so that two sessions never both win it.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""


def _owner() -> str:
    return f"{os.getpid()}:{os.environ.get('TOX_ENV_NAME', 'local')}"


def _claim_db() -> int:
    import redis

    claims = redis.Redis(*REDIS, db=0)
    mine = _owner()
    try:
        for db in TEST_DBS:
            key = CLAIM_KEY.format(db)
            won = claims.set(key, mine, nx=True, ex=CLAIM_SECONDS)
            if not won:
                held = claims.get(key)
                if held is not None and not _alive(held.decode()):
                    won = claims.eval(_TAKE_OVER, 1, key, held, mine, CLAIM_SECONDS)
            if won:
                redis.Redis(*REDIS, db=db).flushdb()
                return db
        owners = [claims.get(CLAIM_KEY.format(db)) for db in TEST_DBS]
    finally:
        claims.close()
    raise RuntimeError(
        f"every Redis database of the tests ({TEST_DBS.start} to {TEST_DBS.stop - 1}) "
        f"is claimed by a live process (pid:tox env): {owners}; let one finish, or "
        f"delete its key {CLAIM_KEY.format('N')!r} in database 0"
    )


def _alive(owner: str) -> bool:
    """Whether the process that claimed a database (``pid:env``) still runs here."""
    try:
        os.kill(int(owner.partition(":")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge: leave it
    return True


def _release_db(db: int) -> None:
    import redis

    with contextlib.suppress(redis.RedisError):
        claims = redis.Redis(*REDIS, db=0, socket_timeout=2)
        if claims.get(CLAIM_KEY.format(db)) == _owner().encode():
            claims.delete(CLAIM_KEY.format(db))
        claims.close()


# -- memcached: Debian's binary, one server per process ------------------------------


MEMCACHED_UNAVAILABLE = (
    "memcached is not installed and cannot be here (not root, or no apt-get):"
    " apt-get install memcached"
)


def memcached_binary() -> str:
    """The memcached executable, installed with apt-get when missing and root."""
    found = debian_program("memcached", "memcached", DEBIAN_MEMCACHED)
    if found is None:
        raise Unavailable(MEMCACHED_UNAVAILABLE)
    return found


_session_memcached: DisposableMemcached | None = None


def memcached_location() -> str:
    """``127.0.0.1:PORT`` of this process's memcached, started on the first call and
    stopped when the interpreter exits."""
    global _session_memcached
    if _session_memcached is None:
        server = DisposableMemcached().start()
        atexit.register(server.close)
        _session_memcached = server
    return _session_memcached.location


# -- Disposable servers: stop and start again on the same port ---------------------

_running: set[subprocess.Popen[bytes]] = set()
S = TypeVar("S", bound="DisposableServer")


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_running):
        process.kill()
        process.wait(timeout=10)


class DisposableServer:
    """One server process of a test's own; ``start()`` returns when it answers and
    ``stop()`` when its port refuses connections."""

    name = ""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.directory = Path(tempfile.mkdtemp(prefix=f"asynchrormous-{self.name}-"))

    @property
    def location(self) -> str:
        raise NotImplementedError

    @property
    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self: S, timeout: float = READY_TIMEOUT) -> S:
        """Start on a free port, or on the same port again after ``stop()``."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        self.port = self.port or free_port()
        with open(self.directory / "server.log", "ab") as out:
            process = subprocess.Popen(
                self.command(self.port), stdout=out, stderr=subprocess.STDOUT
            )
        self.process = process
        _running.add(process)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not answer on port {self.port} within "
                    f"{timeout:.0f} s:\n{self.log[-2000:]}"
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = READY_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until its port refuses."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        _running.discard(process)
        poll(
            lambda: refuses(self.port),
            timeout,
            f"port {self.port} still accepts connections after {self.name} stopped",
        )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DisposableRedis(DisposableServer):
    """A private redis-server: no persistence, its own port, database 0."""

    name = "redis-server"

    @property
    def location(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, port: int) -> list[str]:
        executable = shutil.which("redis-server")
        if executable is None:
            raise Unavailable(
                "redis-server is not installed: apt-get install redis-server"
            )
        return [
            executable,
            *("--bind", "127.0.0.1", "--port", str(port)),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--dir", str(self.directory)),
        ]

    def answers(self) -> bool:
        return redis_answers(self.port)


class DisposableMemcached(DisposableServer):
    """A private memcached: TCP only, 64 MB."""

    name = "memcached"

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        command = [memcached_binary(), "-l", "127.0.0.1", "-p", str(port)]
        command += ["-U", "0", "-m", "64"]
        if os.geteuid() == 0:  # memcached refuses to run as root without -u
            command += ["-u", "root"]
        return command

    def answers(self) -> bool:
        return memcached_answers(self.port)


# -- Fixtures: a test that needs a server it cannot have is skipped, saying why ------
# Import them by these names (``from tests.cache_servers import redis_fixture``) and
# ask for ``disposable_redis`` / ``disposable_memcached``.


@pytest.fixture(name="disposable_redis")
def redis_fixture() -> Iterator[DisposableRedis]:
    server = DisposableRedis()
    try:
        server.start()
    except Unavailable as exc:
        server.close()
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture(name="disposable_memcached")
def memcached_fixture() -> Iterator[DisposableMemcached]:
    server = DisposableMemcached()
    try:
        server.start()
    except Unavailable as exc:
        server.close()
        pytest.skip(str(exc))
    yield server
    server.close()
