"""W7, query caching: one contender in a child process of run.py.

    python benchmarks/cache_worker.py plain|asynchrormous|cachalot|cacheops
    python benchmarks/cache_worker.py asynchrormous-locmem  # LocMemCache, no Redis

cachalot and cacheops patch Django for the whole process, so each contender runs in a
process of its own, all from the same virtualenv (.venv-bench-cache: the main
process's Django, and both packages). run.py sends one JSON line per task, in a new
random order each round; this process runs it and answers one JSON line:

- ``{"op": "hit_get"}``: the seconds of one operation, run right after an untimed run
  of the same kind (a hit's is what makes it a hit, even after a write emptied the
  table's entries); a miss asks for a query this process never ran; a write
  updates one row.
- ``{"op": "hit_get", "probe": true}``: instead of the time, the Redis round trips
  and SQL statements of one operation.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
CONTENDER = sys.argv[1] if len(sys.argv) > 1 else ""
os.environ["BENCH_W7_CONTENDER"] = CONTENDER
os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.cache_settings"

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402
from django.db.models import F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BUCKETS,
    ROWS_PER_BUCKET,
    W7_HIT,
    W7_MISS_SPAN,
    W7_OPS,
    W7_REDIS_DBS,
    W7_WRITE_PKS,
    W7_WRITE_SPAN,
)

if CONTENDER.startswith("asynchrormous"):
    from benchmarks.benchapp.models import Item

    def queryset() -> Any:
        return Item.objects.cache()

    def writes() -> Any:
        return Item.objects.all()

elif CONTENDER == "cacheops":
    from benchmarks.cacheapp.models import Item  # type: ignore[assignment]

    def queryset() -> Any:
        return Item.objects.cache()

    def writes() -> Any:
        return Item.objects.all()

else:  # plain Django, and cachalot, which caches every query on the table
    from benchmarks.cacheapp.models import Item  # type: ignore[assignment]

    def queryset() -> Any:
        return Item.objects.all()

    def writes() -> Any:
        return Item.objects.all()


# -- The operations: each of ``x``, a primary key or a bound --------------------------


def get(x: int) -> Any:
    return queryset().get(pk=x)


def count(x: int) -> Any:
    return queryset().filter(bucket=1, pk__gt=x).count()


def fetch_100(x: int) -> Any:
    return list(queryset().filter(pk__gt=x).order_by("pk")[:100])


ROWS = BUCKETS * ROWS_PER_BUCKET


def check(what: str, x: int, result: Any) -> None:
    """A fast answer must be the right one (rows: pk 1 + i, bucket i % 4)."""
    if what == "get":
        right = result.pk == x
    elif what == "count":
        right = result == (ROWS + 2) // 4 - (x + 2) // 4  # pks ≡ 2 (mod 4) above x
    else:
        right = [row.pk for row in result] == list(range(x + 1, x + 101))
    if not right:
        raise AssertionError(f"{what}({x}) answered {result!r}")


def update(x: int) -> Any:
    qs = writes().filter(pk=x)
    if CONTENDER == "cacheops":
        # cacheops invalidates nothing on a plain update(); this is its way to.
        return qs.invalidated_update(value=F("value"))
    return qs.update(value=F("value"))


saving: dict[int, Any] = {}


def save(x: int) -> Any:
    saving[x].save(update_fields=["value"])


READS: dict[str, Callable[[int], Any]] = {
    "get": get,
    "count": count,
    "fetch_100": fetch_100,
}


class Op:
    """One of W7's operations; ``next()`` is the argument of its next run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kind, _, what = name.partition("_")
        self.runs = 0
        if self.kind in ("hit", "miss"):
            self.call = READS[what]
        else:
            self.call = update if name == "update" else save

    def next(self) -> int:
        i, self.runs = self.runs, self.runs + 1
        if self.kind == "hit":
            return W7_HIT[self.name.partition("_")[2]]
        if self.kind == "miss":
            # A query this process has not run: its own bound, never a hit's.
            start = W7_HIT["count"] + 1 if self.name == "miss_count" else 1
            return start + i % W7_MISS_SPAN
        pk = W7_WRITE_PKS + i % W7_WRITE_SPAN
        if self.name == "save" and pk not in saving:
            saving[pk] = writes().get(pk=pk)  # fetched once, untimed
        return pk

    def prepare(self) -> int:
        """Run the operation once untimed, so that every timed run comes right after
        one of its kind (a process woken from reading stdin is slower, the more so
        the more code the operation runs); a hit's, with the argument it will be
        timed with, is what makes it a hit whatever wrote to the table since."""
        x = self.next()
        self.call(x)
        return x if self.kind == "hit" else self.next()

    def run(self) -> float:
        x = self.prepare()
        before = statements[0]
        started = time.perf_counter()
        result = self.call(x)
        elapsed = time.perf_counter() - started
        if self.kind in ("hit", "miss"):
            check(self.name.partition("_")[2], x, result)
            # A cache that stopped answering (an outage) turns hits into queries.
            ran = statements[0] - before
            expected = 0 if self.kind == "hit" and CONTENDER != "plain" else 1
            if ran != expected:
                raise AssertionError(
                    f"{self.name}({x}) ran {ran} SQL statements, not {expected}"
                )
        return elapsed

    def probe(self) -> dict[str, int]:
        x = self.prepare()
        with Counting() as counts:
            self.call(x)
        return counts


