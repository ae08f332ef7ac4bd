"""The caller's context reaches the job, whatever asgiref version is installed.

DESIGN.md, "Under concurrency, cancellation and faults": contextvars and asgiref
``Local`` state as the caller sees it (the active time zone, the active language);
an async helper run with ``async_to_sync`` from a sync caller reads that caller's
pending writes.
"""

import datetime
import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.db.models import DateTimeField, Value
from django.utils import timezone, translation

from asynchrormous import resolve
from asynchrormous.results import submit
from tests.helpers import occupy_a_worker
from tests.regression_helpers import slow_same
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

# 20:00 UTC on 1 January is 05:00 on 2 January in Tokyo.
EVENING = datetime.datetime(2024, 1, 1, 20, 0, tzinfo=datetime.timezone.utc)
TOKYO_DATE = datetime.date(2024, 1, 2)


def mysql_lacks_time_zone_tables():
    if connection.vendor != "mysql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONVERT_TZ('2024-01-01 20:00:00', 'UTC', 'Asia/Tokyo')")
        return cursor.fetchone()[0] is None


def on_tokyo_date():
    at = Value(EVENING, output_field=DateTimeField())
    return Book.objects.annotate(at=at).filter(at__date=TOKYO_DATE)


def test_a_background_date_lookup_uses_the_callers_time_zone(books):
    if mysql_lacks_time_zone_tables():
        pytest.skip("the MySQL server has no time zone tables (mysql_tzinfo_to_sql)")
    assert on_tokyo_date().count() == 0  # in the default time zone (Chicago)
    with timezone.override("Asia/Tokyo"):
        expected = on_tokyo_date().count()
        background = on_tokyo_date().run_async().count()
        assert expected == 6
        assert resolve(background) == expected


def test_a_job_sees_the_callers_active_time_zone(books):
    with timezone.override("Asia/Tokyo"):
        job = submit(
            timezone.get_current_timezone_name,
            alias="default",
            writes=False,
            description="time zone",
        )
        assert job.result(10) == "Asia/Tokyo"


def test_a_job_sees_the_callers_active_language(books):
    assert translation.get_language() != "fr"
    with translation.override("fr"):
        job = submit(
            translation.get_language,
            alias="default",
            writes=False,
            description="language",
        )
        assert job.result(10) == "fr"


def test_an_async_helper_reads_the_sync_callers_pending_update(books):
    book, other = books[0], books[1]
    # The caller's writes run in order: the update of `book` waits behind this slow
    # one, so it is still pending when the helper reads.
    Book.objects.run_async().filter(pk=other.pk).update(year=slow_same("year", 1.0))
    Book.objects.run_async().filter(pk=book.pk).update(title="new")

    async def helper():
        got = await Book.objects.aget(pk=book.pk)
        first = await Book.objects.filter(pk=book.pk).afirst()
        return got.title, first.title

    assert async_to_sync(helper)() == ("new", "new")


def test_a_job_run_after_the_override_ended_still_sees_it(db, settings):
    """asgiref before 3.12 keeps a Local's values in one dict per context and changes
    it in place: the job's copy of the context lost the time zone and the language
    when the caller's override() ended, if no worker had run the job by then."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    release = threading.Event()
    occupy_a_worker(release)

    def seen():
        return timezone.get_current_timezone_name(), translation.get_language()

    with timezone.override("Asia/Tokyo"), translation.override("fr"):
        job = submit(seen, alias="default", writes=False, description="seen")
    release.set()
    # An explicit timeout: the worker runs it, after the override() ended.
    assert job.result(10) == ("Asia/Tokyo", "fr")
    assert timezone.get_current_timezone_name() != "Asia/Tokyo"
