"""Prefetch lookups side by side: a background fetch runs independent lookups' queries
at once, with exactly Django's results, caches and number of queries."""

import re
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.db.models import Prefetch
from django.db.models import prefetch_related_objects as django_prefetch
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import asynchrormous
from asynchrormous import AsyncQuerySet, atomic, prefetch, resolve
from asynchrormous.results import submit
from tests.helpers import backend_id_expr, caller_backend_id, occupy_a_worker
from tests.testapp.models import Author, Book, Label, Publisher, Reader, Shelf, Tag

pytestmark = pytest.mark.django_db(transaction=True)


class AtBarrier(AsyncQuerySet):
    """A queryset whose evaluation waits until ``barrier`` lets it pass."""

    barrier = None
    patience = 10.0
    error = None
    delay = 0.0

    def _fetch_all(self):
        if self._result_cache is None:
            time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            if self.barrier is not None:
                self.barrier.wait(timeout=self.patience)
        super()._fetch_all()

    def _clone(self):
        clone = super()._clone()
        clone.barrier, clone.patience = self.barrier, self.patience
        clone.error, clone.delay = self.error, self.delay
        return clone


def at_barrier(model, barrier=None, error=None, delay=0.0, patience=10.0):
    qs = AtBarrier(model).annotate(session=backend_id_expr())
    qs.barrier, qs.patience, qs.error, qs.delay = barrier, patience, error, delay
    return qs


@pytest.fixture
def library(db):
    pubs = [Publisher.objects.create(name=f"Pub {i}") for i in range(2)]
    tags = [Tag.objects.create(name=f"tag {i}") for i in range(3)]
    for a in range(3):
        author = Author.objects.create(name=f"Author {a}")
        Label.objects.create(content_object=author, text=f"on author {a}")
        for b in range(3):
            book = Book.objects.create(
                title=f"Book {a}.{b}",
                author=author,
                publisher=pubs[b % 2] if b else None,
                year=1990 + b,
            )
            book.tags.set(tags[: b + 1])
            for n in range(b):
                Label.objects.create(content_object=book, text=f"on {a}.{b} #{n}")
    for s in range(3):
        shelf = Shelf.objects.create(name=f"Shelf {s}")
        reader = Reader.objects.create(name=f"Reader {s}")
        for n in range(s + 1):
            Label.objects.create(content_object=shelf, text=f"on shelf {s} #{n}")
            Label.objects.create(content_object=reader, text=f"on reader {s} #{n}")
    # Cached, as in a warm process.
    ContentType.objects.get_for_models(Author, Book, Shelf, Reader)


def state(obj, to_attrs, depth=4):
    """What prefetching left on ``obj``: its caches, to_attr lists and their rows."""
    if depth == 0 or obj is None:
        return None if obj is None else (type(obj).__name__, obj.pk)
    found = {"model": type(obj).__name__, "pk": obj.pk}
    cache = getattr(obj, "_prefetched_objects_cache", None)
    if cache is not None:
        found["prefetched"] = {
            key: [state(o, to_attrs, depth - 1) for o in qs._result_cache]
            for key, qs in sorted(cache.items())
        }
    found["fields_cache"] = {
        key: state(value, to_attrs, depth - 1)
        for key, value in sorted(obj._state.fields_cache.items())
    }
    for attr in to_attrs:
        if attr in vars(obj):
            value = vars(obj)[attr]
            found[attr] = (
                [state(o, to_attrs, depth - 1) for o in value]
                if isinstance(value, list)
                else state(value, to_attrs, depth - 1)
            )
    return found


def _is_ours(sql):
    # Not a new connection's own set-up statements (MariaDB's SET ..., its version).
    return "testapp_" in sql or "django_content_type" in sql


def statements(jobs):
    return sum(1 for job in jobs for sql in job["sql"] if _is_ours(sql))


