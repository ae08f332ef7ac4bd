"""Every write Django can make invalidates the cached results of the tables it wrote.

Each test warms a cached read whose answer the write changes (a "miss" that keeps
the rows, then a "hit"), writes by one path, and reads again through the cache: a
"miss", with the answer a fresh, uncached read gives. A write path that is not
hooked leaves the old answer reachable, and the read after it is a stale "hit".

The outcomes are the ``cache_used`` signal's; each test has its own CACHE_PREFIX,
so nothing another test (or another run on the same Redis) kept is ever seen.
"""

import asyncio
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.db import connection, connections, transaction
from django.db.models import Count, Exists, F, OuterRef, Subquery, Sum
from django.db.models.expressions import RawSQL

from asynchrormous import atomic, resolve
from asynchrormous.signals import cache_used
from asynchrormous.transaction import on_commit
from tests.cache_helpers import BACKENDS, turn_on
from tests.helpers import occupy_a_worker
from tests.testapp.models import (
    Author,
    Book,
    Document,
    Gauge,
    GaugeReading,
    Label,
    Memo,
    Note,
    Publisher,
    Shelf,
    Tag,
)

pytestmark = pytest.mark.django_db(transaction=True)

#: How a cached read is made: plainly, in the background, awaited.
MODES = ["plain", "background", "await"]

#: Seconds any wait of these tests (a thread, a subprocess) may take at most.
TIMEOUT = 30.0

VENDOR = connection.vendor
only_on = {
    vendor: pytest.mark.skipif(VENDOR != vendor, reason=f"{vendor} only")
    for vendor in ("postgresql", "mysql", "sqlite")
}
not_on_mysql = pytest.mark.skipif(VENDOR == "mysql", reason="not on MySQL/MariaDB")
not_on_shared_memory = pytest.mark.skipif(
    os.environ.get("ASYNCHRORMOUS_TEST_DB") == "sqlite-memory",
    reason="a shared-cache in-memory SQLite database locks its tables for another "
    "thread's read while a transaction writes ('database table is locked', no "
    "busy timeout), cached or not",
)


class Boom(Exception):
    pass


def boom():
    raise Boom("an on_commit() callback that fails")


# -- The cache, and what it answered -------------------------------------------------


@pytest.fixture(params=BACKENDS)
def cache_alias(request, settings):
    """Caching on (tests/cache_helpers.py), in each backend, with keys of this
    test's own."""
    prefix = f"cw-{uuid.uuid4().hex}"
    turn_on(settings, request.param, CACHE_PREFIX=prefix)
    yield request.param
    backend = caches[request.param]
    if isinstance(backend, RedisCache):
        # Generations never expire: leave none of this test's on the shared server.
        client = backend._cache.get_client(write=True)
        keys = list(client.scan_iter(match=backend.make_key(f"{prefix}:*")))
        if keys:
            client.delete(*keys)


@dataclasses.dataclass(frozen=True)
class Read:
    """One read, made through a cached queryset or a fresh (uncached) one.

    ``query`` builds the queryset from the model's (``cached_from`` or
    ``fresh_from`` the model), ``terminal`` ends it ("list" iterates it) with
    ``args``, and ``shape`` makes the answer plain values that compare by content
    (model instances compare by primary key only).
    """

    model: Any
    query: Callable[[Any], Any] = lambda qs: qs
    terminal: str = "list"
    args: tuple[Any, ...] = ()
    shape: Callable[[Any], Any] = lambda value: value
    cached_from: Callable[[Any], Any] = lambda model: model.objects.cache()
    fresh_from: Callable[[Any], Any] = lambda model: model.objects.all()

    def cached(self, mode: str = "plain") -> Any:
        return self._read(self.query(self.cached_from(self.model)), mode)

    def fresh(self) -> Any:
        return self._read(self.query(self.fresh_from(self.model)), "plain")

    async def acached(self) -> Any:
        return self.shape(await self._await(self.query(self.cached_from(self.model))))

    async def afresh(self) -> Any:
        return self.shape(await self._await(self.query(self.fresh_from(self.model))))

    def _read(self, qs: Any, mode: str) -> Any:
        if mode == "await":
            return self.shape(async_to_sync(self._await)(qs))
        if mode == "background":
            qs = qs.run_async()
            if self.terminal == "list":
                return self.shape(list(resolve(qs)))
            return self.shape(resolve(getattr(qs, self.terminal)(*self.args)))
        assert mode == "plain", mode
        if self.terminal == "list":
            return self.shape(list(qs))
        return self.shape(getattr(qs, self.terminal)(*self.args))

    async def _await(self, qs: Any) -> Any:
        if self.terminal == "list":
            return list(await qs)
        return await getattr(qs, "a" + self.terminal)(*self.args)


class Probe:
    """Records the outcome of every cached read (from any thread), and warms reads."""

    def __init__(self) -> None:
        self._seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, *, outcome: str, alias: str, **kwargs: Any) -> None:
        with self._lock:
            self._seen.append((outcome, alias))

    def take(self) -> list[str]:
        """The outcomes since the last call."""
        with self._lock:
            seen, self._seen = self._seen, []
        assert {alias for _, alias in seen} <= {"default"}
        return [outcome for outcome, _ in seen]

    def warm(self, read: Read, mode: str = "plain", statements: int = 1) -> "Warm":
        """Read twice through the cache: a miss that keeps the rows, then a hit."""
        self.take()
        before = read.cached(mode)
        assert self.take() == ["miss"] * statements
        assert read.cached(mode) == before
        assert self.take() == ["hit"] * statements
        assert before == read.fresh()
        return Warm(self, read, mode, before)

    async def awarm(self, read: Read) -> "Warm":
        self.take()
        before = await read.acached()
        assert self.take() == ["miss"]
        assert await read.acached() == before
        assert self.take() == ["hit"]
        assert before == await read.afresh()
        return Warm(self, read, "await", before)


