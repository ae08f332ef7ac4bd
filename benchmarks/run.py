"""Benchmarks of asynchrormous against plain Django and the alternatives (issue #8).

    python benchmarks/run.py [--rounds N] [--w4-rounds N] [--quick] [--workloads W5]
    python benchmarks/run.py --only W2,W6 [--quick]   # those workloads, no D, no report

Creates and fills its own PostgreSQL database, starts contender D in its own
virtualenv (Python 3.12+, Django 6.1, django-async-backend), runs every contender on
every workload in random order per round, and writes benchmarks/RESULTS.md and
benchmarks/results.png. Needs matplotlib in the running interpreter. With only some
workloads (``--workloads W5``), it prints their tables and writes nothing. W7
(caching, benchmarks/w7.py) also needs Redis on 127.0.0.1:6379 and makes its own
virtualenv, .venv-bench-cache, for django-cachalot and django-cacheops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks import w7  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BUCKETS,
    DB_NAME,
    ROWS_PER_BUCKET,
    W1_SLEEP,
    W4_BATCHES,
    W4_CALLERS,
    W4_SLEEP,
    W5_KINDS,
    W5_OWNERS,
    W5_PARTS,
    W5_SLEEP,
    W6_CALLERS,
    W6_WORKERS,
    WORKERS,
    WORKLOADS,
    ConnectionSampler,
    build,
    connect,
    evaluate,
    sleep_filter,
)

D_VENV = ROOT / ".venv-bench-d"
D_REQUIREMENTS = ["Django>=6.1,<6.2", "django-async-backend[binary,pool]>=6.1,<6.2"]

LABELS = {
    "A": "A: plain Django, sequential",
    "B": "B: Django a* + asyncio.gather",
    "C": "C: ThreadPoolExecutor(8)",
    "D": "D: django-async-backend + gather",
    "sync": "asynchrormous start() / lazy",
    "async": "asynchrormous await + gather",
    "limit": "limit: slowest single query",
}
LIMIT_LABELS = {"W5": "limit: main query + slowest lookup"}
CONTENDERS = ["A", "B", "C", "D", "sync", "async"]
OURS = ["sync", "async"]
# W5 is one queryset: nothing for a thread pool (C) to overlap, and D's
# prefetch_related() runs its lookups one after another, as Django's does.
W5_CONTENDERS = ["A", "B", "sync", "async"]
FULL_REPORT = {"W1", "W2", "W3", "W4"}  # what RESULTS.md needs
TITLES = {
    "W1": f"W1 overlap: 8 queries of {W1_SLEEP * 1000:.0f} ms server time",
    "W2": "W2 overhead: 8 primary-key lookups",
    "W2-1": "W2 overhead: 1 primary-key lookup",
    "W3": f"W3 fat rows: {BUCKETS} queries of {ROWS_PER_BUCKET:,} rows",
    "W4": f"W4 many callers: {W4_CALLERS} callers x {W4_BATCHES} batches of 8 "
    f"queries of {W4_SLEEP * 1000:.0f} ms",
    "W5": f"W5 prefetch: {W5_OWNERS} rows and {W5_KINDS} prefetch lookups, every "
    f"query {W5_SLEEP * 1000:.0f} ms",
    "W6": f"W6 busy pool: one pk lookup while {W6_CALLERS} callers keep "
    f"WORKERS={W6_WORKERS} busy",
    "W7": w7.TITLE,
}
SIDES = {"sync": "start() / lazy", "async": "await + gather", "cache": ".cache()"}
# W6's contenders: C's pool and D's process are not the pool kept busy.
W6_CONTENDERS = ["A", "sync", "async"]


# -- Setup ------------------------------------------------------------------------


def django_setup(application_name: str = "bench") -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    os.environ["BENCH_APP_NAME"] = application_name
    import django

    django.setup()


def create_database() -> None:
    """Create the database if needed, its table, and the rows the workloads read."""
    with connect(dbname="postgres", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    from django.core.management import call_command

    from benchmarks.benchapp.models import Item

    call_command("migrate", run_syncdb=True, verbosity=0)
    if Item.plain.count() != BUCKETS * ROWS_PER_BUCKET:
        Item.plain.all().delete()
        start = datetime(2020, 1, 1, tzinfo=timezone.utc)
        Item.plain.bulk_create(
            Item(
                pk=1 + i,
                bucket=i % BUCKETS,
                name=f"item {i:05d}",
                value=i,
                score=i / 7,
                flag=i % 3 == 0,
                created=start + timedelta(minutes=i),
            )
            for i in range(BUCKETS * ROWS_PER_BUCKET)
        )
    from benchmarks.benchapp.models import Owner, Part

    if Part.plain.count() != W5_OWNERS * W5_KINDS * W5_PARTS:
        Part.plain.all().delete()
        Owner.plain.all().delete()
        owners = Owner.plain.bulk_create(
            Owner(pk=1 + i, name=f"owner {i:02d}") for i in range(W5_OWNERS)
        )
        Part.plain.bulk_create(
            Part(owner=owner, kind=i % W5_KINDS, name=f"part {owner.pk}.{i}")
            for owner in owners
            for i in range(W5_KINDS * W5_PARTS)
        )
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("benchapp_item", "benchapp_owner", "benchapp_part"):
            cursor.execute(f"VACUUM ANALYZE {table}")


# -- In-process contenders: each runs one workload once and returns its seconds ------

Ops = list[tuple[str, Any]]


def ops_for(workload: str, plain: bool) -> Ops:
    from benchmarks.benchapp.models import Item

    manager = Item.plain if plain else Item.objects
    return [build(manager, op) for op in WORKLOADS[workload]]


def w5_queryset(plain: bool) -> Any:
    """W5: a slow query of 50 rows with 4 independent, slow prefetch lookups."""
    from django.db.models import Prefetch

    from benchmarks.benchapp.models import Owner, Part

    owners, parts = (
        (Owner.plain, Part.plain) if plain else (Owner.objects, Part.objects)
    )
    return owners.filter(sleep_filter(W5_SLEEP)).prefetch_related(
        *(
            Prefetch(
                "parts",
                parts.filter(kind=kind).filter(sleep_filter(W5_SLEEP)),
                to_attr=f"kind_{kind}",
            )
            for kind in range(W5_KINDS)
        )
    )


def run_a_w5() -> tuple[float, float]:
    """Plain Django's W5; the limit is its main query plus its slowest lookup."""
    from django.db import connection

    times: list[float] = []

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        t = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            times.append(time.perf_counter() - t)

    qs = w5_queryset(plain=True)
    started = time.perf_counter()
    with connection.execute_wrapper(timed):
        rows = list(qs)
    elapsed = time.perf_counter() - started
    assert len(rows) == W5_OWNERS and len(times) == 1 + W5_KINDS, len(times)
    return elapsed, times[0] + max(times[1:])


