"""W7, query caching: asynchrormous's ``.cache()`` beside django-cachalot,
django-cacheops and uncached Django, each in a process of its own
(benchmarks/cache_worker.py).

All four processes run from one virtualenv, .venv-bench-cache, made here with the
main process's Python and Django, so that only the contender differs. Every round
sends each process every operation ``repeats`` times, the tasks of all four in one
random order; each answer is the time of one operation, taken inside its process.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from random import Random
from typing import Any, NamedTuple

from benchmarks.common import W7_OPS, W7_REDIS_DBS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE_VENV = ROOT / ".venv-bench-cache"

CONTENDERS = ["plain", "asynchrormous", "cachalot", "cacheops", "asynchrormous-locmem"]
LABELS = {
    "plain": "plain Django (uncached)",
    "asynchrormous": "asynchrormous .cache()",
    "asynchrormous-locmem": "asynchrormous .cache(), LocMemCache",
    "cachalot": "django-cachalot",
    "cacheops": "django-cacheops .cache()",
}
OP_LABELS = {
    "hit_get": "hit: get(pk=)",
    "hit_count": "hit: filter().count()",
    "hit_fetch_100": "hit: 100 rows",
    "miss_get": "miss: get(pk=)",
    "miss_count": "miss: filter().count()",
    "miss_fetch_100": "miss: 100 rows",
    "update": "write: filter(pk=).update()",
    "save": "write: save(update_fields=)",
}
READS = ["get", "count", "fetch_100"]
TITLE = "W7 caching: hits, misses and writes, one operation at a time"


def requirements() -> list[str]:
    """What .venv-bench-cache holds: this checkout, the main process's Django."""
    return [
        "-e",
        f"{ROOT}[postgres]",
        f"Django=={version('django')}",
        "redis>=5",
        "django-cachalot>=2.9,<3",
        "django-cacheops>=7.2,<8",
    ]


def venv_python() -> str:
    """.venv-bench-cache's interpreter, (re)built when its requirements change."""
    exe = CACHE_VENV / "bin" / "python"
    marker = CACHE_VENV / ".requirements"
    wanted = "\n".join(requirements())
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        return str(exe)
    shutil.rmtree(CACHE_VENV, ignore_errors=True)
    for cmd in (
        [sys.executable, "-m", "venv", str(CACHE_VENV)],
        [str(exe), "-m", "pip", "install", "--quiet", *requirements()],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    marker.write_text(wanted)
    return str(exe)


def redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Worker:
    """One contender's process; ``error`` says why it stopped, or could not start."""

    def __init__(self, name: str, python: str) -> None:
        self.name = name
        self.error: str | None = None
        self.versions: dict[str, str] = {}
        self.proc: subprocess.Popen[str] | None = None
        try:
            self.proc = subprocess.Popen(
                [python, str(HERE / "cache_worker.py"), name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            self.versions = self._answer()["versions"]
        except Exception as exc:  # reported in the tables, the others still run
            self.fail(f"{type(exc).__name__}: {exc}")

    def _answer(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"cache_worker.py exited:\n{stderr[-2000:]}")
        return json.loads(line)

    def ask(self, op: str, probe: bool = False) -> dict[str, Any] | None:
        """The answer to one task, or None once this contender has failed."""
        if self.proc is None:
            return None
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, "probe": probe}) + "\n")
            self.proc.stdin.flush()
            answer = self._answer()
        except Exception as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return None
        if "error" in answer:
            self.fail(answer["error"])
            return None
        return answer

    def fail(self, error: str) -> None:
        self.error = error
        self.close()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@dataclass
class W7Results:
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: Redis round trips and SQL statements of one run of each operation.
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    versions: dict[str, dict[str, str]] = field(default_factory=dict)

    def has(self, op: str, name: str) -> bool:
        return bool(self.samples.get((op, name)))

    def median(self, op: str, name: str) -> float:
        return statistics.median(self.samples[op, name])