@dataclasses.dataclass
class Warm:
    """A read that is in the cache, and the answer it had."""

    probe: Probe
    read: Read
    mode: str
    before: Any

    def assert_invalidated(self, outcomes: tuple[str, ...] = ("miss",)) -> Any:
        self.probe.take()  # the write's own reads, if any
        after = self.read.cached(self.mode)
        assert sorted(self.probe.take()) == sorted(outcomes), (
            "the write left the cached result reachable"
        )
        assert after == self.read.fresh()
        assert after != self.before, "the write did not change the answer"
        return after

    def assert_still_cached(self) -> None:
        self.probe.take()
        value = self.read.cached(self.mode)
        assert self.probe.take() == ["hit"]
        assert value == self.before == self.read.fresh()

    async def aassert_invalidated(self) -> Any:
        self.probe.take()
        after = await self.read.acached()
        assert self.probe.take() == ["miss"], (
            "the write left the cached result reachable"
        )
        assert after == await self.read.afresh()
        assert after != self.before, "the write did not change the answer"
        return after

    async def aassert_still_cached(self) -> None:
        self.probe.take()
        value = await self.read.acached()
        assert self.probe.take() == ["hit"]
        assert value == self.before == await self.read.afresh()


@pytest.fixture
def probe(cache_alias):
    recorder = Probe()
    cache_used.connect(recorder, weak=False)
    yield recorder
    cache_used.disconnect(recorder)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def awaited(make: Callable[[], Any]) -> Any:
    """Await the coroutine ``make()`` returns, from sync code."""

    async def main() -> Any:
        return await make()

    return async_to_sync(main)()


def in_another_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread: its own connection, outside this thread's
    transaction; at most TIMEOUT seconds."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name="another-thread")
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"the other thread did not finish in {TIMEOUT} s"
    if errors:
        raise errors[0]
    return out[0]