def run_a(ops: Ops) -> tuple[float, float]:
    """Plain Django; also the slowest single query of the batch (the limit)."""
    slowest = 0.0
    started = time.perf_counter()
    for kind, qs in ops:
        t = time.perf_counter()
        evaluate(kind, qs)
        slowest = max(slowest, time.perf_counter() - t)
    return time.perf_counter() - started, slowest


async def django_aeval(kind: str, qs: Any) -> Any:
    if kind == "list":
        return [obj async for obj in qs]
    if kind == "count":
        return await qs.acount()
    return await qs.aget()


async def ours_aeval(kind: str, qs: Any) -> Any:
    if kind == "list":
        return await qs
    if kind == "count":
        return await qs.acount()
    return await qs.aget()


async def gather(
    aeval: Callable[[str, Any], Coroutine[Any, Any, Any]], ops: Ops
) -> Any:
    return await asyncio.gather(*(aeval(kind, qs) for kind, qs in ops))


def start_all(ops: Ops) -> list[Any]:
    """asynchrormous's sync side: everything running before anything is used."""
    pending = []
    for kind, qs in ops:
        qs = qs.run_async()
        if kind == "list":
            pending.append(qs.start())
        elif kind == "count":
            pending.append(qs.count())
        else:
            pending.append(qs.get())
    return pending


def use_all(pending: list[Any]) -> None:
    from asynchrormous import resolve

    for value in pending:
        resolve(value)


