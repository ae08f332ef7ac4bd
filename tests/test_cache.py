"""qs.cache(): which reads are cached, in which modes, and what they answer."""

import re

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import Count, Max, Sum
from django.test.utils import CaptureQueriesContext, override_settings

from asynchrormous import AsyncManager, resolve, wait
from asynchrormous.cache import invalidate, uncached
from asynchrormous.checks import cache_messages, check_cache
from asynchrormous.conf import get_settings
from tests.cache_helpers import recording, turn_on
from tests.helpers import not_shared_cache, ran_in_background
from tests.testapp.models import Author, Book, Gauge, GaugeReading

pytestmark = pytest.mark.django_db(transaction=True)

# SQLite's transactions read one snapshot (REPEATABLE READ): the cache, which may be
# newer, is not used in them.
SNAPSHOT = connection.vendor == "sqlite"


def shape(value):
    """A result as plain data, so that two runs' answers compare field by field."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(v) for v in value]
    if hasattr(value, "_meta"):
        return (type(value).__name__, value.pk, vars(value).get("title"))
    return value


# Each read terminal, as a function of a queryset of books.
READS = {
    "iteration": lambda qs: list(qs.order_by("pk")),
    "len": lambda qs: len(qs),
    "bool": lambda qs: bool(qs),
    "slice": lambda qs: list(qs.order_by("pk")[1:3]),
    "index": lambda qs: qs.order_by("pk")[2],
    "count": lambda qs: qs.count(),
    "exists": lambda qs: qs.filter(pages__gt=120).exists(),
    "aggregate": lambda qs: qs.aggregate(Sum("pages"), Max("year")),
    "get": lambda qs: qs.get(title="Book 3"),
    "first": lambda qs: qs.order_by("pages").first(),
    "last": lambda qs: qs.order_by("pages").last(),
    "earliest": lambda qs: qs.earliest("year"),
    "latest": lambda qs: qs.latest("year"),
    "values": lambda qs: list(qs.order_by("pk").values("title", "author__name")),
    "values_list": lambda qs: list(qs.order_by("pk").values_list("pages", flat=True)),
    "in_bulk": lambda qs: qs.in_bulk(),
    "annotate": lambda qs: list(
        qs.values("author").annotate(n=Count("pk"), m=Max("pages")).order_by("author")
    ),
    "select_related": lambda qs: [
        b.author.name for b in qs.select_related("author").order_by("pk")
    ],
}


def uncached_answer(read):
    return shape(read(Book.objects.all()))


@pytest.mark.parametrize("name", READS)
def test_a_read_is_answered_from_the_cache_the_second_time(name, books, caching):
    read = READS[name]
    expected = uncached_answer(read)
    assert shape(read(Book.objects.cache())) == expected
    assert set(caching.take()) == {"miss"}
    with CaptureQueriesContext(connection) as queries:
        assert shape(read(Book.objects.cache())) == expected
    assert set(caching.take()) == {"hit"}
    assert len(queries) == 0


# Statements that make a session's reads its own (sqltables.changes_the_session).
SESSION_SQL = {"postgresql": "SET search_path TO public", "mysql": "SET @x = 1"}


def change_the_session():
    with connection.cursor() as cursor:
        cursor.execute(SESSION_SQL[connection.vendor])


# What the connection was set to before it closed.
BEFORE_CLOSE = [
    pytest.param(lambda: None, id="nothing"),
    pytest.param(lambda: transaction.set_autocommit(False), id="manual"),
    pytest.param(
        change_the_session,
        id="SET",
        marks=pytest.mark.skipif(connection.vendor == "sqlite", reason="no SET"),
    ),
]


@not_shared_cache  # Django never closes an in-memory SQLite connection
@pytest.mark.parametrize("before_close", BEFORE_CLOSE)
def test_a_hit_opens_no_connection(books, caching, before_close):
    """A closed connection is in no transaction and has no session of its own: the
    next one starts in its settings' AUTOCOMMIT mode, with Django's settings."""
    assert Book.objects.cache().count() == 6
    before_close()
    connection.close()
    assert Book.objects.cache().count() == 6
    assert connection.connection is None
    assert caching.take() == ["miss", "hit"]


@pytest.mark.parametrize(
    "name", ["iteration", "count", "exists", "aggregate", "get", "first", "in_bulk"]
)
def test_background_reads_are_cached_on_the_worker(name, books, caching, jobs):
    read = READS[name]
    expected = uncached_answer(read)
    for outcome in ("miss", "hit"):
        qs = Book.objects.cache().run_async()
        result = read(qs)
        wait(result if name != "iteration" else qs)
        assert shape(resolve(result)) == expected
        assert set(caching.take()) == {outcome}
    assert jobs and all(ran_in_background(job) for job in jobs)
    assert any(job["thread"].startswith("asynchrormous-") for job in jobs)


async def test_awaited_reads_are_cached(books, caching):
    expected = [b.pk async for b in Book.objects.order_by("pk")]
    for outcome in ("miss", "hit"):
        rows = await Book.objects.cache().order_by("pk")
        assert [b.pk for b in rows] == expected
        assert await Book.objects.cache().acount() == len(expected)
        got = await Book.objects.cache().aget(pk=expected[0])
        assert got.pk == expected[0]
        assert await Book.objects.cache().filter(pk=-1).aexists() is False
        assert caching.take() == [outcome] * 4


def test_a_hit_gives_what_django_gives_with_prefetch_and_time_zones(books, caching):
    def read():
        return [
            (b.pk, b.published, [t.name for t in b.tags.all()], b.author.name)
            for b in Book.objects.cache()
            .select_related("author")
            .prefetch_related("tags")
            .order_by("pk")
        ]

    books[0].tags.create(name="x")
    plain = read()
    assert read() == plain
    assert "hit" in caching.take()


def test_iterator_and_select_for_update_read_the_database(books, caching):
    qs = Book.objects.cache()
    assert len(list(qs.iterator())) == len(books)
    assert len(list(qs.iterator(chunk_size=2))) == len(books)
    with transaction.atomic():
        assert len(list(qs.select_for_update())) == len(books)
    assert caching.take() == []


async def test_aiterator_reads_the_database(books, caching):
    assert len([b async for b in Book.objects.cache().aiterator()]) == len(books)
    assert caching.take() == []


def test_timeout_zero_and_uncached_read_the_database(books, caching):
    assert Book.objects.cache(timeout=0).count() == len(books)
    with uncached():
        assert Book.objects.cache().count() == len(books)
        assert Book.objects.cache().count() == len(books)
    assert caching.take() == []


def test_writes_through_a_cached_queryset_read_the_rows_from_the_database(
    books, caching
):
    qs = Book.objects.cache().filter(pages__gt=120)
    assert qs.count() == 3
    assert qs.delete()[0] == 3  # its collector's SELECT is not cached
    assert caching.take() == ["miss"]
    assert qs.all().count() == 0


def test_a_transaction_reads_the_database_for_the_tables_it_wrote(books, caching):
    qs = Book.objects.cache()
    assert qs.count() == 6
    with transaction.atomic():
        assert qs.count() == 6  # nothing written yet: from the cache
        Author.objects.create(name="Cy")
        assert qs.count() == 6  # another table was written
        Book.objects.filter(pk=books[0].pk).delete()
        assert qs.count() == 5  # its own write
        assert Author.objects.cache().count() == 3
    if SNAPSHOT:  # a transaction there reads one snapshot: never the cache
        assert caching.take() == ["miss", "bypass", "bypass", "bypass", "bypass"]
    else:
        assert caching.take() == ["miss", "hit", "hit", "bypass", "bypass"]
    assert qs.count() == 5
    assert caching.take() == ["miss"]


def test_a_miss_inside_a_transaction_is_not_kept(books, caching):
    with transaction.atomic():
        assert Book.objects.cache().count() == 6
    assert Book.objects.cache().count() == 6
    assert caching.take() == ["bypass" if SNAPSHOT else "miss", "miss"]


def test_invalidate_drops_the_results_of_a_model_a_table_or_everything(books, caching):
    def warm():
        assert Book.objects.cache().count() == 6
        assert Author.objects.cache().count() == 2
        caching.take()

    warm()
    invalidate(Book)
    warm()  # Author's was kept
    assert Book.objects.cache().count() == 6 and Author.objects.cache().count() == 2
    assert caching.take() == ["hit", "hit"]
    invalidate("TESTAPP_AUTHOR", using="default")
    assert Book.objects.cache().count() == 6 and Author.objects.cache().count() == 2
    assert caching.take() == ["hit", "miss"]
    invalidate()
    assert Book.objects.cache().count() == 6 and Author.objects.cache().count() == 2
    assert caching.take() == ["miss", "miss"]
    with pytest.raises(TypeError, match="models and table names, not 3"):
        invalidate(3)


def test_a_managers_default_and_its_related_managers(books, caching):
    gauge = Gauge.objects.create(name="g", value=1)
    gauge.readings.create(value=5)
    for _ in range(2):
        assert Gauge.objects.get(pk=gauge.pk).value == 1
        assert list(gauge.readings.values_list("value", flat=True)) == [5]
        assert Gauge.fresh.count() == 1  # a second manager without the default
    assert caching.take() == ["miss", "miss", "hit", "hit"]
    assert Gauge.objects.all()._cache_timeout == get_settings().cache_timeout
    assert GaugeReading.objects.all()._cache_timeout == 60
    assert gauge.readings.all()._cache_timeout == 60


def test_a_managers_default_reads_the_database_without_a_cache_setting(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 2}
    assert Gauge.objects.all()._cache_timeout == 0
    (warning,) = check_cache()
    assert warning.id == "asynchrormous.W005"
    assert "testapp.Gauge.objects" in warning.msg
    assert "testapp.GaugeReading.objects" in warning.msg


def test_cache_without_a_cache_setting_names_it(books):
    with pytest.raises(ImproperlyConfigured, match=re.escape("ASYNCHRORMOUS['CACHE']")):
        Book.objects.cache()
    assert Book.objects.cache(timeout=0).count() == 6


@pytest.mark.parametrize("bad", [-1, "60", True, [1]])
def test_a_bad_timeout_is_named(bad, caching):
    with pytest.raises(ValueError, match=re.escape(f"not {bad!r}")):
        Book.objects.cache(timeout=bad)
    if bad is not True:  # AsyncManager(cache=True) means CACHE_TIMEOUT
        with pytest.raises(ValueError, match=re.escape(f"not {bad!r}")):
            AsyncManager(cache=bad)


@pytest.mark.parametrize(
    ("value", "check_id", "fragment"),
    [
        ({"CACHE": "nope"}, "asynchrormous.E009", "alias of settings.CACHES"),
        ({"CACHE": "redis", "CACHE_TIMEOUT": 0}, "asynchrormous.E010", "not 0"),
        ({"CACHE": "redis", "CACHE_PREFIX": "a b"}, "asynchrormous.E011", "spaces"),
    ],
)
def test_bad_cache_settings_are_errors(value, check_id, fragment):
    from asynchrormous.checks import check_settings

    with override_settings(ASYNCHRORMOUS=value):
        (error,) = check_settings()
        assert error.id == check_id and fragment in error.msg
        with pytest.raises(ImproperlyConfigured, match=re.escape(fragment)):
            get_settings()


def test_a_per_process_cache_and_missing_socket_timeouts_are_warned():
    (local,) = cache_messages(
        "c", {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
    assert local.id == "asynchrormous.W003" and "private to each process" in local.msg
    (redis,) = cache_messages(
        "c", {"BACKEND": "django.core.cache.backends.redis.RedisCache"}
    )
    assert redis.id == "asynchrormous.W004"
    assert "socket_timeout, socket_connect_timeout" in redis.msg
    memcached = {
        "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
        "OPTIONS": {"timeout": 0.25, "connect_timeout": 0.25},
    }
    assert cache_messages("c", memcached) == []


@pytest.fixture
def database_cache(settings):
    """Caching on in Django's DatabaseCache, a table of the test database."""
    settings.CACHES = {
        **settings.CACHES,
        "db": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "asynchrormous_test_cache",
        },
    }
    call_command("createcachetable", "asynchrormous_test_cache", verbosity=0)
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0, "CACHE": "db"}
    invalidate()
    outcomes = recording()
    yield outcomes
    outcomes.stop()