async def from_another_thread(fn: Callable[[], Any]) -> Any:
    """``in_another_thread(fn)`` from async code. The executor copies no context:
    the thread knows nothing of the task's atomic() block."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(
        loop.run_in_executor(None, in_another_thread, fn), TIMEOUT
    )


# -- The data ---------------------------------------------------------------------


@pytest.fixture
def world(books):
    """``books`` (Ann wrote the odd ones, Bob the even ones, all from Pub), with
    tags x (books 0 and 1) and y (book 2), three documents (two of them memos),
    a shelf with a label y, two notes, and gauges g1 (two readings) and g2."""
    x = Tag.objects.create(name="x")
    x.books.add(books[0], books[1])
    y = Tag.objects.create(name="y")
    y.books.add(books[2])
    memo = Memo.objects.create(title="m1", data={"v": 1})
    Memo.objects.create(title="m2", data={"v": 2})
    Document.objects.create(data={"plain": True})
    shelf = Shelf.objects.create(name="s")
    Label.objects.create(content_object=shelf, text="y")
    Note.objects.create(text="n1")
    Note.objects.create(text="n2")
    g1 = Gauge.fresh.create(name="g1", value=1)
    Gauge.fresh.create(name="g2", value=2)
    GaugeReading.objects.bulk_create(
        [GaugeReading(gauge=g1, value=1), GaugeReading(gauge=g1, value=2)]
    )
    return SimpleNamespace(
        books=books,
        ann=Author.objects.get(name="Ann"),
        bob=Author.objects.get(name="Bob"),
        pub=Publisher.objects.get(name="Pub"),
        x=x,
        y=y,
        memo=memo,
        shelf=shelf,
        g1=g1,
    )


def _by_pk(qs):
    return qs.order_by("pk")


BOOK_COUNT = Read(Book, terminal="count")
BOOK_PAGES = Read(Book, lambda qs: _by_pk(qs).values_list("title", "pages"))
BOOK_TITLES = Read(Book, lambda qs: _by_pk(qs).values_list("title", flat=True))
PAGES_TOTAL = Read(Book, terminal="aggregate", args=(Sum("pages"),))
BOOKS_BY_PK = Read(
    Book,
    terminal="in_bulk",
    shape=lambda found: sorted((b.title, b.pages) for b in found.values()),
)
WITHOUT_PUBLISHER = Read(
    Book, lambda qs: qs.filter(publisher__isnull=True), terminal="count"
)
LONG_BOOKS_EXIST = Read(Book, lambda qs: qs.filter(pages__gte=130), terminal="exists")
TAGGED_X = Read(Book, lambda qs: qs.filter(tags__name="x"), terminal="count")
TAGGED_Y = Read(Book, lambda qs: qs.filter(tags__name="y"), terminal="count")
TAGS_OF_ANNS_BOOKS = Read(
    Tag,
    lambda qs: qs.filter(books__author__name="Ann").distinct().order_by("name"),
    shape=lambda tags: [t.name for t in tags],
)
ANNS_BOOKS = Read(Book, lambda qs: qs.filter(author__name="Ann"), terminal="count")
AUTHOR_NAMES = Read(Author, lambda qs: _by_pk(qs).values_list("name", flat=True))
DOCUMENT_DATA = Read(Document, lambda qs: _by_pk(qs).values_list("data", flat=True))
DOCUMENT_COUNT = Read(Document, terminal="count")
MEMO_TITLES = Read(Memo, lambda qs: _by_pk(qs).values_list("title", "data"))
# Reads that depend on a table only through a join, a subquery or an annotation.
BOOK_0_AUTHOR = Read(
    Book,
    lambda qs: qs.select_related("author").filter(title="Book 0"),
    terminal="get",
    shape=lambda b: (b.title, b.author.name),
)
LONGEST_BOOK_OF = Read(
    Author,
    lambda qs: (
        _by_pk(qs)
        .annotate(
            longest=Subquery(
                Book.objects.filter(author=OuterRef("pk"))
                .order_by("-pages")
                .values("title")[:1]
            )
        )
        .values_list("name", "longest")
    ),
)
AUTHORS_OF_HUGE_BOOKS = Read(
    Author,
    lambda qs: qs.filter(
        Exists(Book.objects.filter(author=OuterRef("pk"), pages__gt=500))
    ),
    terminal="count",
)
AUTHORS_IN_HUGE_BOOKS = Read(
    Author,
    lambda qs: _by_pk(
        qs.filter(pk__in=Book.objects.filter(pages__gt=500).values("author"))
    ).values_list("name", flat=True),
)
BOOKS_PER_AUTHOR = Read(
    Author,
    lambda qs: _by_pk(qs).annotate(n=Count("books")).values_list("name", "n"),
)
PUBLISHER_OF_EACH = Read(Book, lambda qs: _by_pk(qs).values("title", "publisher__name"))
PAGES_PER_AUTHOR = Read(Author, terminal="aggregate", args=(Sum("books__pages"),))
LABELLED_SHELVES = Read(Shelf, lambda qs: qs.filter(labels__text="x"), terminal="count")
LABEL_COUNT = Read(Label, terminal="count")
NOTE_COUNT = Read(Note, terminal="count")
# Through managers that cache by default: Gauge.objects (cache=True) and
# GaugeReading.objects (cache=60); Gauge.fresh does not cache.
GAUGES = Read(
    Gauge,
    lambda qs: _by_pk(qs).values_list("name", "value"),
    cached_from=lambda model: model.objects.all(),
    fresh_from=lambda model: model.fresh.all(),
)
GAUGE_READINGS = Read(
    GaugeReading,
    lambda qs: qs.filter(gauge__name="g1"),
    terminal="aggregate",
    args=(Sum("value"),),
    cached_from=lambda model: model.objects.all(),
    fresh_from=lambda model: model.objects.cache(0),
)
LATEST_BOOK = Read(Book, terminal="latest", args=("year",), shape=lambda b: b.title)
FIRST_BOOK = Read(
    Book, lambda qs: qs.order_by("pages"), terminal="first", shape=lambda b: b.title
)


# -- Every ORM write path, each with a read whose answer it changes ----------------

WRITES = []


def path(read: Read) -> Callable[[Any], Any]:
    def register(write: Callable[[Any], Any]) -> Callable[[Any], Any]:
        WRITES.append(pytest.param(write, read, id=write.__name__))
        return write

    return register


@path(BOOK_COUNT)
def save_of_a_new_instance(w):
    Book(title="New", author=w.ann).save()


@path(BOOK_PAGES)
def save_of_an_existing_instance(w):
    book = w.books[3]
    book.pages = 999
    book.save()


@path(BOOK_TITLES)
def save_with_update_fields(w):
    book = w.books[1]
    book.title = "Renamed"
    book.save(update_fields=["title"])


@path(BOOK_COUNT)
def delete_of_an_instance_cascades_to_its_books(w):
    w.ann.delete()  # her books go (and their rows in the tags' through table)


@path(TAGS_OF_ANNS_BOOKS)
def delete_of_an_instance_cascades_to_the_through_table(w):
    w.books[1].delete()  # Ann's only tagged book: its row in testapp_tag_books goes


@path(WITHOUT_PUBLISHER)
def delete_of_an_instance_sets_null(w):
    w.pub.delete()  # Book.publisher is SET_NULL: an UPDATE of testapp_book


@path(WITHOUT_PUBLISHER)
def delete_of_a_queryset_sets_null(w):
    Publisher.objects.filter(name="Pub").delete()


@path(LONG_BOOKS_EXIST)
def delete_of_a_queryset(w):
    Book.objects.filter(pages__gte=130).delete()


@path(BOOK_COUNT)
def delete_of_a_cached_queryset(w):
    Book.objects.cache().filter(pages__gte=130).delete()


@path(PAGES_TOTAL)
def create(w):
    Book.objects.create(title="Created", author=w.ann, pages=1000)


@path(NOTE_COUNT)
def fast_delete_of_a_model_with_no_relations(w):
    # Nothing to collect: Django deletes with one statement, no SELECT first.
    Note.objects.filter(text="n1").delete()


@path(LABEL_COUNT)
def delete_of_an_instance_cascades_to_a_generic_relation(w):
    w.shelf.delete()  # GenericRelation: its labels go too


@path(BOOK_COUNT)
def create_through_a_cached_queryset(w):
    Book.objects.cache().create(title="Cached create", author=w.ann)


@path(BOOK_TITLES)
def get_or_create_through_a_cached_queryset(w):
    made = Book.objects.cache().get_or_create(title="Got", defaults={"author": w.ann})
    assert made[1]


@path(BOOK_COUNT)
def bulk_create_through_a_cached_queryset(w):
    Book.objects.cache().bulk_create([Book(title="Cached bulk", author=w.bob)])


@path(BOOK_COUNT)
def bulk_create(w):
    Book.objects.bulk_create([Book(title=f"Bulk {i}", author=w.bob) for i in range(3)])


@path(PAGES_TOTAL)
def update(w):
    Book.objects.filter(author=w.ann).update(pages=F("pages") + 1)


@path(PAGES_TOTAL)
def update_of_a_cached_queryset(w):
    Book.objects.cache().filter(author=w.ann).update(pages=1)


@path(BOOKS_BY_PK)
def bulk_update(w):
    for book in w.books[:3]:
        book.pages = 7
    Book.objects.bulk_update(w.books[:3], ["pages"])


@path(BOOK_TITLES)
def get_or_create_that_creates(w):
    _, created = Book.objects.get_or_create(title="Got", defaults={"author": w.ann})
    assert created


@path(BOOK_PAGES)
def update_or_create_that_updates(w):
    _, created = Book.objects.update_or_create(title="Book 2", defaults={"pages": 7})
    assert not created


@path(BOOK_TITLES)
def update_or_create_that_creates(w):
    _, created = Book.objects.update_or_create(
        title="Made", defaults={"pages": 7}, create_defaults={"author": w.ann}
    )
    assert created


@path(ANNS_BOOKS)
def create_through_a_reverse_foreign_key(w):
    w.ann.books.create(title="Hers")


@path(WITHOUT_PUBLISHER)
def clear_of_a_nullable_reverse_foreign_key(w):
    w.pub.book_set.clear()


@path(WITHOUT_PUBLISHER)
def remove_from_a_nullable_reverse_foreign_key(w):
    w.pub.book_set.remove(w.books[0])


# Many-to-many, from both sides: every one writes the through table only.


@path(TAGGED_X)
def m2m_add(w):
    w.x.books.add(w.books[2])


@path(TAGGED_X)
def m2m_add_from_the_other_side(w):
    w.books[3].tags.add(w.x)


@path(TAGGED_X)
def m2m_remove(w):
    w.x.books.remove(w.books[0])


@path(TAGGED_X)
def m2m_remove_from_the_other_side(w):
    w.books[1].tags.remove(w.x)


@path(TAGGED_X)
def m2m_clear(w):
    w.x.books.clear()


@path(TAGGED_X)
def m2m_clear_from_the_other_side(w):
    w.books[0].tags.clear()


@path(TAGGED_X)
def m2m_set(w):
    w.x.books.set([w.books[4]])


@path(TAGGED_Y)
def m2m_set_from_the_other_side(w):
    w.books[5].tags.set([w.x, w.y])


@path(TAGGED_X)
def m2m_create_from_the_other_side(w):
    w.books[4].tags.create(name="x")  # a new tag x, with its through row


@path(TAGGED_Y)
def m2m_through_model_write(w):
    Tag.books.through.objects.create(tag=w.y, book=w.books[4])


@path(TAGS_OF_ANNS_BOOKS)
def m2m_add_read_from_the_other_side(w):
    w.y.books.add(w.books[5])


@path(TAGGED_X)
def delete_of_a_tag_cascades_to_the_through_table(w):
    w.x.delete()


# Multi-table inheritance: Memo's rows are in testapp_document too.


@path(DOCUMENT_DATA)
def save_of_a_child_s_parent_field(w):
    w.memo.data = {"v": 100}
    w.memo.save()


@path(DOCUMENT_DATA)
def update_of_a_child_s_parent_field(w):
    Memo.objects.filter(title="m2").update(data={"v": 200})


@path(MEMO_TITLES)
def update_of_a_child_s_fields_of_both_tables(w):
    Memo.objects.update(title="both", data={"v": 300})


@path(MEMO_TITLES)
def update_of_the_parent_read_through_the_child(w):
    Document.objects.filter(pk=w.memo.pk).update(data={"v": 400})


@path(DOCUMENT_COUNT)
def create_of_a_child(w):
    Memo.objects.create(title="m3", data={"v": 3})


@path(DOCUMENT_COUNT)
def delete_of_a_child(w):
    w.memo.delete()


@path(DOCUMENT_COUNT)
def delete_of_children(w):
    Memo.objects.all().delete()


# Reads that depend on the written table through a join, a subquery, an annotation.


@path(BOOK_0_AUTHOR)
def write_to_a_select_related_table(w):
    Author.objects.filter(name="Bob").update(name="Robert")


@path(LONGEST_BOOK_OF)
def write_to_a_subquery_s_table(w):
    Book.objects.filter(title="Book 0").update(pages=1000)


@path(AUTHORS_OF_HUGE_BOOKS)
def write_to_an_exists_table(w):
    Book.objects.filter(title="Book 0").update(pages=1000)


@path(AUTHORS_IN_HUGE_BOOKS)
def write_to_an_in_queryset_table(w):
    Book.objects.filter(title="Book 1").update(pages=1000)


@path(BOOKS_PER_AUTHOR)
def write_to_an_annotation_s_table(w):
    Book.objects.create(title="Another", author=w.ann)


@path(PUBLISHER_OF_EACH)
def write_to_a_values_join_table(w):
    w.pub.name = "Renamed"
    w.pub.save()


@path(PAGES_PER_AUTHOR)
def write_to_an_aggregate_join_table(w):
    Book.objects.filter(title="Book 0").delete()


@path(LABELLED_SHELVES)
def write_to_a_generic_relation_table(w):
    Label.objects.create(content_object=w.shelf, text="x")


@path(LATEST_BOOK)
def write_read_by_latest(w):
    Book.objects.create(title="Newest", author=w.ann, year=2030)


@path(FIRST_BOOK)
def write_read_by_first(w):
    Book.objects.filter(title="Book 5").update(pages=1)


# Through managers that cache by default.


@path(GAUGES)
def update_through_a_caching_manager(w):
    assert Gauge.objects.filter(name="g1").update(value=F("value") + 10) == 1


@path(GAUGES)
def create_through_a_caching_manager(w):
    Gauge.objects.create(name="g3")


@path(GAUGES)
def get_or_create_through_a_caching_manager(w):
    assert Gauge.objects.get_or_create(name="g3")[1]


@path(GAUGES)
def update_or_create_through_a_caching_manager(w):
    assert not Gauge.objects.update_or_create(name="g2", defaults={"value": 20})[1]


@path(GAUGES)
def delete_through_a_caching_manager(w):
    Gauge.objects.filter(name="g2").delete()


@path(GAUGE_READINGS)
def delete_of_an_instance_cascades_through_a_caching_manager(w):
    w.g1.delete()


@path(GAUGE_READINGS)
def create_through_a_caching_related_manager(w):
    w.g1.readings.create(value=40)


@path(GAUGE_READINGS)
def update_through_a_caching_related_manager(w):
    w.g1.readings.update(value=F("value") * 10)


# The async and background writes.


@path(BOOK_PAGES)
def aupdate(w):
    awaited(lambda: Book.objects.filter(title="Book 0").aupdate(pages=1))


@path(BOOK_COUNT)
def acreate(w):
    awaited(lambda: Book.objects.acreate(title="Async", author=w.ann))


@path(BOOK_COUNT)
def abulk_create(w):
    awaited(lambda: Book.objects.abulk_create([Book(title="A", author=w.ann)]))


@path(BOOK_PAGES)
def abulk_update(w):
    w.books[0].pages = 3
    awaited(lambda: Book.objects.abulk_update([w.books[0]], ["pages"]))


@path(BOOK_COUNT)
def adelete_of_a_queryset(w):
    awaited(lambda: Book.objects.filter(title="Book 0").adelete())


@path(BOOK_COUNT)
def adelete_of_an_instance(w):
    awaited(lambda: w.books[0].adelete())  # AsyncModelMixin: on the pool


@path(BOOK_PAGES)
def asave_of_an_instance(w):
    w.books[0].pages = 5
    awaited(lambda: w.books[0].asave())  # AsyncModelMixin: on the pool


@path(BOOK_TITLES)
def aget_or_create(w):
    awaited(lambda: Book.objects.aget_or_create(title="AG", defaults={"author": w.ann}))


@path(BOOK_PAGES)
def aupdate_or_create(w):
    awaited(
        lambda: Book.objects.aupdate_or_create(title="Book 0", defaults={"pages": 2})
    )


@path(TAGGED_X)
def aadd_of_a_many_to_many(w):
    awaited(lambda: w.x.books.aadd(w.books[5]))


@path(TAGGED_X)
def aremove_of_a_many_to_many_from_the_other_side(w):
    awaited(lambda: w.books[0].tags.aremove(w.x))


@path(TAGGED_X)
def aclear_of_a_many_to_many(w):
    awaited(lambda: w.x.books.aclear())


@path(TAGGED_Y)
def aset_of_a_many_to_many_from_the_other_side(w):
    awaited(lambda: w.books[5].tags.aset([w.y]))


@path(BOOK_PAGES)
def background_update(w):
    assert resolve(Book.objects.run_async().filter(title="Book 0").update(pages=1)) == 1


@path(BOOK_COUNT)
def background_create(w):
    resolve(Book.objects.run_async().create(title="Background", author=w.ann))


@path(BOOK_COUNT)
def background_bulk_create(w):
    resolve(Book.objects.run_async().bulk_create([Book(title="B", author=w.ann)]))


@path(BOOK_PAGES)
def background_bulk_update(w):
    w.books[0].pages = 3
    resolve(Book.objects.run_async().bulk_update([w.books[0]], ["pages"]))


@path(BOOK_COUNT)
def background_delete(w):
    resolve(Book.objects.run_async().filter(title="Book 0").delete())


@path(BOOK_TITLES)
def background_get_or_create(w):
    made = Book.objects.run_async().get_or_create(
        title="BG", defaults={"author": w.ann}
    )
    assert resolve(made)[1]


@path(BOOK_PAGES)
def background_update_or_create(w):
    made = Book.objects.run_async().update_or_create(
        title="Book 0", defaults={"pages": 2}
    )
    assert not resolve(made)[1]


@pytest.mark.parametrize(("write", "read"), WRITES)
def test_the_write_invalidates_every_cached_read_of_a_table_it_wrote(
    world, probe, mode, write, read
):
    warm = probe.warm(read, mode)
    write(world)
    warm.assert_invalidated()


def test_a_write_invalidates_the_prefetch_statement_that_read_its_table(
    world, probe, mode
):
    """Two statements: the authors, still a hit, and their books, a miss."""
    read = Read(
        Author,
        lambda qs: _by_pk(qs).prefetch_related("books"),
        shape=lambda authors: [
            (a.name, sorted(b.title for b in a.books.all())) for a in authors
        ],
    )
    warm = probe.warm(read, mode, statements=2)
    Book.objects.filter(title="Book 0").update(title="Zero")
    warm.assert_invalidated(outcomes=("hit", "miss"))


def test_a_write_leaves_the_cached_reads_of_other_tables_alone(world, probe, mode):
    """Guard: the tests above would pass if every write invalidated everything."""
    warm = probe.warm(AUTHOR_NAMES, mode)
    Book.objects.filter(title="Book 0").update(pages=1)
    Tag.objects.create(name="z")
    warm.assert_still_cached()


def test_a_cached_read_after_the_callers_pending_background_write_reads_it(
    world, probe, settings
):
    # One worker, held: the write stays queued until the caller needs it.
    settings.ASYNCHRORMOUS = {
        **settings.ASYNCHRORMOUS,
        "WORKERS": 1,
        "CALLER_RUNS": True,
    }
    warm = probe.warm(BOOK_PAGES)
    release = threading.Event()
    blocker = occupy_a_worker(release)
    try:
        updated = Book.objects.run_async().filter(title="Book 0").update(pages=1)
        # As a plain query would: read after the caller's own write.
        warm.assert_invalidated()
    finally:
        release.set()
        assert blocker.result(TIMEOUT) is True
    assert resolve(updated, timeout=TIMEOUT) == 1


# -- Raw SQL through connection.cursor() ---------------------------------------------


def raw(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def qn(name):
    return connection.ops.quote_name(name)


def _schema():
    return {
        "postgresql": "public",
        "sqlite": "main",
        "mysql": connection.settings_dict["NAME"],
    }[VENDOR]


# Unquoted, quoted, schema-qualified, keywords in mixed case and, where the database
# folds an unquoted name's case (not MariaDB on Linux), the table name too.
RAW_UPDATES = {
    "unquoted": "UPDATE testapp_book SET pages = %s WHERE title = %s",
    "quoted": "UPDATE {book} SET {pages} = %s WHERE {title} = %s",
    "schema_qualified": "UPDATE {schema}.testapp_book SET pages = %s WHERE title = %s",
    "quoted_schema_qualified": (
        "UPDATE {qschema}.{book} SET pages = %s WHERE title = %s"
    ),
    "mixed_case_keywords": "uPdAtE testapp_book sEt pages = %s wHeRe title = %s",
    "aliased": "UPDATE testapp_book AS b SET pages = %s WHERE b.title = %s",
    "commented": "/* a comment first */ UPDATE testapp_book SET pages = %s "
    "WHERE title = %s",
    "indented": "\n\t  UPDATE\n testapp_book\n SET pages = %s WHERE title = %s",
}
if VENDOR != "mysql":
    RAW_UPDATES["mixed_case_table_name"] = (
        "UPDATE TestApp_Book SET pages = %s WHERE title = %s"
    )
if VENDOR == "sqlite":
    RAW_UPDATES["bracket_quoted"] = (
        "UPDATE [testapp_book] SET pages = %s WHERE title = %s"
    )


@pytest.mark.parametrize("spelling", sorted(RAW_UPDATES))
def test_a_raw_update_invalidates(world, probe, mode, spelling):
    warm = probe.warm(BOOK_PAGES, mode)
    sql = RAW_UPDATES[spelling].format(
        book=qn("testapp_book"),
        pages=qn("pages"),
        title=qn("title"),
        schema=_schema(),
        qschema=qn(_schema()),
    )
    raw(sql, [1, "Book 0"])
    warm.assert_invalidated()


def test_a_raw_insert_invalidates(world, probe, mode):
    warm = probe.warm(AUTHOR_NAMES, mode)
    raw(f"INSERT INTO {qn('testapp_author')} ({qn('name')}) VALUES (%s)", ["Raw"])
    warm.assert_invalidated()


def test_a_raw_insert_from_a_select_invalidates(world, probe, mode):
    warm = probe.warm(AUTHOR_NAMES, mode)
    raw("INSERT INTO testapp_author (name) SELECT title FROM testapp_book")
    warm.assert_invalidated()


def test_a_raw_delete_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_COUNT, mode)
    raw("DELETE FROM testapp_book WHERE title = %s", ["Book 5"])
    warm.assert_invalidated()


def test_a_raw_delete_of_a_through_table_invalidates_a_join_through_it(
    world, probe, mode
):
    warm = probe.warm(TAGGED_X, mode)
    raw(f"delete from {qn('testapp_tag_books')}")
    warm.assert_invalidated()


def test_executemany_invalidates(world, probe, mode):
    warm = probe.warm(AUTHOR_NAMES, mode)
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO testapp_author (name) VALUES (%s)", [("One",), ("Two",)]
        )
    warm.assert_invalidated()


def test_executemany_of_updates_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    with connection.cursor() as cursor:
        cursor.executemany(
            "UPDATE testapp_book SET pages = %s WHERE title = %s",
            [(1, "Book 0"), (2, "Book 1")],
        )
    warm.assert_invalidated()


def test_a_write_through_raw_invalidates(world, probe, mode):
    """``Model.objects.raw()`` of a writing statement: its cursor's execute()."""
    warm = probe.warm(AUTHOR_NAMES, mode)
    made = list(
        Author.objects.raw(
            "INSERT INTO testapp_author (name) VALUES (%s) RETURNING id, name",
            ["Returned"],
        )
    )
    assert [a.name for a in made] == ["Returned"]
    warm.assert_invalidated()