class InProcess:
    """The contenders that run in this process, with their long-lived resources."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="C")

    def run(self, name: str, workload: str) -> dict[str, float]:
        if workload == "W5":
            return self.run_w5(name)
        ops = ops_for(workload, plain=name in ("A", "B", "C"))
        if name == "A":
            t, slowest = run_a(ops)
            return {"t": t, "limit": slowest}
        started = time.perf_counter()
        if name == "B":
            self.loop.run_until_complete(gather(django_aeval, ops))
        elif name == "C":
            futures = [self.executor.submit(evaluate, k, qs) for k, qs in ops]
            for future in futures:
                future.result()
        elif name == "sync":
            use_all(start_all(ops))
        elif name == "async":
            self.loop.run_until_complete(gather(ours_aeval, ops))
        else:
            raise ValueError(name)
        return {"t": time.perf_counter() - started}

    def run_w5(self, name: str) -> dict[str, float]:
        if name == "A":
            t, limit = run_a_w5()
            return {"t": t, "limit": limit}
        qs = w5_queryset(plain=name == "B")
        started = time.perf_counter()
        if name == "B":
            rows = self.loop.run_until_complete(django_aeval("list", qs))
        elif name == "sync":
            from asynchrormous import resolve

            rows = list(resolve(qs.start()))
        elif name == "async":
            rows = self.loop.run_until_complete(ours_aeval("list", qs))
        else:
            raise ValueError(name)
        elapsed = time.perf_counter() - started
        assert len(rows) == W5_OWNERS and len(rows[0].kind_0) == W5_PARTS
        return {"t": elapsed}


# -- Contender D: django-async-backend in its own process --------------------------


def find_python312() -> str | None:
    for candidate in ("python3.12", "python3.13"):
        found = subprocess.run(
            ["pyenv", "prefix", candidate.removeprefix("python")],
            capture_output=True,
            text=True,
        )
        if found.returncode == 0:
            for prefix in found.stdout.split(":"):
                path = Path(prefix.strip()) / "bin" / "python3"
                if path.exists():
                    return str(path)
    import shutil

    return shutil.which("python3.12") or shutil.which("python3.13")


class DProcess:
    """django-async-backend's process; ``error`` says why it could not run."""

    def __init__(self, python: str | None, skip: str | None = None) -> None:
        self.error: str | None = skip
        self.versions: dict[str, str] = {}
        self.proc: subprocess.Popen[str] | None = None
        if skip is not None:
            return
        try:
            exe = python or self._venv()
            self.proc = subprocess.Popen(
                [exe, str(HERE / "d_worker.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            self.versions = self._answer()["versions"]
        except Exception as exc:  # reported in RESULTS.md, the rest still runs
            self.error = f"{type(exc).__name__}: {exc}"
            self.close()

    def _venv(self) -> str:
        exe = D_VENV / "bin" / "python"
        if exe.exists():
            return str(exe)
        base = find_python312()
        if base is None:
            raise RuntimeError("no Python 3.12+ found for django-async-backend")
        for cmd in (
            [base, "-m", "venv", str(D_VENV)],
            [str(exe), "-m", "pip", "install", "--quiet", *D_REQUIREMENTS],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        return str(exe)

    def _answer(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"d_worker.py exited:\n{stderr[-2000:]}")
        return json.loads(line)

    def run(self, workload: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


# -- W4: 16 callers, each contender in a fresh process of its own ------------------


def w4_child(name: str) -> None:
    """Run W4 for ``name`` in this process and print one JSON line."""
    application_name = f"bench-w4-{os.getpid()}"
    django_setup(application_name)
    from django.db.backends.signals import connection_created

    created: list[str] = []

    def on_created(**kwargs: Any) -> None:
        created.append(threading.current_thread().name)

    connection_created.connect(on_created, weak=False)
    contenders = InProcess()

    sampler = ConnectionSampler(application_name)
    sampler.start()  # from the warm-up on: connections are never to exceed WORKERS

    def threaded() -> float:
        warm, go = threading.Barrier(W4_CALLERS + 1), threading.Barrier(W4_CALLERS + 1)

        def caller() -> None:
            contenders.run(name, "W4")  # warm-up: threads and connections
            warm.wait()
            go.wait()
            for _ in range(W4_BATCHES):
                contenders.run(name, "W4")

        threads = [
            threading.Thread(target=caller, name=f"caller-{i}")
            for i in range(W4_CALLERS)
        ]
        for thread in threads:
            thread.start()
        warm.wait()
        created.clear()  # from here on, a new connection is a reconnect
        go.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    async def tasks() -> float:
        aeval = django_aeval if name == "B" else ours_aeval

        async def caller(batches: int) -> None:
            for _ in range(batches):
                await gather(aeval, ops_for("W4", plain=name == "B"))

        await asyncio.gather(*(caller(1) for _ in range(W4_CALLERS)))
        created.clear()
        started = time.perf_counter()
        await asyncio.gather(*(caller(W4_BATCHES) for _ in range(W4_CALLERS)))
        return time.perf_counter() - started

    if name in ("B", "async"):
        elapsed = contenders.loop.run_until_complete(tasks())
    else:
        elapsed = threaded()
    answer = {
        "t": elapsed,
        "queries": W4_CALLERS * W4_BATCHES * len(WORKLOADS["W4"]),
        "max_connections": sampler.stop(),
        "reconnects": len(created),
        "reconnect_threads": sorted(Counter(created).items()),
    }
    print(json.dumps(answer), flush=True)
    from asynchrormous import shutdown

    shutdown()


def run_w4(name: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--w4-child", name],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode:
        raise RuntimeError(f"W4 child {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- W6: one caller's small query while the pool is kept busy ------------------------


def w6_child(samples: int, seed: int) -> None:
    """Run W6 in this process (WORKERS=W6_WORKERS) and print one JSON line.

    W6_CALLERS threads run W4's batch through asynchrormous in a loop, so its small
    pool always has a queue; meanwhile this thread times one primary-key lookup,
    its contenders interleaved in random order.
    """
    django_setup(f"bench-w6-{os.getpid()}")
    from asynchrormous import shutdown
    from asynchrormous.pool import get_pool

    contenders = InProcess()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            contenders.run("sync", "W4")

    threads = [
        threading.Thread(target=load, name=f"load-{i}") for i in range(W6_CALLERS)
    ]
    for thread in threads:
        thread.start()
    rng = random.Random(seed)
    for name in W6_CONTENDERS * 5:  # warm-up: connections, the loop
        contenders.run(name, "W6")
    tasks = [name for name in W6_CONTENDERS for _ in range(samples)]
    rng.shuffle(tasks)
    out: dict[str, Any] = {name: [] for name in W6_CONTENDERS}
    queued = []
    pool = get_pool()
    for name in tasks:
        time.sleep(rng.uniform(0.001, 0.004))
        queued.append(pool._queue.qsize())
        out[name].append(contenders.run(name, "W6")["t"])
    stop.set()
    for thread in threads:
        thread.join()
    out["queued"] = queued
    print(json.dumps(out), flush=True)
    shutdown()


def run_w6(samples: int, seed: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--w6-child",
            str(samples),
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "BENCH_WORKERS": str(W6_WORKERS), "BENCH_CALLER_RUNS": "1"},
    )
    if done.returncode:
        raise RuntimeError(f"W6 child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- Rounds --------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    w4: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: W6's latencies by contender, and the pool's queue length at each sample.
    w6: dict[str, list[float]] = field(default_factory=dict)
    created_threads: Counter[str] = field(default_factory=Counter)
    w7: w7.W7Results | None = None

    def add(self, workload: str, name: str, seconds: float) -> None:
        self.samples.setdefault((workload, name), []).append(seconds)

    def median(self, workload: str, name: str) -> float:
        return statistics.median(self.samples[workload, name])


def measure(
    args: argparse.Namespace, d: DProcess, log: Callable[[str], None]
) -> Results:
    from django.db.backends.signals import connection_created

    contenders = InProcess()
    names = [c for c in CONTENDERS if c != "D" or d.error is None]
    results = Results()
    created: list[str] = []

    def on_created(**kwargs: Any) -> None:
        created.append(threading.current_thread().name)

    connection_created.connect(on_created, weak=False)
    # W2 is cheap and noisy: more samples of it in each round.
    repeats = {
        "W1": 1,
        "W2": args.w2_repeats,
        "W2-1": args.w2_repeats,
        "W3": 1,
        "W5": 1,
    }
    tasks = [
        (w, c)
        for w, n in repeats.items()
        if w.partition("-")[0] in args.workloads
        for c in names
        if w != "W5" or c in W5_CONTENDERS
        for _ in range(n)
    ]
    rng = random.Random(args.seed)
    for round_no in range(-args.warmup, args.rounds if tasks else -args.warmup):
        rng.shuffle(tasks)
        if round_no == 0:
            created.clear()  # from here on, a new connection is a reconnect
        for workload, name in tasks:
            if name == "D":
                answer = d.run(workload)
            else:
                answer = contenders.run(name, workload)
            if round_no >= 0:
                results.add(workload, name, answer["t"])
                if "limit" in answer:
                    results.add(workload, "limit", answer["limit"])
        if round_no >= 0 and (round_no + 1) % 5 == 0:
            log(f"round {round_no + 1}/{args.rounds}")
    results.created_threads = Counter(created)
    from asynchrormous import shutdown

    shutdown()
    contenders.executor.shutdown()

    w4_names = [c for c in CONTENDERS if c != "D" or d.error is None]
    for round_no in range(args.w4_rounds if "W4" in args.workloads else 0):
        rng.shuffle(w4_names)
        for name in w4_names:
            answer = d.run("W4") if name == "D" else run_w4(name)
            results.w4.setdefault(name, []).append(answer)
        log(f"W4 round {round_no + 1}/{args.w4_rounds}")
    if "W6" in args.workloads:
        results.w6 = run_w6(args.w6_samples, args.seed)
        log("W6")
    if "W7" in args.workloads:
        results.w7 = w7.measure(
            args.rounds, args.warmup, args.w7_repeats, args.seed, args.cache_python, log
        )
        log("W7")
    return results


# -- Report --------------------------------------------------------------------------


@dataclass
class Target:
    workload: str
    contender: str
    text: str
    value: str
    passed: bool


def targets(r: Results) -> list[Target]:
    out = []
    m = r.median
    for c in OURS:
        lim, a, b = m("W1", "limit"), m("W1", "A"), m("W1", "B")
        x = m("W1", c)
        out.append(
            Target("W1", c, "≤ 1.15x the limit", f"{x / lim:.2f}x", x <= 1.15 * lim)
        )
        out.append(Target("W1", c, "≥ 6x faster than A", f"{a / x:.1f}x", a >= 6 * x))
        out.append(Target("W1", c, "≥ 6x faster than B", f"{b / x:.1f}x", b >= 6 * x))
        for other in ("C", "D"):
            if ("W1", other) in r.samples:
                y = m("W1", other)
                out.append(
                    Target(
                        "W1",
                        c,
                        f"no slower than {other}",
                        f"{x / y:.2f}x {other}'s time",
                        x <= y,
                    )
                )
        # Issue 15: a background query adds no more than a bare thread pool's hop.
        added = (m("W2-1", c) - m("W2-1", "A")) * 1e6
        bare = (m("W2-1", "C") - m("W2-1", "A")) * 1e6
        out.append(
            Target(
                "W2",
                c,
                "added cost ≤ C's (a bare pool's hop)",
                f"{added:+.0f} µs (C: {bare:+.0f} µs)",
                added <= bare,
            )
        )
        x, a = m("W2", c), m("W2", "A")
        out.append(
            Target("W2", c, "batch of 8 not slower than A", f"{x / a:.2f}x A", x <= a)
        )
        x, a = m("W3", c), m("W3", "A")
        out.append(Target("W3", c, "≤ 1.10x A", f"{x / a:.2f}x A", x <= 1.10 * a))
        out.extend(w5_targets(r, c))
        runs = r.w4.get(c, [])
        conns = max((run["max_connections"] for run in runs), default=-1)
        out.append(
            Target(
                "W4",
                c,
                f"≤ WORKERS ({WORKERS}) server connections",
                f"max {conns}",
                0 <= conns <= WORKERS,
            )
        )
        reconnects = sum(run["reconnects"] for run in runs)
        queries = sum(run["queries"] for run in runs)
        out.append(
            Target(
                "W4",
                c,
                "zero reconnects per query",
                f"{reconnects} in {queries:,} queries",
                reconnects == 0,
            )
        )
    if r.w6:
        x, a = statistics.median(r.w6["sync"]), statistics.median(r.w6["A"])
        out.append(Target("W6", "sync", "≤ 1.2x A", f"{x / a:.2f}x A", x <= 1.2 * a))
    if r.w7:
        out += [Target("W7", "cache", *check) for check in w7.checks(r.w7)]
    return out


def w5_targets(r: Results, c: str) -> list[Target]:
    if ("W5", c) not in r.samples:
        return []
    x, lim = r.median("W5", c), r.median("W5", "limit")
    return [
        Target(
            "W5",
            c,
            "≤ 1.2x (main query + slowest lookup)",
            f"{x / lim:.2f}x",
            x <= 1.2 * lim,
        )
    ]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def workload_table(r: Results, workload: str) -> list[str]:
    a = r.median(workload, "A")
    lim = r.median(workload, "limit") if (workload, "limit") in r.samples else None
    rows = [
        "| contender | median ms | min ms | ÷ A | ÷ limit | samples |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in [*CONTENDERS, "limit"]:
        samples = r.samples.get((workload, name))
        if not samples:
            continue
        med = statistics.median(samples)
        vs_lim = f"{med / lim:.2f}" if lim else "-"
        label = LIMIT_LABELS.get(workload, LABELS[name]) if name == "limit" else None
        rows.append(
            f"| {label or LABELS[name]} | {fmt_ms(med)} | {fmt_ms(min(samples))} | "
            f"{med / a:.2f} | {vs_lim} | {len(samples)} |"
        )
    return rows


def w4_table(r: Results) -> list[str]:
    rows = [
        "| contender | median s | queries/s (median) | max server connections "
        "| reconnects | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in CONTENDERS:
        runs = r.w4.get(name)
        if not runs:
            continue
        t = statistics.median(run["t"] for run in runs)
        rows.append(
            f"| {LABELS[name]} | {t:.2f} | {runs[0]['queries'] / t:,.0f} | "
            f"{max(run['max_connections'] for run in runs)} | "
            f"{sum(run['reconnects'] for run in runs)} | {len(runs)} |"
        )
    return rows


def w6_table(r: Results) -> list[str]:
    a = statistics.median(r.w6["A"])
    rows = [
        "| contender | median ms | p90 ms | ÷ A | samples |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in W6_CONTENDERS:
        samples = sorted(r.w6[name])
        med = statistics.median(samples)
        p90 = samples[int(0.9 * (len(samples) - 1))]
        rows.append(
            f"| {LABELS[name]} | {fmt_ms(med)} | {fmt_ms(p90)} | {med / a:.2f} | "
            f"{len(samples)} |"
        )
    queued = r.w6["queued"]
    rows += [
        "",
        f"Jobs queued in the pool at each sample: median "
        f"{statistics.median(queued):.0f}, min {min(queued)}, max {max(queued)}.",
    ]
    return rows


def only_report(r: Results, workloads: list[str]) -> str:
    """The tables of the workloads run with ``--only``, and W2's added costs."""
    lines = []
    for workload in ("W1", "W2", "W2-1", "W3"):
        if (workload, "A") in r.samples:
            lines += ["", f"## {TITLES[workload]}", "", *workload_table(r, workload)]
    if ("W2-1", "A") in r.samples:
        a = r.median("W2-1", "A")
        lines.append("")
        for name in ("C", "sync", "async"):
            added = (r.median("W2-1", name) - a) * 1e6
            lines.append(f"- W2-1 added cost over A, {LABELS[name]}: {added:+.0f} µs")
        for name in ("C", "sync", "async"):
            lines.append(
                f"- W2 batch of 8, {LABELS[name]}: "
                f"{r.median('W2', name) / r.median('W2', 'A'):.2f}x A"
            )
    if r.w4:
        lines += ["", f"## {TITLES['W4']}", "", *w4_table(r)]
    if r.w6:
        lines += ["", f"## {TITLES['W6']}", "", *w6_table(r)]
    if r.w7:
        lines += ["", f"## {TITLES['W7']}", "", *w7.tables(r.w7)]
        lines += ["", *w7.checks_table(r.w7)]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with connect() as conn:
        row = conn.execute("SHOW server_version").fetchone()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "postgres": f"PostgreSQL {row[0] if row else '?'} on 127.0.0.1, same machine",
        "main": f"Python {platform.python_version()}, Django "
        f"{version('django')}, psycopg {version('psycopg')}, asgiref "
        f"{version('asgiref')}, asynchrormous {version('asynchrormous')} ({commit})",
    }


LOADS: list[float] = []  # the 1-minute load average at each progress line


def load() -> str:
    LOADS.append(os.getloadavg()[0])
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def write_report(
    r: Results,
    d: DProcess,
    info: dict[str, str],
    load_before: str,
    load_after: str,
    args: argparse.Namespace,
    breakdown: str,
) -> str:
    checks = targets(r)
    m = r.median
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python benchmarks/run.py`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Each round runs every "
        f"contender on every workload in a new random order ({args.rounds} rounds "
        f"after {args.warmup} of warm-up; W2 {args.w2_repeats}x per round), so "
        "the ratios compare times taken side by side. Lower is better.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {info['cpu']}",
        f"- Load average (1, 5, 15 min): {load_before} before, {load_after} after; "
        f"1-minute load at most {max(LOADS):.2f} at the progress lines, this "
        "benchmark's own processes and PostgreSQL (same 2 cores) included."
        + (
            " **Other work was running**: absolute times are inflated and the "
            "sub-millisecond W2 figures are noisy; the ratios were still taken side "
            "by side."
            if LOADS[0] > 0.5
            else ""
        ),
        f"- {info['postgres']}",
        f"- Main process: {info['main']}; `ASYNCHRORMOUS = {{'WORKERS': {WORKERS}}}`",
    ]
    if d.error is None:
        v = d.versions
        lines.append(
            f"- D's process: Python {v['python']}, Django {v['django']}, "
            f"django-async-backend {v['django-async-backend']}, psycopg "
            f"{v['psycopg']}, psycopg-pool {v['psycopg-pool']} (pool of {WORKERS})"
        )
    else:
        lines.append(f"- D could not run here:\n\n```\n{d.error}\n```")
    if r.w7:
        lines.append(w7.versions_line(r.w7))
    lines += [
        "",
        "## Headline",
        "",
        f"- W1: asynchrormous is {m('W1', 'A') / m('W1', 'sync'):.1f}x faster than "
        f"plain Django (start()) and {m('W1', 'A') / m('W1', 'async'):.1f}x (await "
        f"+ gather), at {m('W1', 'sync') / m('W1', 'limit'):.2f}x and "
        f"{m('W1', 'async') / m('W1', 'limit'):.2f}x the slowest single query.",
        f"- W2: one background pk lookup costs "
        f"{(m('W2-1', 'sync') - m('W2-1', 'A')) * 1e6:+.0f} µs (start()) and "
        f"{(m('W2-1', 'async') - m('W2-1', 'A')) * 1e6:+.0f} µs (await) over plain "
        f"Django's {m('W2-1', 'A') * 1e6:.0f} µs (a bare ThreadPoolExecutor hop, C: "
        f"{(m('W2-1', 'C') - m('W2-1', 'A')) * 1e6:+.0f} µs); a batch of 8 takes "
        f"{m('W2', 'sync') / m('W2', 'A'):.2f}x and "
        f"{m('W2', 'async') / m('W2', 'A'):.2f}x A's time.",
        f"- W3: {m('W3', 'sync') / m('W3', 'A'):.2f}x and "
        f"{m('W3', 'async') / m('W3', 'A'):.2f}x A's time.",
        *([w5_headline(r)] if ("W5", "A") in r.samples else []),
        *([w7.headline(r.w7)] if r.w7 else []),
        "",
        "## Targets",
        "",
        "| workload | asynchrormous | target | measured | |",
        "|---|---|---|---|---|",
    ]
    for t in checks:
        verdict = "PASS" if t.passed else "**FAIL**"
        lines.append(
            f"| {t.workload} | {SIDES[t.contender]} | {t.text} | {t.value} "
            f"| {verdict} |"
        )
    for workload in ("W1", "W2", "W2-1", "W3", "W5"):
        if (workload, "A") in r.samples:
            lines += ["", f"## {TITLES[workload]}", "", *workload_table(r, workload)]
    lines += [
        "",
        f"## {TITLES['W4']}",
        "",
        "Each run is a fresh process (D: its long-lived one) with its own",
        "`application_name`; a sampler thread polls `pg_stat_activity` every 2 ms",
        "for that name. Reconnects are `connection_created` signals after a warm-up",
        "batch (D: connections its pool opened).",
        "",
        *w4_table(r),
    ]
    if r.w6:
        lines += [
            "",
            f"## {TITLES['W6']}",
            "",
            f"A fresh process with `WORKERS = {W6_WORKERS}` and `CALLER_RUNS = True`: "
            f"{W6_CALLERS} threads run "
            "W4's batch through asynchrormous in a loop while one more thread times",
            "one primary-key lookup, the contenders interleaved in random order. "
            "`start()` waits by running a job no worker has picked up itself; an",
            "event loop never runs a query, so `await` waits for a worker.",
            "",
            *w6_table(r),
        ]
    if r.w7:
        lines += ["", f"## {TITLES['W7']}", "", *w7.tables(r.w7)]
    reconnected = ", ".join(f"{k} ({v})" for k, v in sorted(r.created_threads.items()))
    lines += [
        "",
        "## Notes",
        "",
        "- The limit is plain Django's slowest single query of the batch, timed",
        "  inside A's run of the same round.",
        f"- {W1_SLEEP * 1000:.0f} ms of server time is an uncorrelated "
        "`EXISTS (SELECT 1 FROM pg_sleep(...))` filter: once per query.",
        "- W5's limit is plain Django's main query plus its slowest prefetch",
        "  lookup, timed statement by statement inside A's run of the same round.",
        "  C and D are not run: one queryset gives a thread pool nothing to overlap,",
        "  and D's prefetch_related() runs its lookups one after another.",
        "- W1 to W3 and W5: new connections after warm-up in the main process: "
        + (reconnected or "none")
        + ".",
        "- D opens each query with `async_new_connection()` (a pooled connection per "
        "task), its documented way to run queries in parallel.",
        *(w7.NOTES if r.w7 else []),
    ]
    if breakdown:
        lines += [
            "",
            "## Where W2's added cost goes (start() side)",
            "",
            "`python benchmarks/profile_w2.py breakdown`: timers wrapped around",
            "asynchrormous internals, interleaved with plain `get()` of the same row.",
            "",
            "```",
            breakdown.strip(),
            "```",
        ]
    text = "\n".join(lines) + "\n"
    (HERE / "RESULTS.md").write_text(text)
    return text


def w5_headline(r: Results) -> str:
    m = r.median
    sync, aio, lim = m("W5", "sync"), m("W5", "async"), m("W5", "limit")
    return (
        f"- W5: prefetch lookups side by side take {sync * 1000:.0f} ms "
        f"(start()) and {aio * 1000:.0f} ms (await) against plain "
        f"Django's {m('W5', 'A') * 1000:.0f} ms, at {sync / lim:.2f}x "
        f"and {aio / lim:.2f}x the main query plus the slowest lookup."
    )


def partial_report(r: Results, args: argparse.Namespace) -> str:
    """The tables and targets of the workloads run, for a partial run."""
    lines = [
        f"Workloads {', '.join(args.workloads)}: {args.rounds} rounds after "
        f"{args.warmup} of warm-up, contenders in a new random order each round.",
    ]
    if ("W5", "A") in r.samples:
        lines += ["", w5_headline(r)]
        lines += ["", "| workload | asynchrormous | target | measured | |"]
        lines += ["|---|---|---|---|---|"]
        for c in OURS:
            for t in w5_targets(r, c):
                side = "start() / lazy" if c == "sync" else "await + gather"
                verdict = "PASS" if t.passed else "**FAIL**"
                lines.append(f"| W5 | {side} | {t.text} | {t.value} | {verdict} |")
    for workload in ("W1", "W2", "W2-1", "W3", "W5"):
        if (workload, "A") in r.samples:
            lines += ["", f"## {TITLES[workload]}", "", *workload_table(r, workload)]
    if r.w7:
        lines += ["", f"## {TITLES['W7']}", "", *w7.tables(r.w7)]
        lines += ["", *w7.checks_table(r.w7), "", *w7.NOTES]
    return "\n".join(lines) + "\n"


def chart(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = ["W1", "W2", "W2-1", "W3", "W5"]
    fig, axes = plt.subplots(4, 2, figsize=(12, 14.5))
    if r.w7 and w7.names(r.w7):
        w7.chart_panel(axes[2, 1], r.w7)
    else:
        axes[2, 1].set_axis_off()
    colours = {
        "A": "#999999",
        "B": "#bbbbbb",
        "C": "#6a9fd0",
        "D": "#9b7fc4",
        "sync": "#d9822b",
        "async": "#e0a95f",
    }
    for ax, workload in zip(axes.flat, panels, strict=False):
        if (workload, "A") not in r.samples:
            continue
        names = [c for c in CONTENDERS if (workload, c) in r.samples][::-1]
        meds = [r.median(workload, c) * 1000 for c in names]
        mins = [min(r.samples[workload, c]) * 1000 for c in names]
        ax.barh([LABELS[c] for c in names], meds, color=[colours[c] for c in names])
        ax.plot(mins, range(len(names)), "k|", markersize=12, label="min")
        if (workload, "limit") in r.samples:
            ax.axvline(
                r.median(workload, "limit") * 1000, color="k", ls="--", label="limit"
            )
        for y, v in enumerate(meds):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(TITLES[workload], fontsize=10)
        ax.set_xlabel("milliseconds (median; lower is better)")
        ax.set_xlim(0, max(meds) * 1.18)
    names = [c for c in CONTENDERS if c in r.w4][::-1]
    qps = [
        r.w4[c][0]["queries"] / statistics.median(x["t"] for x in r.w4[c])
        for c in names
    ]
    conns = [max(x["max_connections"] for x in r.w4[c]) for c in names]
    for ax, values, xlabel in (
        (axes[3, 0], qps, "queries per second (median; higher is better)"),
        (axes[3, 1], conns, "max server connections from the process"),
    ):
        ax.barh([LABELS[c] for c in names], values, color=[colours[c] for c in names])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_title(
            f"W4: {W4_CALLERS} callers, {W4_SLEEP * 1000:.0f} ms queries", fontsize=10
        )
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(values) * 1.18)
    axes[3, 1].axvline(WORKERS, color="k", ls="--")
    axes[3, 1].text(WORKERS, -0.9, " WORKERS", fontsize=8)
    fig.legend(
        handles=[
            Line2D([], [], color="k", marker="|", ls="", markersize=12, label="min"),
            Line2D([], [], color="k", ls="--", label="limit (W1-W3, W5), WORKERS (W4)"),
        ],
        loc="upper center",
        ncol=2,
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--w2-repeats", type=int, default=10)
    parser.add_argument("--w4-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=["W1", "W2", "W3", "W4", "W5", "W6", "W7"],
        help="comma-separated; RESULTS.md needs W1 to W4, others are printed",
    )
    parser.add_argument("--quick", action="store_true", help="a few rounds, to try")
    parser.add_argument("--d-python", help="the interpreter for D (default: a venv)")
    parser.add_argument("--w6-samples", type=int, default=300)
    parser.add_argument(
        "--w7-repeats", type=int, default=5, help="W7: each operation per round"
    )
    parser.add_argument(
        "--cache-python",
        help="the interpreter for W7's processes, with django-cachalot and "
        "django-cacheops (default: .venv-bench-cache, made when missing)",
    )
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        help="comma-separated workloads (e.g. W2,W6): run them without D, print "
        "their tables, write no report",
    )
    parser.add_argument("--w4-child", help=argparse.SUPPRESS)
    parser.add_argument("--w6-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.w4_child:
        w4_child(args.w4_child)
        return
    if args.w6_child:
        w6_child(args.w6_child, args.seed)
        return
    if args.quick:
        args.rounds, args.warmup, args.w2_repeats, args.w4_rounds = 5, 1, 4, 1
        args.w6_samples = 60
    if args.only:
        args.workloads = args.only

    def log(message: str) -> None:
        now = datetime.now(timezone.utc)
        print(f"[{now:%H:%M:%S}] {message} (load {load()})", flush=True)

    load_before = load()
    log("creating the database")
    django_setup()
    create_database()
    if {"W1", "W2", "W3", "W4"} & set(args.workloads) and not args.only:
        log("starting D (django-async-backend)")
        d = DProcess(args.d_python)
    else:
        d = DProcess(args.d_python, skip="not needed for these workloads")
    if d.error:
        log(f"D cannot run: {d.error}")
    info = machine()
    try:
        results = measure(args, d, log)
    finally:
        d.close()
    if args.only:
        print(only_report(results, args.only))
        return
    if not FULL_REPORT <= set(args.workloads):
        print(partial_report(results, args))
        return
    load_after = load()
    log("W2 breakdown")
    breakdown = subprocess.run(
        [sys.executable, str(HERE / "profile_w2.py"), "breakdown"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    text = write_report(results, d, info, load_before, load_after, args, breakdown)
    chart(results, HERE / "results.png")
    print(text)


if __name__ == "__main__":
    main()
