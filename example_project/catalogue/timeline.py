"""Per-page timelines of database work: when each query ran, and on which thread.

Background jobs are timed by asynchrormous itself: its ``job_finished`` signal reports
each job's start, end, thread and SQL. One receiver, connected at startup, files every
report under the page that submitted the job. It finds that page through a context
variable, because the library runs each job in a copy of its submitter's context: the
receiver, called on the worker, sees the submitting request's timeline, and two
requests served at once never mix.

The plain-Django page submits no jobs, so nothing would report its queries. There,
and only there, ``plain_statements()`` times each statement on the request thread with
a Django execute wrapper.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from asynchrormous.signals import job_finished
from django.db import DEFAULT_DB_ALIAS, connections

__all__ = [
    "Bar",
    "Drawing",
    "Span",
    "Timeline",
    "connect",
    "plain_statements",
    "recording",
]

# One colour per thread, in order of first use: the request thread gets the first.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#ff9da7",
    "#9c755f",
)


@dataclass(frozen=True)
class Span:
    """One piece of database work: a background job, or a plain statement."""

    label: str
    thread: str
    started: float  # time.perf_counter()
    finished: float
    sql: tuple[str, ...]
    inline: bool = False


@dataclass(frozen=True)
class Bar:
    """A span placed on the page, in milliseconds and percent of the total."""

    label: str
    thread: str
    colour: str
    start_ms: float
    ms: float
    left: float
    width: float
    sql: str


@dataclass(frozen=True)
class Drawing:
    """Everything the timeline template draws, frozen when the page is done."""

    page: str
    total_ms: float
    bars: list[Bar]
    threads: list[tuple[str, str]]  # (name, colour)
    ticks: list[tuple[float, int]]  # (percent, ms)
    busy_ms: float  # sum of the bars: what running them one after another costs
    totals: list[tuple[str, str, float, float]]  # (page, title, ms, % of the slowest)


# The last (title, total ms) of each page in this process, compared under each page.
_last_totals: dict[str, tuple[str, float]] = {}


class Timeline:
    """The database work of one page, from the moment the view starts."""

    def __init__(self, page: str, title: str = "") -> None:
        self.page = page
        self.title = title or page
        self.started = time.perf_counter()
        self.request_thread = threading.current_thread().name
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, span: Span) -> None:
        """Thread-safe: workers report here as their jobs end."""
        with self._lock:
            self._spans.append(span)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return sorted(self._spans, key=lambda s: s.started)

    @cached_property
    def drawing(self) -> Drawing:
        """The timeline as it stands now; the first use ends the page's clock.

        The template uses it after the data above it, so every lazy result has been
        used (and its job reported) by then.
        """
        total = (time.perf_counter() - self.started) * 1000
        _last_totals[self.page] = (self.title, total)
        spans = self.spans
        colours: dict[str, str] = {self.request_thread: PALETTE[0]}
        for span in spans:
            colours.setdefault(span.thread, PALETTE[len(colours) % len(PALETTE)])
        scale = max(total, 1e-3)
        bars = []
        for span in spans:
            start_ms = (span.started - self.started) * 1000
            ms = (span.finished - span.started) * 1000
            bars.append(
                Bar(
                    label=span.label,
                    thread=span.thread,
                    colour=colours[span.thread],
                    start_ms=start_ms,
                    ms=ms,
                    left=100 * max(start_ms, 0) / scale,
                    width=100 * ms / scale,
                    sql="\n".join(span.sql),
                )
            )
        used = {span.thread for span in spans}
        slowest = max(ms for _, ms in _last_totals.values())
        return Drawing(
            page=self.page,
            total_ms=total,
            bars=bars,
            threads=[(t, c) for t, c in colours.items() if t in used],
            ticks=_ticks(total),
            busy_ms=sum(bar.ms for bar in bars),
            # In the order of the titles, which the views number.
            totals=[
                (page, title, ms, 100 * ms / slowest)
                for page, (title, ms) in sorted(
                    _last_totals.items(), key=lambda item: item[1][0]
                )
            ],
        )


def _ticks(total_ms: float) -> list[tuple[float, int]]:
    """Round-numbered axis ticks, about five of them, as (percent, ms)."""
    step = 1
    for candidate in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        step = candidate
        if total_ms / candidate <= 6:
            break
    scale = max(total_ms, 1e-3)
    return [
        (100 * ms / scale, ms)
        for ms in range(0, int(total_ms) + 1, step)
        if ms <= total_ms
    ]


_current: ContextVar[Timeline | None] = ContextVar("bookshop_timeline", default=None)


@contextmanager
def recording(page: str, title: str = "") -> Iterator[Timeline]:
    """Record the database work of ``page`` done in this context, jobs included."""
    timeline = Timeline(page, title)
    token = _current.set(timeline)
    try:
        yield timeline
    finally:
        _current.reset(token)


def _on_job_finished(
    *,
    description: str,
    thread: str,
    inline: bool,
    started: float,
    finished: float,
    sql: list[str],
    **kwargs: Any,
) -> None:
    # Runs on the thread that ran the job, in a copy of the submitter's context.
    timeline = _current.get()
    if timeline is not None:
        timeline.add(Span(description, thread, started, finished, tuple(sql), inline))


def connect() -> None:
    """Connect the job_finished receiver (once; AppConfig.ready calls it)."""
    job_finished.connect(_on_job_finished, dispatch_uid="bookshop-demo-timeline")


@contextmanager
def plain_statements(
    timeline: Timeline, alias: str = DEFAULT_DB_ALIAS
) -> Iterator[None]:
    """Time each statement this thread sends on ``alias``: for pages without jobs."""

    def record(
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            timeline.add(
                Span(
                    _statement_label(sql),
                    threading.current_thread().name,
                    started,
                    time.perf_counter(),
                    (sql,),
                    inline=True,
                )
            )

    # Outermost, so that the time includes any wrapper already there (the demo's
    # latency, say): open the connection first, then go first in the list.
    connection = connections[alias]
    connection.ensure_connection()
    connection.execute_wrappers.insert(0, record)
    try:
        yield
    finally:
        connection.execute_wrappers.remove(record)


def _statement_label(sql: str) -> str:
    """``SELECT … FROM catalogue_book WHERE …``: short enough for a bar's label."""
    flat = " ".join(sql.replace('"', "").replace("`", "").split())
    head, sep, rest = flat.partition(" FROM ")
    if sep and len(head) > 30:
        head = head.split(" ", 1)[0] + " …"
    return f"{head}{sep}{rest}"
