"""Pieces without a database: DATABASE_URL parsing and the timeline's layout."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from bookshop.database_url import database_from_url
from catalogue.timeline import Span, Timeline


def test_postgres_url() -> None:
    db = database_from_url("postgres://me:p%40ss@db.example:6432/shop?sslmode=require")
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "me",
        "p@ss",
        "db.example",
        6432,
        "shop",
    )
    assert db["OPTIONS"] == {"sslmode": "require"}


@pytest.mark.parametrize(
    ("url", "name"),
    [("sqlite:///shop.sqlite3", "shop.sqlite3"), ("sqlite:////tmp/s.db", "/tmp/s.db")],
)
def test_sqlite_url_keeps_the_options_workers_need(url: str, name: str) -> None:
    db = database_from_url(url)
    assert db["NAME"] == name
    assert db["OPTIONS"]["init_command"] == "PRAGMA journal_mode=WAL;"
    assert db["OPTIONS"]["timeout"] == 20


def test_other_urls_are_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="sqlite:// or postgres://"):
        database_from_url("mysql://root@localhost/shop")


def test_bars_are_placed_in_percent_of_the_page_time() -> None:
    timeline = Timeline("test")
    timeline.started -= 0.2  # as if the page had been running for 200 ms
    t0 = timeline.started
    timeline.add(Span("second", "w-1", t0 + 0.070, t0 + 0.095, ("SELECT 2",)))
    timeline.add(Span("first", "w-0", t0 + 0.020, t0 + 0.070, ("SELECT 1",)))
    drawing = timeline.drawing
    assert drawing.total_ms == pytest.approx(200, abs=20)
    assert [bar.label for bar in drawing.bars] == ["first", "second"]
    first, second = drawing.bars
    assert first.start_ms == pytest.approx(20, abs=0.01)
    assert second.ms == pytest.approx(25, abs=0.01)
    assert first.left + first.width == pytest.approx(second.left, abs=0.01)
    assert first.left == pytest.approx(100 * 20 / drawing.total_ms)
    assert drawing.busy_ms == pytest.approx(75, abs=0.01)
    assert first.colour != second.colour
    assert drawing.ticks[0] == (0, 0)
    assert all(0 <= left <= 100 for left, _ in drawing.ticks)
    # Compared with the other pages this process served (in other tests, here).
    assert ("test", drawing.total_ms) in [(p, ms) for p, _, ms, _ in drawing.totals]