def measure(
    rounds: int,
    warmup: int,
    repeats: int,
    seed: int,
    python: str | None,
    log: Callable[[str], None],
) -> W7Results:
    results = W7Results()
    try:
        exe = python or venv_python()
    except Exception as exc:
        results.errors = dict.fromkeys(CONTENDERS, f"{type(exc).__name__}: {exc}")
        return results
    if not redis_answers():
        for name in W7_REDIS_DBS:
            results.errors[name] = (
                "Redis does not answer PING on 127.0.0.1:6379 (bash .ci/run starts it)"
            )
    names = [name for name in CONTENDERS if name not in results.errors]
    workers = {name: Worker(name, exe) for name in names}
    tasks = [(op, name) for op in W7_OPS for name in names for _ in range(repeats)]
    rng = Random(seed)
    try:
        for round_no in range(-warmup, rounds):
            rng.shuffle(tasks)
            for op, name in tasks:
                answer = workers[name].ask(op)
                if answer is not None and round_no >= 0:
                    results.samples.setdefault((op, name), []).append(answer["t"])
            if round_no >= 0 and (round_no + 1) % 10 == 0:
                log(f"W7 round {round_no + 1}/{rounds}")
        for name, worker in workers.items():
            for op in W7_OPS:
                answer = worker.ask(op, probe=True)
                if answer is not None:
                    results.counts[op, name] = answer["counts"]
    finally:
        for worker in workers.values():
            worker.close()
    for name, worker in workers.items():
        results.versions[name] = worker.versions
        if worker.error is not None:
            results.errors[name] = worker.error
    return results


# -- Report ---------------------------------------------------------------------------


class Check(NamedTuple):
    text: str
    value: str
    passed: bool


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def cell(r: W7Results, op: str, name: str) -> str:
    if not r.has(op, name):
        return "-"
    x = r.median(op, name)
    if name == "plain" or not r.has(op, "plain"):
        return us(x)
    base = r.median(op, "plain")
    if op.startswith("hit_"):
        if x > base:
            return f"{us(x)} ({x / base:.1f}x slower)"
        return f"{us(x)} ({base / x:.1f}x faster)"
    if op.startswith("miss_"):
        return f"{us(x)} ({(x / base - 1) * 100:+.0f} %)"
    return f"{us(x)} ({(x - base) * 1e6:+,.0f} µs)"


def names(r: W7Results) -> list[str]:
    return [c for c in CONTENDERS if any(r.has(op, c) for op in W7_OPS)]


def tables(r: W7Results) -> list[str]:
    shown = names(r)
    head = "| operation | " + " | ".join(LABELS[c] for c in shown) + " |"
    rule = "|---|" + "---:|" * len(shown)
    lines = [
        "Median µs per operation (lower is better); in brackets, against plain",
        "Django's same operation: how many times faster a hit is, what a miss adds,",
        "and what a write pays for invalidation.",
        "",
        head,
        rule,
    ]
    for op in W7_OPS:
        lines.append(
            f"| {OP_LABELS[op]} | " + " | ".join(cell(r, op, c) for c in shown) + " |"
        )
    samples = {len(r.samples.get((W7_OPS[0], c), [])) for c in shown}
    lines += [
        "",
        f"Samples per operation and contender: {', '.join(map(str, sorted(samples)))}.",
    ]
    if r.counts:
        lines += [
            "",
            "Redis round trips / SQL statements of one run of each operation (a",
            "pipeline or MGET is one round trip):",
            "",
            head,
            rule,
        ]
        for op in W7_OPS:
            row = [
                "{redis} / {sql}".format(**r.counts[op, c])
                if (op, c) in r.counts
                else "-"
                for c in shown
            ]
            lines.append(f"| {OP_LABELS[op]} | " + " | ".join(row) + " |")
    for name, error in r.errors.items():
        lines += ["", f"{LABELS[name]} could not run:", "", "```", error, "```"]
    return lines


def checks(r: W7Results) -> list[Check]:
    """The targets: a hit ≥ 5x faster than uncached and no slower than the faster of
    cachalot and cacheops; a miss within 10 % of uncached."""
    out = []
    for what in READS:
        hit, miss = f"hit_{what}", f"miss_{what}"
        label = OP_LABELS[hit].partition(": ")[2]
        if not (r.has(hit, "asynchrormous") and r.has(hit, "plain")):
            out.append(
                Check(f"{label}: hit ≥ 5x faster than uncached", "no run", False)
            )
        else:
            x, base = r.median(hit, "asynchrormous"), r.median(hit, "plain")
            out.append(
                Check(
                    f"{label}: hit ≥ 5x faster than uncached",
                    f"{base / x:.1f}x",
                    base >= 5 * x,
                )
            )
        others = [c for c in ("cachalot", "cacheops") if r.has(hit, c)]
        if r.has(hit, "asynchrormous") and others:
            best = min(others, key=lambda c: r.median(hit, c))
            x, y = r.median(hit, "asynchrormous"), r.median(hit, best)
            out.append(
                Check(
                    f"{label}: hit no slower than cachalot's or cacheops's",
                    f"{x / y:.2f}x {best}'s time",
                    x <= y,
                )
            )
        else:
            out.append(
                Check(
                    f"{label}: hit no slower than cachalot's or cacheops's",
                    "no run",
                    False,
                )
            )
        if r.has(miss, "asynchrormous") and r.has(miss, "plain"):
            x, base = r.median(miss, "asynchrormous"), r.median(miss, "plain")
            out.append(
                Check(
                    f"{label}: miss within 10 % of uncached",
                    f"{x / base:.2f}x",
                    x <= 1.10 * base,
                )
            )
        else:
            out.append(Check(f"{label}: miss within 10 % of uncached", "no run", False))
    return out