CASES = {
    "independent": lambda: Book.objects.prefetch_related(
        "author",
        "publisher",
        "tags",
        Prefetch("tags", Tag.objects.order_by("-name"), to_attr="tag_list"),
    ),
    "nested after parent": lambda: Author.objects.prefetch_related(
        "books", "books__tags", "books__publisher", "books__author"
    ),
    "to_attr twice": lambda: Author.objects.prefetch_related(
        Prefetch("books", Book.objects.filter(year__lt=1991), to_attr="old"),
        Prefetch("books", Book.objects.filter(year__gte=1991), to_attr="new"),
        "books",
    ),
    "through select_related": lambda: Book.objects.select_related(
        "author"
    ).prefetch_related("author__books", "publisher", "tags"),
    "generic foreign key": lambda: Label.objects.prefetch_related(
        "content_object", "content_type"
    ),
    "generic relation": lambda: Shelf.objects.prefetch_related(
        "labels",
        "labels__content_object",
        Prefetch("labels", Label.objects.filter(text__endswith="#0"), to_attr="old"),
    ),
    "lookups of the related queryset": lambda: Author.objects.prefetch_related(
        Prefetch("books", Book.objects.prefetch_related("tags", "publisher")),
        "books__author",
        Prefetch("books", to_attr="recent"),
    ),
    "Prefetch querysets of the related queryset": lambda: Book.objects.prefetch_related(
        Prefetch(
            "tags",
            Tag.objects.prefetch_related(
                Prefetch("books", Book.objects.order_by("-year"), to_attr="tagged")
            ),
        ),
        "author",
    ),
    "nested Prefetch to_attr": lambda: Author.objects.prefetch_related(
        Prefetch("books", Book.objects.order_by("-year"), to_attr="recent"),
        Prefetch("recent__tags", Tag.objects.order_by("-name"), to_attr="tag_list"),
        "books__publisher",
    ),
}
TO_ATTRS = ("old", "new", "recent", "tag_list", "tagged")


def plain(case):
    list(CASES[case]())  # warm: the same process state for both
    with CaptureQueriesContext(connection) as queries:
        rows = list(CASES[case]())
    queries = [q["sql"] for q in queries.captured_queries if _is_ours(q["sql"])]
    return [state(o, TO_ATTRS) for o in rows], len(queries)


@pytest.mark.parametrize("case", CASES)
def test_background_fetch_gives_djangos_caches_and_queries(library, jobs, case):
    expected, queries = plain(case)
    jobs.clear()
    rows = list(CASES[case]().run_async())
    assert [state(o, TO_ATTRS) for o in rows] == expected
    assert statements(jobs) == queries


@pytest.mark.parametrize("case", CASES)
def test_await_gives_djangos_caches_and_queries(library, jobs, case):
    expected, queries = plain(case)
    jobs.clear()
    rows = async_to_sync(_awaited)(CASES[case]())
    assert [state(o, TO_ATTRS) for o in rows] == expected
    assert statements(jobs) == queries


async def _awaited(qs):
    return await qs


def _started_at_once(self, step):
    """A step's query run here and now, when predicted: before Django's earlier
    steps assign, the earliest a worker could run it."""
    self.steps[step.path] = step
    try:
        step.outcome = step.call()
    except Exception as exc:
        step.error = exc


@pytest.mark.parametrize("case", CASES)
def test_every_query_started_ahead_is_the_one_django_asks_for(
    library, case, monkeypatch
):
    # A query started for a step Django does not take would show as one more query.
    qs = CASES[case]()
    lookups = qs._prefetch_related_lookups
    expected = list(qs.prefetch_related(None))
    django_prefetch(expected, *lookups)  # warm
    expected = list(qs.prefetch_related(None))
    with CaptureQueriesContext(connection) as django_queries:
        django_prefetch(expected, *lookups)
    dropped = []
    monkeypatch.setattr(prefetch._Run, "start", _started_at_once)
    monkeypatch.setattr(prefetch._Run, "drop", lambda run, s: dropped.append(s.path))
    rows = list(qs.prefetch_related(None))
    with CaptureQueriesContext(connection) as queries:
        prefetch.prefetch_related_objects(rows, *lookups)
    assert [state(o, TO_ATTRS) for o in rows] == [state(o, TO_ATTRS) for o in expected]
    assert len(queries) == len(django_queries)
    assert dropped == []


@pytest.mark.parametrize("how", ["background", "await"])
def test_lookups_run_side_by_side_on_their_own_sessions(library, jobs, how):
    # Each lookup's query waits until both are running: one after the other, as
    # Django runs them, the barrier would break.
    barrier = threading.Barrier(2)
    qs = Author.objects.prefetch_related(
        Prefetch("books", at_barrier(Book, barrier), to_attr="a"),
        Prefetch("books", at_barrier(Book, barrier), to_attr="b"),
    ).annotate(session=backend_id_expr())
    if how == "await":
        authors = async_to_sync(_awaited)(qs)
    else:
        authors = list(qs.run_async())
    sessions = {
        (author.a[0].session, author.b[0].session, author.session) for author in authors
    }
    (a, b, main), *_ = sessions
    assert len({a, b, main}) >= 2 and a != b
    assert not barrier.broken
    threads = {job["thread"] for job in jobs if job["description"].startswith("pre")}
    assert threads  # at least one lookup ran as a job of its own


