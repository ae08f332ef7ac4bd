"""What both benchmark processes share: the database, the workloads, the sampler.

Imported by the main process (Django 5.2, asynchrormous) and by contender D's process
(Django 6.1, django-async-backend), so it imports Django only inside functions.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

DB_NAME = os.environ.get("BENCH_DB", "asynchrormous_bench")
DB_HOST = os.environ.get("BENCH_DB_HOST", "127.0.0.1")
DB_PORT = int(os.environ.get("BENCH_DB_PORT", "5432"))
DB_USER = os.environ.get("BENCH_DB_USER", "postgres")
WORKERS = 8  # ASYNCHRORMOUS["WORKERS"], C's pool size and D's pool size

BUCKETS = 4
ROWS_PER_BUCKET = 5_000
W1_SLEEP = 0.020  # seconds of server time per W1 query
W4_SLEEP = 0.005  # per W4 query: 16 callers x 8 queries would otherwise take long
W4_CALLERS = 16
W4_BATCHES = 8  # per caller, per sample
W5_OWNERS = 50
W5_KINDS = 4  # one prefetch lookup per kind
W5_PARTS = 2  # per owner and kind
W5_SLEEP = 0.020  # per W5 query: the main query and each lookup
W6_WORKERS = 4  # W6: a small pool, kept busy by W6_CALLERS callers running W4's batch
W6_CALLERS = 16
# W7, query caching: each caching contender's own Redis database on 127.0.0.1:6379
# (the tests claim 1 to 12), which its process empties when it starts.
W7_REDIS_DBS = {"asynchrormous": 13, "cachalot": 14, "cacheops": 15}
# The argument of each hit: get(pk=), filter(bucket=1, pk__gt=).count(), and
# filter(pk__gt=).order_by("pk")[:100]. Misses take others, never these.
W7_HIT = {"get": 15_001, "count": 10_000, "fetch_100": 15_000}
W7_MISS_SPAN = 4_000  # misses per operation before an argument comes round again
W7_WRITE_PKS = 19_001  # writes update the value (unchanged) of rows from here on
W7_WRITE_SPAN = 1_000
W7_OPS = [
    "hit_get",
    "hit_count",
    "hit_fetch_100",
    "miss_get",
    "miss_count",
    "miss_fetch_100",
    "update",
    "save",
]

# (kind, filter kwargs, server-side sleep in seconds); kind is list, count or get.
Op = tuple[str, dict[str, Any], float]


def _w1(sleep: float) -> list[Op]:
    # Four fetches of one row and four counts of a bucket, each with `sleep` on the
    # server: the shape of a dashboard view.
    return [
        ("list", {"pk": 1 + 997 * i}, sleep)
        if i % 2 == 0
        else ("count", {"bucket": i % BUCKETS}, sleep)
        for i in range(8)
    ]


WORKLOADS: dict[str, list[Op]] = {
    "W1": _w1(W1_SLEEP),
    "W2": [("get", {"pk": 1 + 2_503 * i}, 0.0) for i in range(8)],
    "W2-1": [("get", {"pk": 4_242}, 0.0)],
    "W3": [("list", {"bucket": b}, 0.0) for b in range(BUCKETS)],
    "W4": _w1(W4_SLEEP),
    "W6": [("get", {"pk": 4_242}, 0.0)],
}


def sleep_filter(sleep: float) -> Any:
    """A filter that makes the server sleep ``sleep`` seconds, once per query."""
    from django.db.models import BooleanField
    from django.db.models.expressions import RawSQL

    # An uncorrelated EXISTS is an InitPlan: the server sleeps once per query.
    return RawSQL(
        "EXISTS (SELECT 1 FROM pg_sleep(%s))", (sleep,), output_field=BooleanField()
    )


def build(manager: Any, op: Op) -> tuple[str, Any]:
    """``(kind, queryset)`` for ``op`` on ``manager``; a fresh, unevaluated queryset."""
    kind, filters, sleep = op
    qs = manager.filter(**filters)
    if sleep:
        qs = qs.filter(sleep_filter(sleep))
    return kind, qs


def evaluate(kind: str, qs: Any) -> Any:
    """Plain Django's evaluation of a built op, on the calling thread."""
    if kind == "list":
        return list(qs)
    if kind == "count":
        return qs.count()
    return qs.get()


def connect(**kwargs: Any) -> psycopg.Connection[Any]:
    params = {"dbname": DB_NAME, "host": DB_HOST, "port": DB_PORT, "user": DB_USER}
    return psycopg.connect(**{**params, **kwargs})


class ConnectionSampler(threading.Thread):
    """Polls pg_stat_activity for the connections named ``application_name``.

    The sampler's own connection has another name, so it is never counted.
    """

    def __init__(self, application_name: str, interval: float = 0.002) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.application_name = application_name
        self.interval = interval
        self.max = 0
        self.samples = 0
        self._stop_event = threading.Event()
        self._conn = connect(application_name="bench-sampler", autocommit=True)

    def run(self) -> None:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        with self._conn:
            while not self._stop_event.is_set():
                row = self._conn.execute(sql, (self.application_name,)).fetchone()
                self.max = max(self.max, row[0] if row else 0)
                self.samples += 1
                time.sleep(self.interval)

    def stop(self) -> int:
        """Stop sampling; the largest number of connections seen."""
        self._stop_event.set()
        self.join()
        return self.max
