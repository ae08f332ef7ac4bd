"""Contender D, django-async-backend, as a child process of run.py.

It needs Python 3.12+ and Django 6.1, so it runs in its own virtualenv. run.py sends
one workload name per line on stdin when D's turn comes in a round; this process runs
it once on its single event loop and answers one JSON line: the elapsed seconds (and,
for W4, the throughput, connection and reconnect counts).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.d_settings"

import django

django.setup()

from django_async_backend.db import async_connections, async_new_connection  # noqa: E402

from benchmarks.common import (  # noqa: E402
    W4_BATCHES,
    W4_CALLERS,
    WORKLOADS,
    ConnectionSampler,
    build,
)
from benchmarks.dapp.models import Item  # noqa: E402


async def run_op(kind: str, qs: Any) -> Any:
    # A connection per task, from the pool: the package's way to run in parallel.
    async with async_new_connection():
        if kind == "list":
            return [obj async for obj in qs]
        if kind == "count":
            return await qs.acount()
        return await qs.aget()


async def batch(workload: str) -> float:
    ops = [build(Item.async_objects, op) for op in WORKLOADS[workload]]
    started = time.perf_counter()
    await asyncio.gather(*(run_op(kind, qs) for kind, qs in ops))
    return time.perf_counter() - started


async def many_callers() -> dict[str, Any]:
    async def caller() -> None:
        for _ in range(W4_BATCHES):
            ops = [build(Item.async_objects, op) for op in WORKLOADS["W4"]]
            await asyncio.gather(*(run_op(kind, qs) for kind, qs in ops))

    pool = async_connections["default"].pool
    opened = pool.get_stats().get("connections_num", 0)
    sampler = ConnectionSampler("bench-d")
    sampler.start()
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(W4_CALLERS)))
    elapsed = time.perf_counter() - started
    return {
        "t": elapsed,
        "queries": W4_CALLERS * W4_BATCHES * len(WORKLOADS["W4"]),
        "max_connections": sampler.stop(),
        # Connections the pool had to open during the run: reconnects.
        "reconnects": pool.get_stats().get("connections_num", 0) - opened,
    }


def main() -> None:
    loop = asyncio.new_event_loop()
    versions = {
        "python": platform.python_version(),
        "django": django.get_version(),
        "django-async-backend": version("django-async-backend"),
        "psycopg": version("psycopg"),
        "psycopg-pool": version("psycopg-pool"),
    }
    print(json.dumps({"ready": True, "versions": versions}), flush=True)
    for line in sys.stdin:
        workload = line.strip()
        if not workload:
            break
        if workload == "W4":
            answer = loop.run_until_complete(many_callers())
        else:
            answer = {"t": loop.run_until_complete(batch(workload))}
        print(json.dumps(answer), flush=True)
    loop.run_until_complete(async_connections["default"].close_pool())
    loop.close()


if __name__ == "__main__":
    main()
