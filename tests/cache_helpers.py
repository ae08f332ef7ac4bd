"""What the caching tests share: caching turned on, and each read's outcome."""

import threading

from asynchrormous.cache import invalidate
from asynchrormous.signals import cache_used
from tests.cache_servers import memcached_location, redis_location

#: The backends every caching test runs on.
BACKENDS = ["redis", "memcached", "locmem"]

#: Bounds on every call to a cache server that stops answering (check W004).
TIMEOUTS = {
    "redis": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    # pymemcache's HashClient answers nothing, without an error, for a while after
    # a failure, then skips a dead server for dead_timeout: report each failure,
    # and try it again at once (the library itself retries after RETRY).
    "memcached": {
        "timeout": 0.5,
        "connect_timeout": 0.5,
        "retry_attempts": 0,
        "dead_timeout": 0,
    },
}


def cache_settings(backend, location=None):
    """``settings.CACHES[backend]`` on its real server: this process's database of
    the shared Redis, this process's memcached (tests/cache_servers.py)."""
    if backend == "redis":
        return {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": location or redis_location(),
            "OPTIONS": TIMEOUTS["redis"],
        }
    if backend == "memcached":
        return {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": location or memcached_location(),
            "OPTIONS": TIMEOUTS["memcached"],
        }
    return {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "asynchrormous-tests",
    }


class Outcomes:
    """The ``cache_used`` outcomes of the test's cached reads, in order."""

    def __init__(self):
        self.seen = []
        self._lock = threading.Lock()

    def record(self, **kwargs):
        with self._lock:
            self.seen.append(kwargs)

    def take(self):
        """The outcomes since the last take(), and forget them."""
        with self._lock:
            taken, self.seen = [s["outcome"] for s in self.seen], []
        return taken


def turn_on(settings, backend, location=None, **extra):
    """Caching on, in ``backend`` (at ``location``: a disposable server's)."""
    settings.CACHES = {**settings.CACHES, backend: cache_settings(backend, location)}
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0, "CACHE": backend, **extra}
    # Rows of an earlier test (the database is emptied between tests, perhaps
    # while caching was off) must not answer this one.
    invalidate()


def recording():
    """Connect an Outcomes to ``cache_used``; disconnect with ``stop()``."""
    outcomes = Outcomes()
    cache_used.connect(outcomes.record, weak=False)
    outcomes.stop = lambda: cache_used.disconnect(outcomes.record)
    return outcomes


def slow_values(pk, seconds):
    """A cached read of a Gauge's value that takes ``seconds`` on the server."""
    from tests.helpers import sleep_expr
    from tests.testapp.models import Gauge

    rows = (
        Gauge.objects.annotate(nap=sleep_expr(seconds))
        .filter(pk=pk)
        .values_list("value", "nap")  # selected, so that the server sleeps
    )
    return [value for value, _ in rows]


def closing(fn):
    """``fn`` for a thread of the test's own: its connections closed at the end."""
    from django.db import connections

    def run(*args):
        try:
            return fn(*args)
        finally:
            connections.close_all()

    return run
