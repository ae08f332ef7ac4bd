import datetime
import os
import threading

import pytest

import asynchrormous
from asynchrormous.signals import job_finished
from tests.cache_helpers import BACKENDS, recording, turn_on
from tests.testapp.models import Author, Book, Publisher

# The reliability suite runs on its own (make reliability, tox's reliability envs).
if not os.environ.get("ASYNCHRORMOUS_RELIABILITY"):
    collect_ignore = ["reliability"]


@pytest.fixture(autouse=True)
def _stop_pool():
    """Each test starts with no pool, and worker connections never outlive a test."""
    yield
    asynchrormous.shutdown(timeout=30)


@pytest.fixture
def jobs():
    """The background jobs that ran during the test, as job_finished reported them."""
    seen = []
    lock = threading.Lock()

    def record(**kwargs):
        with lock:
            seen.append(kwargs)

    job_finished.connect(record, weak=False)
    yield seen
    job_finished.disconnect(record)


@pytest.fixture
def one_busy_worker(settings):
    """WORKERS=1 (CALLER_RUNS off), that worker held until ``release`` is set
    (bounded): a job the test submits stays queued meanwhile."""
    from tests.helpers import occupy_a_worker

    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    release = threading.Event()
    blocker = occupy_a_worker(release)
    yield release
    release.set()
    assert blocker.result(10) is True


@pytest.fixture
def busy_pool(settings):
    """CALLER_RUNS on, WORKERS=1, and that worker held until ``release`` is set
    (bounded): a job the test submits is queued, for its caller to take over."""
    from tests.helpers import occupy_a_worker

    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0, "CALLER_RUNS": True}
    release = threading.Event()
    blocker = occupy_a_worker(release)
    yield release
    release.set()
    assert blocker.result() is True


@pytest.fixture(params=BACKENDS)
def caching(request, settings):
    """Caching on (tests/cache_helpers.py), in each backend; yields the Outcomes
    of the test's cached reads."""
    turn_on(settings, request.param)
    outcomes = recording()
    yield outcomes
    outcomes.stop()


@pytest.fixture
def books(db):
    a1 = Author.objects.create(name="Ann")
    a2 = Author.objects.create(name="Bob")
    pub = Publisher.objects.create(name="Pub")
    created = [
        Book.objects.create(
            title=f"Book {i}",
            author=a1 if i % 2 else a2,
            publisher=pub,
            pages=100 + i * 10,
            year=1990 + i,
            published=datetime.date(1990 + i // 2, 1 + i, 1),
        )
        for i in range(6)
    ]
    return created
