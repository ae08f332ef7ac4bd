"""Real servers around the library: uvicorn serving an async view, a Twisted reactor."""

import json
import threading
import time
import urllib.request

import pytest
import uvicorn
from django.core.asgi import get_asgi_application
from twisted.internet import reactor

from asynchrormous.twisted import deferred
from tests.helpers import not_shared_cache
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

SLEEP = 0.3


@pytest.fixture
def asgi_server():
    """uvicorn on a free loopback port, in a thread of this process (same test DB)."""
    config = uvicorn.Config(
        get_asgi_application(), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, (
            "uvicorn did not start"
        )
        time.sleep(0.01)
    (port,) = {s.getsockname()[1] for srv in server.servers for s in srv.sockets}
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


@not_shared_cache
def test_uvicorn_serves_an_async_view_whose_gathered_queries_overlap(
    asgi_server, books, jobs
):
    pks = "&".join(f"pk={b.pk}" for b in books[:4])
    get_json(f"{asgi_server}/gathered/?{pks}")  # warm up: workers connect
    t0 = time.perf_counter()
    body = get_json(f"{asgi_server}/gathered/?sleep={SLEEP}&{pks}")
    elapsed = time.perf_counter() - t0
    assert body["titles"] == ["Book 0", "Book 1", "Book 2", "Book 3"]
    assert body["count"] == 6
    assert elapsed < 2 * SLEEP, elapsed
    assert body["view_thread"] == "uvicorn"  # the view ran on uvicorn's event loop
    workers = {job["thread"] for job in jobs[-5:]}
    assert all(name.startswith("asynchrormous-") for name in workers)
    assert len(workers) >= 4  # the four slow queries ran side by side


@pytest.fixture(scope="module")
def running_reactor():
    """The real reactor, on its own thread (a reactor runs once per process)."""
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not reactor.running:
        assert time.monotonic() < deadline, "reactor did not start"
        time.sleep(0.01)
    yield thread
    reactor.callFromThread(reactor.stop)
    thread.join(10)


def on_reactor(running_reactor, make):
    """Call ``make()`` on the reactor thread; wait, bounded, for its outcome."""
    done = threading.Event()
    outcome = {}

    def record(kind):
        def callback(value):
            outcome.update(kind=kind, value=value, thread=threading.current_thread())
            done.set()

        return callback

    def start():
        make().addCallbacks(record("value"), record("failure"))

    reactor.callFromThread(start)
    assert done.wait(30), "the Deferred never fired"
    assert outcome["thread"] is running_reactor
    return outcome


def test_twisted_deferreds_fire_on_the_reactor_thread(running_reactor, books, jobs):
    count = on_reactor(
        running_reactor, lambda: deferred(Book.objects.run_async().count())
    )
    assert count["kind"] == "value" and count["value"] == 6
    rows = on_reactor(running_reactor, lambda: deferred(Book.objects.filter(pages=100)))
    assert [b.title for b in rows["value"]] == ["Book 0"]
    missing = on_reactor(
        running_reactor, lambda: deferred(Book.objects.run_async().get(title="nope"))
    )
    assert missing["kind"] == "failure"
    assert missing["value"].check(Book.DoesNotExist)
    assert all(job["thread"].startswith("asynchrormous-") for job in jobs)
