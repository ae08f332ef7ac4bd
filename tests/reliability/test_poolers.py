"""Scenario 8, poolers: PgBouncer in transaction mode and Django's psycopg pool.

A soak-like load (background reads and writes from threads, ``aiterator()`` and
``a*`` methods from an event loop, every answer checked) runs with the ``default``
alias pointed, for the test, through PgBouncer (``DISABLE_SERVER_SIDE_CURSORS``),
through Django's psycopg pool, and through the pool behind PgBouncer. Then what the
README tells a PgBouncer user, each shown: a server-side cursor and prepared
statements fail behind transaction pooling, Django's defaults and
``DISABLE_SERVER_SIDE_CURSORS`` work, and async ``atomic()`` blocks hold."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections
from django.db.models import F, Sum
from django.db.utils import DatabaseError

import asynchrormous
from asynchrormous import resolve
from tests.pgbouncer import PgBouncer, Unavailable
from tests.reliability.conftest import scaled
from tests.testapp.models import Author, Book

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql"
        or "pool" in connection.settings_dict.get("OPTIONS", {}),
        reason="PgBouncer and Django's psycopg pool are PostgreSQL's",
    ),
]

WORKERS = 4
THREADS = 4
LANES = 4
WAIT = 30.0
ROUNDS = scaled(25, 500)  # per thread and per lane


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    try:
        with PgBouncer() as running:
            yield running
    except Unavailable as exc:
        pytest.skip(str(exc))


@contextlib.contextmanager
def default_through(**overrides: Any) -> Iterator[str]:
    """The ``default`` alias with ``overrides`` (to the same test database) inside.

    Django's test case lets a test use only the aliases it declared when the
    database was set up, so the scenario changes ``default``'s settings in place
    (every thread's connection shares that dict) and puts them back after.
    """
    settings_dict = connections.settings["default"]
    saved = copy.deepcopy(settings_dict)

    def close() -> None:
        asynchrormous.shutdown(timeout=WAIT)  # the workers close their connections
        connections["default"].close()
        if settings_dict.get("OPTIONS", {}).get("pool"):
            connections["default"].close_pool()

    close()
    settings_dict.update(overrides)
    try:
        yield "default"
    finally:
        close()
        settings_dict.clear()
        settings_dict.update(saved)


@pytest.fixture
def alias(request: pytest.FixtureRequest, bouncer: PgBouncer) -> Iterator[str]:
    """``default`` through ``pgbouncer``, ``pool`` or ``pool+pgbouncer``: its name."""
    kind = request.param
    overrides: dict[str, Any] = {}
    if "pgbouncer" in kind:
        overrides.update(PORT=bouncer.port, DISABLE_SERVER_SIDE_CURSORS=True)
    if "pool" in kind:
        overrides["OPTIONS"] = {"pool": {"min_size": 0, "max_size": WORKERS + 2}}
    with default_through(**overrides):
        yield kind


def submitter(author: Author, errors: list[str]) -> None:
    """Background writes, then reads of them, each checked; one row per round."""
    books = Book.objects.filter(author=author)
    try:
        for i in range(ROUNDS):
            Book.objects.run_async().create(
                title=f"{author.name} {i}", author=author, pages=i
            )
            n = books.run_async().count()  # after the create: the caller's own write
            updated = books.filter(pages=i).run_async().update(pages=F("pages") + 1000)
            rows = books.filter(pages__gte=1000).order_by("pages").start()
            total = books.run_async().aggregate(total=Sum("pages"))
            if resolve(n, timeout=WAIT) != i + 1:
                errors.append(f"{author.name} round {i}: count {int(n)} != {i + 1}")
            if resolve(updated, timeout=WAIT) != 1:
                errors.append(f"{author.name} round {i}: updated {int(updated)}")
            pages = [b.pages for b in resolve(rows, timeout=WAIT)]
            if pages != [1000 + j for j in range(i + 1)]:
                errors.append(f"{author.name} round {i}: pages {pages}")
            expected = sum(1000 + j for j in range(i + 1))
            if resolve(total, timeout=WAIT)["total"] != expected:
                errors.append(f"{author.name} round {i}: total {total}")
    except Exception as exc:
        errors.append(f"{author.name}: {type(exc).__name__}: {exc}")
    finally:
        connections.close_all()


async def lane(author: Author, known: list[str], errors: list[str]) -> None:
    """Streams the known rows with aiterator() and asks a* methods, each checked."""
    qs = Book.objects.filter(author=author).order_by("pk")
    try:
        for i in range(ROUNDS):
            titles = [b.title async for b in qs.aiterator(chunk_size=7)]
            count, first, exists = await asyncio.gather(
                qs.acount(), qs.afirst(), qs.filter(pages=i).aexists()
            )
            if titles != known or count != len(known) or first.title != known[0]:
                errors.append(f"lane {author.name} round {i}: {titles[:3]}, {count}")
            if exists != (i < len(known)):
                errors.append(f"lane {author.name} round {i}: exists {exists}")
    except Exception as exc:
        errors.append(f"lane {author.name}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize(
    "alias", ["pgbouncer", "pool", "pool+pgbouncer"], indirect=True
)
def test_a_soak_behind_a_pooler_gives_every_answer_right(alias, settings, figures):
    settings.ASYNCHRORMOUS = {"WORKERS": WORKERS, "TIMEOUT": WAIT}
    writers = [Author.objects.create(name=f"Writer {t}") for t in range(THREADS)]
    readers = [Author.objects.create(name=f"Reader {t}") for t in range(LANES)]
    known = [f"Known {i}" for i in range(30)]
    for reader in readers:
        Book.objects.bulk_create(
            Book(title=title, author=reader, pages=i) for i, title in enumerate(known)
        )
    errors: list[str] = []
    started = time.monotonic()
    threads = [threading.Thread(target=submitter, args=(w, errors)) for w in writers]
    for thread in threads:
        thread.start()

    async def lanes() -> None:
        await asyncio.gather(*(lane(r, known, errors) for r in readers))

    try:
        asyncio.run(asyncio.wait_for(lanes(), timeout=300))
    finally:
        for thread in threads:
            thread.join(300)
    seconds = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "a submitter hangs"
    queries = THREADS * ROUNDS * 5 + LANES * ROUNDS * (1 + 3)
    figures.update(
        via=alias,
        rounds=ROUNDS,
        queries=queries,
        seconds=round(seconds, 2),
        queries_per_second=round(queries / seconds),
        wrong_or_failed=len(errors),
    )
    assert not errors, errors[:5]
    for writer in writers:
        assert Book.objects.filter(author=writer).count() == ROUNDS


# -- What a PgBouncer user must set, each shown to be needed -----------------------


@pytest.fixture(scope="module")
def round_robin_bouncer() -> Iterator[PgBouncer]:
    """A PgBouncer that lends the server session idle the longest, not the last."""
    try:
        with PgBouncer(server_round_robin=1) as running:
            yield running
    except Unavailable as exc:
        pytest.skip(str(exc))


def two_idle_server_sessions() -> None:
    """Two transactions at once make PgBouncer open two server sessions."""
    two = [connections.create_connection("default") for _ in range(2)]
    try:
        for c in two:
            c.set_autocommit(False)
            with c.cursor() as cursor:
                cursor.execute("SELECT 1")
        for c in two:
            c.rollback()
    finally:
        for c in two:
            c.close()


@pytest.mark.parametrize("stream", ["iterator", "aiterator"])
def test_behind_pgbouncer_a_server_side_cursor_fails_and_disabling_them_works(
    round_robin_bouncer, settings, figures, stream
):
    """A cursor Django declares WITH HOLD outside a transaction is on one server
    session; PgBouncer, lending the other idle session next, sends the FETCH there.
    With DISABLE_SERVER_SIDE_CURSORS the rows come with the one statement."""
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": WAIT}
    author = Author.objects.create(name="A")
    Book.objects.bulk_create(Book(title=f"B{i}", author=author) for i in range(5))
    qs = Book.objects.order_by("pk")

    async def streamed() -> list[str]:
        return [b.title async for b in qs.aiterator(chunk_size=2)]

    outcomes: dict[bool, Any] = {}
    for disabled in (False, True):
        port = round_robin_bouncer.port
        with default_through(PORT=port, DISABLE_SERVER_SIDE_CURSORS=disabled):
            two_idle_server_sessions()
            try:
                if stream == "iterator":
                    outcomes[disabled] = [b.title for b in qs.iterator(chunk_size=2)]
                else:
                    outcomes[disabled] = asyncio.run(streamed())
            except Exception as exc:  # psycopg's own, from the cursor's close too
                outcomes[disabled] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    figures.update(server_side_cursor=outcomes[False])
    assert "does not exist" in str(outcomes[False]), outcomes[False]
    assert outcomes[True] == [f"B{i}" for i in range(5)]


def test_behind_pgbouncer_prepared_statements_fail_and_djangos_default_works(
    bouncer, figures
):
    """psycopg prepares a statement run ``prepare_threshold`` times on a connection,
    by a name each connection numbers from zero; behind PgBouncer two connections
    share a server session, where the second one's name is taken. Django sets
    ``prepare_threshold`` to None unless OPTIONS set it."""
    outcomes = {}
    for options in (
        {},
        {"server_side_binding": True},
        {"server_side_binding": True, "prepare_threshold": 5},
    ):
        with default_through(PORT=bouncer.port, OPTIONS=options):
            two = [connections.create_connection("default") for _ in range(2)]
            try:
                for c in two:
                    for i in range(8):  # one after the other: one server session
                        with c.cursor() as cursor:
                            cursor.execute("SELECT %s + 1", [i])
                            assert cursor.fetchone() == (i + 1,)
                outcomes[str(options)] = "ok"
            except DatabaseError as exc:
                outcomes[str(options)] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            finally:
                for c in two:
                    c.close()
    default, server_side_binding, prepared = outcomes.values()
    figures.update(prepare_threshold_5=prepared)
    assert default == "ok"  # client-side binding, nothing prepared
    assert server_side_binding == "ok"  # Django's prepare_threshold=None
    assert "already exists" in prepared, prepared


def test_behind_pgbouncer_async_atomic_blocks_keep_their_transaction(
    bouncer, settings, figures
):
    """A block's statements are one transaction, so PgBouncer keeps them on one
    server session: each block sees its own uncommitted row, a failing one rolls
    back."""
    settings.ASYNCHRORMOUS = {"WORKERS": WORKERS, "TIMEOUT": WAIT}
    author = Author.objects.create(name="A")
    blocks = scaled(20, 200)

    async def block(i: int) -> int:
        async with asynchrormous.atomic():
            await Book.objects.acreate(title=f"T{i}", author=author, pages=i)
            mine = await Book.objects.filter(author=author, pages=i).acount()
            if i % 2:
                raise ValueError(i)  # rolled back
            return mine

    async def run() -> list[Any]:
        return await asyncio.gather(
            *(block(i) for i in range(blocks)), return_exceptions=True
        )

    with default_through(PORT=bouncer.port, DISABLE_SERVER_SIDE_CURSORS=True):
        results = asyncio.run(asyncio.wait_for(run(), timeout=120))
    failed = [r for r in results if isinstance(r, ValueError)]
    figures.update(blocks=blocks, rolled_back=len(failed))
    assert len(failed) == blocks // 2, results
    assert [r for r in results if not isinstance(r, ValueError)] == [1] * (
        blocks - blocks // 2
    )
    assert sorted(
        Book.objects.filter(author=author).values_list("pages", flat=True)
    ) == list(range(0, blocks, 2))


def test_behind_pgbouncer_a_restart_between_jobs_costs_no_write(
    bouncer, settings, figures
):
    """A PgBouncer restart closes every client connection; the worker notices its
    closed connection before its next job (no round trip), so a write lands."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": WAIT}
    author = Author.objects.create(name="A")
    restarts = scaled(5, 25)
    with default_through(PORT=bouncer.port, DISABLE_SERVER_SIDE_CURSORS=True):
        for i in range(restarts):
            assert Book.objects.filter(author=author).run_async().count() == i
            bouncer.stop()
            bouncer.start()
            connections["default"].close()  # the test's own, to the old process
            created = Book.objects.run_async().create(title=f"T{i}", author=author)
            assert resolve(created, timeout=WAIT).title == f"T{i}"
    figures.update(restarts=restarts, writes_landed=restarts)
    assert Book.objects.filter(author=author).count() == restarts