def test_the_database_cache_keeps_results_and_its_own_writes_invalidate_nothing(
    books, database_cache
):
    qs = Book.objects.cache().filter(pages__gt=120)
    assert qs.count() == 3 and qs.count() == 3  # its SQL writes are the cache's
    Book.objects.filter(pk=books[-1].pk).update(pages=1)
    assert qs.count() == 2 and qs.count() == 2
    with transaction.atomic():
        assert qs.count() == 2
        Book.objects.filter(pk=books[-2].pk).update(pages=1)
        assert qs.count() == 1
    assert qs.count() == 1
    assert database_cache.take() == [
        *("miss", "hit", "miss", "hit"),
        *("bypass" if SNAPSHOT else "hit", "bypass", "miss"),
    ]


def test_the_readmes_caching_example(books, settings):
    turn_on(settings, "redis")
    outcomes = recording()
    try:
        n = Book.objects.cache().filter(year__gte=1993).count()  # the database
        n = Book.objects.cache().filter(year__gte=1993).count()  # from the cache
        assert n == 3
        Book.objects.filter(pk=books[0].pk).update(year=2001)  # drops the count
        assert Book.objects.cache().filter(year__gte=1993).count() == 4
        top = list(Book.objects.cache(timeout=60).order_by("-pages")[:10])
        assert [b.pk for b in top] == [b.pk for b in reversed(books)]
        assert outcomes.take() == ["miss", "hit", "miss", "miss"]
    finally:
        outcomes.stop()
