"""Where a background primary-key lookup (W2) spends its time, beyond plain Django's.

    python benchmarks/profile_w2.py breakdown [--n 3000]
    py-spy record --idle --threads -r 2000 -f raw -o w2.txt -- \\
        python benchmarks/profile_w2.py loop --side sync --seconds 10
    python benchmarks/profile_w2.py summarize w2.txt

``breakdown`` times each stage of ``Item.objects.run_async().get(pk=...)`` and its
``resolve()`` by wrapping asynchrormous's internals with timers, interleaved with
plain Django's ``get()`` of the same row. Run ``python benchmarks/run.py`` once first:
it creates the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PK = 4_242


def setup() -> None:
    from benchmarks.run import django_setup

    django_setup()


def breakdown(n: int) -> None:
    from asynchrormous import queryset, resolve, results
    from benchmarks.benchapp.models import Item

    stages: dict[str, list[float]] = defaultdict(list)
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                stages[name].append(ended - started)
                marks[name + ".start"], marks[name + ".end"] = started, ended

        return wrapper

    dry_run = queryset.dry_run

    @contextlib.contextmanager
    def timed_dry_run(alias: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with dry_run(alias):
                yield
        finally:
            stages["dry run (Django's get() up to its SQL)"].append(
                time.perf_counter() - started
            )

    queryset.dry_run = timed_dry_run  # type: ignore[assignment]
    queryset.submit = timed("submit", queryset.submit)
    queryset.lazy_result = timed("lazy_result", queryset.lazy_result)
    queryset._read = timed("worker: _read (Django's get())", queryset._read)
    results.Job.result = timed("caller: Job.result (waits)", results.Job.result)  # type: ignore[method-assign]

    for i in range(n + 200):
        if i == 200:  # warm-up done
            stages.clear()
        qs = Item.plain.filter(pk=PK)
        started = time.perf_counter()
        qs.get()
        stages["A: plain get()"].append(time.perf_counter() - started)

        qs = Item.objects.filter(pk=PK)
        started = time.perf_counter()
        bg = qs.run_async()
        after_clone = time.perf_counter()
        lazy = bg.get()
        after_call = time.perf_counter()
        resolve(lazy)
        ended = time.perf_counter()
        stages["run_async() clone"].append(after_clone - started)
        stages["get() call on the caller, total"].append(after_call - after_clone)
        stages["resolve() on the caller, total"].append(ended - after_call)
        stages["background: total"].append(ended - started)
        stages["hop: submit end -> worker start"].append(
            marks["worker: _read (Django's get()).start"] - marks["submit.end"]
        )
        stages["hop: worker end -> caller resumes"].append(
            marks["caller: Job.result (waits).end"]
            - marks["worker: _read (Django's get()).end"]
        )
        del lazy

    async def awaited() -> None:
        # Django refuses sync queries inside a coroutine, so this side cannot be
        # interleaved with A: it runs after it.
        for i in range(n + 200):
            qs = Item.objects.filter(pk=PK)
            started = time.perf_counter()
            await qs.aget()
            if i >= 200:
                stages["async side: await aget() total"].append(
                    time.perf_counter() - started
                )

    sync_stages = {name: list(values) for name, values in stages.items()}
    asyncio.run(awaited())
    # The wrapped internals also ran for the async side: keep only its total.
    sync_stages["async side: await aget() total"] = stages[
        "async side: await aget() total"
    ]
    stages = sync_stages
    a = statistics.median(stages["A: plain get()"])
    print(f"{n} lookups of pk={PK}, in µs\n")
    print(f"{'stage':48} {'median':>8} {'min':>8}")
    for name, values in stages.items():
        print(
            f"{name:48} {statistics.median(values) * 1e6:8.1f} {min(values) * 1e6:8.1f}"
        )
    for name in ("background: total", "async side: await aget() total"):
        added = statistics.median(stages[name]) - a
        print(
            f"\nadded cost of {name.partition(':')[0]}: {added * 1e6:+.1f} µs", end=""
        )
    print()


def loop(side: str, seconds: float) -> None:
    from asynchrormous import resolve
    from benchmarks.benchapp.models import Item

    deadline = time.perf_counter() + seconds
    count = 0
    if side == "async":

        async def run() -> int:
            done = 0
            while time.perf_counter() < deadline:
                await Item.objects.filter(pk=PK).aget()
                done += 1
            return done

        count = asyncio.run(run())
    else:
        while time.perf_counter() < deadline:
            qs = Item.plain if side == "plain" else Item.objects.run_async()
            resolve(qs.filter(pk=PK).get())
            count += 1
    print(f"{side}: {count} lookups, {seconds / count * 1e6:.0f} µs each")


def summarize(path: str, top: int) -> None:
    """Per thread: samples, and the functions with the largest inclusive share."""
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    own: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # "thread (id): name;function (file:line);..." -> functions without lines
        _, *frames = stack.split(";")
        if "_worker (" in stack:
            thread = "pool worker threads"
        elif "loop (" in stack:
            thread = "caller (main thread)"
        else:
            continue  # start-up, and other threads
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
        n = int(count)
        totals[thread] += n
        for frame in set(frames):
            inclusive[thread][frame] += n
        if frames:
            own[thread][frames[-1]] += n
    for thread, total in totals.most_common():
        print(f"\n== {thread}: {total} samples")
        for title, table in (("inclusive", inclusive), ("own", own)):
            print(f"-- {title}")
            for frame, n in table[thread].most_common(top):
                print(f"{100 * n / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("breakdown").add_argument("--n", type=int, default=3000)
    p = sub.add_parser("loop")
    p.add_argument("--side", choices=["plain", "sync", "async"], default="sync")
    p.add_argument("--seconds", type=float, default=10)
    p = sub.add_parser("summarize")
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.command == "summarize":
        summarize(args.path, args.top)
        return
    setup()
    if args.command == "breakdown":
        breakdown(args.n)
    else:
        loop(args.side, args.seconds)


if __name__ == "__main__":
    main()