class Counting:
    """Count Redis round trips (sends of a packed command: a pipeline is one) and
    SQL statements while the block runs."""

    def __enter__(self) -> dict[str, int]:
        self.counts = {"redis": 0, "sql": 0}
        try:
            import redis.connection as rc
        except ImportError:
            self.patched = None
        else:
            cls = getattr(rc, "AbstractConnection", rc.Connection)
            self.patched = (cls, cls.send_packed_command)
            original = cls.send_packed_command
            counts = self.counts

            def send_packed_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
                counts["redis"] += 1
                return original(conn, *args, **kwargs)

            cls.send_packed_command = send_packed_command  # type: ignore[method-assign]
        self.wrapper = connection.execute_wrapper(self.sql)
        self.wrapper.__enter__()
        return self.counts

    def sql(self, execute: Any, sql: str, params: Any, many: bool, ctx: Any) -> Any:
        self.counts["sql"] += 1
        return execute(sql, params, many, ctx)

    def __exit__(self, *exc_info: object) -> None:
        self.wrapper.__exit__(*exc_info)
        if self.patched is not None:
            cls, original = self.patched
            cls.send_packed_command = original  # type: ignore[method-assign]


def flush() -> None:
    """Empty this contender's own Redis database, and nothing else."""
    if CONTENDER == "cacheops":
        from cacheops.redis import redis_client

        redis_client.flushdb()
    elif CONTENDER != "plain":
        from django.core.cache import cache

        cache.clear()  # Django's RedisCache: FLUSHDB of its own database


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "django": django.get_version()}
    for package in ("psycopg", "redis", "django-cachalot", "django-cacheops"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    if CONTENDER in W7_REDIS_DBS:
        import redis
        from django.conf import settings

        client = redis.Redis.from_url(settings.REDIS_URL)
        out["redis-server"] = client.info("server")["redis_version"]
        client.close()
    return out


statements = [0]  # SQL statements this process ran


def count_statements(
    execute: Any, sql: str, params: Any, many: bool, context: Any
) -> Any:
    statements[0] += 1
    return execute(sql, params, many, context)


def main() -> None:
    ops = {name: Op(name) for name in W7_OPS}
    flush()
    connection.ensure_connection()
    # Last, so it counts what reaches the database; in every contender alike.
    connection.execute_wrappers.append(count_statements)
    print(json.dumps({"ready": True, "versions": versions()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        task = json.loads(line)
        op = ops[task["op"]]
        try:
            if task.get("probe"):
                answer: dict[str, Any] = {"counts": op.probe()}
            else:
                answer = {"t": op.run()}
        except Exception as exc:  # reported by run.py, which stops this contender
            answer = {"error": f"{task['op']}: {type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    if CONTENDER.startswith("asynchrormous"):
        from asynchrormous import shutdown

        shutdown()
    connection.close()


if __name__ == "__main__":
    main()
