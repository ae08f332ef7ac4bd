"""What the caching tests share: caching turned on, and each read's outcome."""

import threading

from asynchrormous.cache import invalidate
from asynchrormous.signals import cache_used

#: The backends every caching test runs on (tests/settings.py CACHES).
BACKENDS = ["redis", "locmem"]


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


def turn_on(settings, backend, **extra):
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