@not_on_mysql
def test_an_update_after_a_with_clause_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    raw(
        "WITH chosen AS (SELECT id FROM testapp_book WHERE pages >= %s) "
        "UPDATE testapp_book SET pages = 1 WHERE id IN (SELECT id FROM chosen)",
        [130],
    )
    warm.assert_invalidated()


@only_on["postgresql"]
def test_a_write_inside_a_with_clause_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH moved AS (UPDATE testapp_book SET pages = %s WHERE title = %s "
            "RETURNING id) SELECT count(*) FROM moved",
            [1, "Book 0"],
        )
        assert cursor.fetchone() == (1,)
    warm.assert_invalidated()


@only_on["postgresql"]
def test_a_psycopg_composed_statement_invalidates(world, probe, mode):
    from psycopg import sql

    warm = probe.warm(BOOK_PAGES, mode)
    statement = sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(
        sql.Identifier("testapp_book"), sql.Identifier("pages"), sql.Identifier("title")
    )
    raw(statement, [1, "Book 0"])
    warm.assert_invalidated()


@only_on["postgresql"]
def test_a_psycopg_composed_statement_with_a_qualified_name_invalidates(
    world, probe, mode
):
    from psycopg import sql

    warm = probe.warm(BOOK_PAGES, mode)
    statement = sql.SQL("UPDATE {} SET pages = {} WHERE title = {}").format(
        sql.Identifier("public", "testapp_book"), sql.Literal(1), sql.Literal("Book 0")
    )
    raw(statement)
    warm.assert_invalidated()