def checks_table(r: W7Results) -> list[str]:
    lines = [
        "| workload | asynchrormous | target | measured | |",
        "|---|---|---|---|---|",
    ]
    for c in checks(r):
        verdict = "PASS" if c.passed else "**FAIL**"
        lines.append(f"| W7 | .cache() | {c.text} | {c.value} | {verdict} |")
    return lines


def headline(r: W7Results) -> str:
    ours = [
        r.has(op, c)
        for op in ("hit_get", "miss_get")
        for c in ("asynchrormous", "plain")
    ]
    if not all(ours):
        return "- W7: asynchrormous's cache did not run (see W7 below)."
    m = r.median
    hit, base = m("hit_get", "asynchrormous"), m("hit_get", "plain")
    others = [c for c in ("cachalot", "cacheops") if r.has("hit_get", c)]
    beside = ", ".join(f"{c} {us(m('hit_get', c))} µs" for c in others)
    added = m("miss_get", "asynchrormous") / m("miss_get", "plain") - 1
    return (
        f"- W7: a cached get(pk=) takes {us(hit)} µs against {us(base)} µs uncached"
        f"{' (' + beside + ')' if beside else ''}; a miss adds "
        f"{added * 100:+.0f} % to the query."
    )


def versions_line(r: W7Results) -> str:
    v = {k: x for versions in r.versions.values() for k, x in versions.items()}
    if not v:
        return "- W7's processes could not start (see W7 below)."
    cachalot = r.versions.get("cachalot", {}).get("django-cachalot", "?")
    cacheops = r.versions.get("cacheops", {}).get("django-cacheops", "?")
    return (
        f"- W7's processes (one per contender, .venv-bench-cache): Python "
        f"{v['python']}, Django {v['django']}, redis-py {v.get('redis', '?')}, Redis "
        f"{v.get('redis-server', '?')} on 127.0.0.1 (databases "
        f"{', '.join(f'{k} {n}' for k, n in W7_REDIS_DBS.items())}), "
        f"django-cachalot {cachalot}, django-cacheops {cacheops}"
    )


NOTES = [
    "- W7: every contender is a process of its own from the same virtualenv, timing",
    "  one operation at a time inside that process; asynchrormous and cachalot use",
    "  Django's RedisCache, cacheops its own redis-py client. Each timed operation",
    "  comes right after an untimed one of its kind (a hit's is the same query, so",
    "  a write in between cannot make it a miss); a miss is a query its process",
    "  never ran. cachalot caches every query on the table; asynchrormous and",
    "  cacheops only those asked with `.cache()`.",
    "- W7 writes: cacheops invalidates nothing on `update()`, so its update row is",
    "  `invalidated_update()` (SELECT FOR UPDATE, UPDATE, SELECT); its `save()`",
    "  fetches the old row first. Each write commits on its own.",
    "- W7's LocMemCache column is asynchrormous with its cache in its own process:",
    "  no round trip to Redis, and no invalidation seen by other processes. It is",
    "  no target, only what the library costs without the network.",
    "- Django's RedisCache (asynchrormous, cachalot) makes a `redis.Redis` client",
    "  for every call (`get_client()`); cacheops keeps one.",
]


def chart_panel(ax: Any, r: W7Results) -> None:
    """Cache hits, grouped by operation, one bar per contender."""
    shown = names(r)
    colours = {
        "plain": "#999999",
        "asynchrormous": "#d9822b",
        "asynchrormous-locmem": "#e0a95f",
        "cachalot": "#6a9fd0",
        "cacheops": "#9b7fc4",
    }
    height = 0.8 / max(len(shown), 1)
    for i, name in enumerate(shown):
        ys = [j + i * height for j in range(len(READS))]
        values = [
            r.median(f"hit_{w}", name) * 1e6 if r.has(f"hit_{w}", name) else 0
            for w in READS
        ]
        ax.barh(ys, values, height, color=colours[name], label=LABELS[name])
        for y, v in zip(ys, values, strict=True):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(READS))])
    ax.set_yticklabels([OP_LABELS[f"hit_{w}"] for w in READS])
    ax.invert_yaxis()
    ax.set_title("W7: cache hits (plain Django: uncached)", fontsize=10)
    ax.set_xlabel("microseconds (median; lower is better)")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.9)  # the right half: the legend
    ax.legend(fontsize=7, loc="center right")