def test_plain_django_evaluation_stays_sequential(library):
    # Without run_async(), Django's own loop: the first lookup waits alone.
    barrier = threading.Barrier(2)
    qs = Author.objects.prefetch_related(
        Prefetch("books", at_barrier(Book, barrier, patience=0.5), to_attr="a"),
        Prefetch("books", at_barrier(Book, barrier, patience=0.5), to_attr="b"),
    )
    with pytest.raises(threading.BrokenBarrierError):
        list(qs)


def test_the_first_error_in_djangos_order_is_raised(library):
    # The second lookup fails late, the third at once: Django meets the second first.
    qs = Author.objects.prefetch_related(
        "books",
        Prefetch("books", at_barrier(Book, error=ValueError("second"), delay=0.3), "x"),
        Prefetch("books", at_barrier(Book, error=ValueError("third")), to_attr="y"),
        Prefetch("books", at_barrier(Book, delay=0.5), to_attr="z"),
    ).run_async()
    with pytest.raises(ValueError, match="second"):
        list(qs)
    # Nothing of it is left running for ever: the pool stops in time.
    asynchrormous.shutdown(timeout=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("asynchron")]


@pytest.mark.parametrize(
    "lookups",
    [
        ("books", "nonexistent"),
        ("nonexistent", "books"),
        ("books__title",),
        ("books", Prefetch("books", Book.objects.all())),  # "already seen"
    ],
)
def test_bad_lookups_raise_djangos_error(library, lookups):
    with pytest.raises((AttributeError, ValueError)) as django_error:
        list(Author.objects.prefetch_related(*lookups))
    message = re.escape(str(django_error.value))
    with pytest.raises(type(django_error.value), match=message):
        list(Author.objects.prefetch_related(*lookups).run_async())


def _all_sessions(qs):
    authors = resolve(qs)
    return {author.session for author in authors} | {
        book.session for author in authors for book in author.a + author.b
    }


def _two_lookups():
    return Author.objects.prefetch_related(
        Prefetch("books", at_barrier(Book), to_attr="a"),
        Prefetch("books", at_barrier(Book), to_attr="b"),
    ).annotate(session=backend_id_expr())


def test_inside_atomic_lookups_run_in_order_on_the_callers_connection(library):
    with transaction.atomic():
        Book.objects.create(title="Uncommitted", author=Author.objects.first())
        qs = _two_lookups().run_async()
        assert _all_sessions(qs) == {caller_backend_id()}
        assert "Uncommitted" in {b.title for a in qs for b in a.a}


async def test_inside_async_atomic_lookups_run_on_the_blocks_connection(library):
    async with atomic():
        await Book.objects.acreate(
            title="Uncommitted", author=await Author.objects.afirst()
        )
        authors = await _two_lookups()
        sessions = {a.session for a in authors} | {
            b.session for a in authors for b in a.a + a.b
        }
        assert len(sessions) == 1
        assert "Uncommitted" in {b.title for a in authors for b in a.a}


def test_with_one_worker_lookups_run_in_order(library):
    expected, _ = plain("nested after parent")
    with override_settings(ASYNCHRORMOUS={"WORKERS": 1, "TIMEOUT": 10}):
        rows = list(CASES["nested after parent"]().run_async())
        assert len(_all_sessions(_two_lookups().run_async())) == 1
    assert [state(o, TO_ATTRS) for o in rows] == expected


def test_a_fetch_nested_in_a_job_with_every_other_worker_busy_finishes(library):
    expected, _ = plain("independent")
    release = threading.Event()
    with override_settings(ASYNCHRORMOUS={"WORKERS": 2, "TIMEOUT": 10}):
        busy = occupy_a_worker(release)
        try:
            # The job's own worker is the only free one: it runs the lookups itself.
            job = submit(
                lambda: list(CASES["independent"]().run_async()),
                alias="default",
                writes=False,
                description="a job that fetches",
            )
            rows = job.result(10)
        finally:
            release.set()
        busy.result(10)
    assert [state(o, TO_ATTRS) for o in rows] == expected