@only_on["postgresql"]
def test_several_statements_in_one_execute_invalidate(world, probe, mode):
    """It starts with a SELECT, but the UPDATE after it writes."""
    warm = probe.warm(BOOK_PAGES, mode)
    raw("SELECT 1; UPDATE testapp_book SET pages = 1 WHERE title = 'Book 0'")
    warm.assert_invalidated()


@pytest.mark.skipif(VENDOR == "postgresql", reason="PostgreSQL has no REPLACE")
def test_replace_into_invalidates(world, probe, mode):
    warm = probe.warm(AUTHOR_NAMES, mode)
    raw("REPLACE INTO testapp_author (name) VALUES (%s)", ["Replaced"])
    warm.assert_invalidated()


@only_on["postgresql"]
def test_merge_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    raw(
        "MERGE INTO testapp_book AS b USING testapp_author AS a ON b.author_id = a.id "
        "WHEN MATCHED AND a.name = %s THEN UPDATE SET pages = 1",
        ["Ann"],
    )
    warm.assert_invalidated()


@pytest.mark.skipif(VENDOR == "sqlite", reason="SQLite's EXPLAIN runs nothing")
def test_an_explained_write_that_runs_invalidates(world, probe, mode):
    """EXPLAIN ANALYZE (PostgreSQL) and ANALYZE (MariaDB) run the statement."""
    warm = probe.warm(BOOK_PAGES, mode)
    explain = "EXPLAIN ANALYZE" if VENDOR == "postgresql" else "ANALYZE"
    with connection.cursor() as cursor:
        cursor.execute(f"{explain} UPDATE testapp_book SET pages = 1")
        cursor.fetchall()
    warm.assert_invalidated()


@pytest.mark.skipif(VENDOR == "sqlite", reason="sqlite3 takes str only")
def test_a_statement_in_bytes_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    raw(b"UPDATE testapp_book SET pages = 1 WHERE title = 'Book 0'")
    warm.assert_invalidated()


@only_on["postgresql"]
def test_copy_from_stdin_invalidates(world, probe, mode):
    warm = probe.warm(AUTHOR_NAMES, mode)
    with connection.cursor() as cursor:
        with cursor.copy("COPY testapp_author (name) FROM STDIN") as copy:
            copy.write_row(("Copied",))
    assert Author.objects.filter(name="Copied").exists()
    warm.assert_invalidated()


@only_on["sqlite"]
def test_executescript_invalidates(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    with connection.cursor() as cursor:
        cursor.executescript("UPDATE testapp_book SET pages = 1;")
    assert Book.objects.get(title="Book 0").pages == 1
    warm.assert_invalidated()


# -- Statements whose tables cannot be told: they invalidate everything --------------


@pytest.fixture
def scratch(db):
    """A table of this test's own, that no model knows, with two rows."""
    raw("CREATE TABLE cw_scratch (n integer)")
    raw("INSERT INTO cw_scratch (n) VALUES (1), (2)")
    yield "cw_scratch"
    raw("DROP TABLE IF EXISTS cw_scratch")


def scratch_rows(qs):
    """Ann's row, with how many rows cw_scratch has: a read of a table no model
    knows, in an annotation."""
    return (
        qs.filter(name="Ann")
        .annotate(n=RawSQL("SELECT COUNT(*) FROM cw_scratch", ()))
        .values_list("name", "n")
    )


SCRATCH = Read(Author, scratch_rows)


@pytest.mark.skipif(VENDOR == "sqlite", reason="SQLite has no TRUNCATE")
def test_truncate_invalidates_everything(world, probe, mode, scratch):
    warm = probe.warm(SCRATCH, mode)
    other = probe.warm(BOOK_PAGES, mode)
    raw("TRUNCATE TABLE cw_scratch")
    warm.assert_invalidated()
    probe.take()
    other.read.cached(mode)
    assert probe.take() == ["miss"]


def test_ddl_invalidates_everything(world, probe, mode, scratch):
    warm = probe.warm(SCRATCH, mode)
    raw("DROP TABLE cw_scratch")
    raw("CREATE TABLE cw_scratch (n integer, m integer)")
    warm.assert_invalidated()  # no rows now


def test_alter_table_invalidates_everything(world, probe, mode, scratch):
    warm = probe.warm(BOOK_PAGES, mode)
    raw("ALTER TABLE cw_scratch ADD COLUMN m integer")
    probe.take()
    assert warm.read.cached(mode) == warm.before
    assert probe.take() == ["miss"]


def test_a_raw_write_to_a_table_no_model_knows_invalidates_a_read_of_it(
    world, probe, mode, scratch
):
    warm = probe.warm(SCRATCH, mode)
    raw("DELETE FROM cw_scratch WHERE n = 1")
    warm.assert_invalidated()


@only_on["postgresql"]
def test_a_call_of_a_procedure_invalidates_everything_postgresql(world, probe, mode):
    raw(
        "CREATE PROCEDURE cw_touch() LANGUAGE sql AS "
        "$$ UPDATE testapp_book SET pages = pages + 1 $$"
    )
    try:
        warm = probe.warm(BOOK_PAGES, mode)
        raw("CALL cw_touch()")
        warm.assert_invalidated()
    finally:
        raw("DROP PROCEDURE cw_touch()")


@only_on["mysql"]
def test_a_call_of_a_procedure_invalidates_everything_mysql(world, probe, mode):
    raw("CREATE PROCEDURE cw_touch() UPDATE testapp_book SET pages = pages + 1")
    try:
        warm = probe.warm(BOOK_PAGES, mode)
        raw("CALL cw_touch()")
        warm.assert_invalidated()
    finally:
        raw("DROP PROCEDURE cw_touch")


@only_on["postgresql"]
def test_callproc_invalidates_everything_postgresql(world, probe, mode):
    raw(
        "CREATE FUNCTION cw_touch() RETURNS void LANGUAGE sql AS "
        "$$ UPDATE testapp_book SET pages = pages + 1 $$"
    )
    try:
        warm = probe.warm(BOOK_PAGES, mode)
        with connection.cursor() as cursor:
            cursor.callproc("cw_touch")
        warm.assert_invalidated()
    finally:
        raw("DROP FUNCTION cw_touch()")


@only_on["mysql"]
def test_callproc_invalidates_everything_mysql(world, probe, mode):
    raw("CREATE PROCEDURE cw_touch() UPDATE testapp_book SET pages = pages + 1")
    try:
        warm = probe.warm(BOOK_PAGES, mode)
        with connection.cursor() as cursor:
            cursor.callproc("cw_touch")
            while cursor.nextset():
                pass
        warm.assert_invalidated()
    finally:
        raw("DROP PROCEDURE cw_touch")


# -- Transactions: at commit, never on rollback --------------------------------------


@not_on_shared_memory
def test_a_transaction_invalidates_at_its_commit_and_not_before(world, probe):
    warm = probe.warm(BOOK_PAGES)
    with transaction.atomic():
        Book.objects.filter(title="Book 0").update(pages=1)
        # Another connection sees the committed rows, and the cache still has them.
        assert in_another_thread(BOOK_PAGES.cached) == warm.before
        assert probe.take() == ["hit"]
        assert in_another_thread(BOOK_PAGES.fresh) == warm.before
    warm.assert_invalidated()


@not_on_shared_memory
def test_rows_another_thread_keeps_during_a_transaction_are_dropped_at_commit(
    world, probe
):
    """Not warmed before: the other thread's read misses and keeps the committed
    rows, under the generations of before the commit."""
    with transaction.atomic():
        Book.objects.filter(title="Book 0").update(pages=1)
        before = in_another_thread(BOOK_PAGES.cached)
        assert probe.take() == ["miss"]
        assert in_another_thread(BOOK_PAGES.cached) == before
        assert probe.take() == ["hit"]
    Warm(probe, BOOK_PAGES, "plain", before).assert_invalidated()


def test_raw_sql_in_a_transaction_invalidates_at_commit_and_never_on_rollback(
    world, probe
):
    warm = probe.warm(BOOK_PAGES)
    with pytest.raises(Boom), transaction.atomic():
        raw("UPDATE testapp_book SET pages = 1")
        raise Boom
    warm.assert_still_cached()
    with transaction.atomic():
        raw("UPDATE testapp_book SET pages = 1")
        assert in_another_thread(BOOK_PAGES.cached) == warm.before
        assert probe.take() == ["hit"]
    warm.assert_invalidated()


def test_a_read_in_a_transaction_after_it_wrote_the_table_bypasses_the_cache(
    world, probe
):
    pages = probe.warm(BOOK_PAGES)
    authors = probe.warm(AUTHOR_NAMES)
    with transaction.atomic():
        Book.objects.filter(title="Book 0").update(pages=1)
        probe.take()
        seen = BOOK_PAGES.cached()
        assert probe.take() == ["bypass"]
        assert seen == BOOK_PAGES.fresh() != pages.before  # its own write
        # A table the transaction did not write still comes from the cache,
        # unless the transaction reads one snapshot (SQLite's).
        assert AUTHOR_NAMES.cached() == authors.before
        assert probe.take() == ["bypass" if VENDOR == "sqlite" else "hit"]
        transaction.set_rollback(True)
    # What the transaction read was not kept: the old rows are still the answer.
    pages.assert_still_cached()


def test_a_rollback_does_not_invalidate(world, probe, mode):
    warm = probe.warm(BOOK_PAGES, mode)
    with pytest.raises(Boom), transaction.atomic():
        Book.objects.filter(title="Book 0").update(pages=1)
        Book.objects.create(title="Rolled back", author=world.ann)
        raise Boom
    warm.assert_still_cached()


def test_a_savepoint_rolled_back_invalidates_only_the_surviving_writes_tables(
    world, probe
):
    authors = probe.warm(AUTHOR_NAMES)
    pages = probe.warm(BOOK_PAGES)
    documents = probe.warm(DOCUMENT_DATA)
    with transaction.atomic():
        Author.objects.filter(name="Ann").update(name="Anne")
        with pytest.raises(Boom), transaction.atomic():
            Book.objects.filter(title="Book 0").update(pages=1)
            raise Boom
        with transaction.atomic():  # released: its writes survive
            Document.objects.filter(pk=world.memo.pk).update(data={"v": 9})
    authors.assert_invalidated()
    documents.assert_invalidated()
    pages.assert_still_cached()


def test_a_table_written_in_and_out_of_a_rolled_back_savepoint_is_invalidated(
    world, probe
):
    warm = probe.warm(BOOK_PAGES)
    with transaction.atomic():
        Book.objects.filter(title="Book 1").update(pages=2)
        with pytest.raises(Boom), transaction.atomic():
            Book.objects.filter(title="Book 0").update(pages=1)
            raise Boom
    warm.assert_invalidated()


def test_a_failing_on_commit_callback_does_not_prevent_the_invalidation(world, probe):
    warm = probe.warm(BOOK_PAGES)
    with pytest.raises(Boom), transaction.atomic():
        transaction.on_commit(boom)  # before the write, so first in Django's list
        Book.objects.filter(title="Book 0").update(pages=1)
    assert Book.objects.get(title="Book 0").pages == 1  # committed
    warm.assert_invalidated()


def test_a_failing_on_commit_callback_of_a_savepoint_does_not_prevent_it(world, probe):
    warm = probe.warm(BOOK_PAGES)
    with pytest.raises(Boom), transaction.atomic():
        with transaction.atomic():
            transaction.on_commit(boom)
        Book.objects.filter(title="Book 0").update(pages=1)
        with transaction.atomic():
            Book.objects.filter(title="Book 1").update(pages=2)
    warm.assert_invalidated()


def test_a_manual_transaction_invalidates_at_commit(world, probe):
    warm = probe.warm(BOOK_PAGES)
    transaction.set_autocommit(False)
    try:
        Book.objects.filter(title="Book 0").update(pages=1)
        transaction.commit()
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
    warm.assert_invalidated()


def test_a_manual_transaction_read_by_another_thread_before_its_commit(world, probe):
    warm = probe.warm(BOOK_PAGES)
    transaction.set_autocommit(False)
    try:
        Book.objects.filter(title="Book 0").update(pages=1)
        assert in_another_thread(BOOK_PAGES.cached) == warm.before  # committed rows
        transaction.commit()
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
    warm.assert_invalidated()


# -- Async writes, and writes in asynchrormous.atomic() ------------------------------


async def test_aupdate_invalidates_an_awaited_read(world, probe):
    warm = await probe.awarm(BOOK_PAGES)
    assert await Book.objects.filter(title="Book 0").aupdate(pages=1) == 1
    await warm.aassert_invalidated()


async def test_acreate_and_abulk_create_invalidate(world, probe):
    warm = await probe.awarm(BOOK_COUNT)
    await Book.objects.acreate(title="Async", author=world.ann)
    warm = Warm(probe, BOOK_COUNT, "await", await warm.aassert_invalidated())
    await Book.objects.abulk_create([Book(title="A", author=world.ann)])
    await warm.aassert_invalidated()


async def test_asave_and_adelete_of_an_instance_invalidate(world, probe):
    book = world.books[0]
    warm = await probe.awarm(BOOK_PAGES)
    book.pages = 5
    await book.asave()
    warm = Warm(probe, BOOK_PAGES, "await", await warm.aassert_invalidated())
    await book.adelete()
    await warm.aassert_invalidated()


async def test_an_async_block_invalidates_at_its_commit_and_not_before(world, probe):
    warm = await probe.awarm(BOOK_PAGES)
    async with atomic():
        await Book.objects.filter(title="Book 0").aupdate(pages=1)
        assert await from_another_thread(BOOK_PAGES.cached) == warm.before
        assert probe.take() == ["hit"]
        # In the block, after its write: from the database, its own write.
        seen = await BOOK_PAGES.acached()
        assert probe.take() == ["bypass"]
        assert seen == await BOOK_PAGES.afresh() != warm.before
    await warm.aassert_invalidated()


async def test_an_async_block_that_rolls_back_does_not_invalidate(world, probe):
    warm = await probe.awarm(BOOK_PAGES)
    with pytest.raises(Boom):
        async with atomic():
            await Book.objects.filter(title="Book 0").aupdate(pages=1)
            await Book.objects.acreate(title="Rolled back", author=world.ann)
            raise Boom
    await warm.aassert_still_cached()


async def test_an_async_savepoint_rolled_back_invalidates_only_the_survivors(
    world, probe
):
    authors = await probe.awarm(AUTHOR_NAMES)
    pages = await probe.awarm(BOOK_PAGES)
    async with atomic():
        await Author.objects.filter(name="Ann").aupdate(name="Anne")
        with pytest.raises(Boom):
            async with atomic():
                await Book.objects.filter(title="Book 0").aupdate(pages=1)
                raise Boom
    await authors.aassert_invalidated()
    await pages.aassert_still_cached()


async def test_a_failing_on_commit_callback_of_an_async_block_does_not_prevent_it(
    world, probe
):
    warm = await probe.awarm(BOOK_PAGES)
    with pytest.raises(Boom):
        async with atomic():
            await on_commit(boom)
            await Book.objects.filter(title="Book 0").aupdate(pages=1)
    await warm.aassert_invalidated()
