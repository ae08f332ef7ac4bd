"""Bad settings and databases the workers cannot share are reported clearly."""

import re

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test.utils import override_settings

from asynchrormous.checks import check_databases, check_settings, database_messages
from asynchrormous.conf import get_settings
from tests.testapp.models import Book


def ids(messages):
    return [m.id for m in messages]


def test_valid_settings_pass():
    assert check_settings() == [] and check_databases() == []
    assert get_settings().workers == 4


@pytest.mark.parametrize(
    ("value", "check_id", "fragment"),
    [
        ([("WORKERS", 2)], "asynchrormous.E001", "must be a dict"),
        ({"WORKER": 2}, "asynchrormous.E002", "unknown key(s) WORKER"),
        ({"WORKERS": 0}, "asynchrormous.E003", "integer >= 1, not 0"),
        ({"WORKERS": "8"}, "asynchrormous.E003", "not '8'"),
        ({"TIMEOUT": -1}, "asynchrormous.E004", "seconds > 0 or None, not -1"),
        ({"CONNECTION_MAX_AGE": "1h"}, "asynchrormous.E005", "not '1h'"),
        ({"CONNECTION_IDLE_TIMEOUT": None}, "asynchrormous.E006", "> 0, not None"),
        ({"CALLER_RUNS": "yes"}, "asynchrormous.E008", "True or False, not 'yes'"),
    ],
)
def test_invalid_settings_are_system_check_errors_and_improperly_configured(
    value, check_id, fragment
):
    with override_settings(ASYNCHRORMOUS=value):
        (error,) = check_settings()
        assert error.id == check_id and fragment in error.msg and error.hint
        with pytest.raises(ImproperlyConfigured, match=re.escape(fragment)):
            get_settings()


@pytest.mark.django_db(transaction=True)
def test_the_first_background_query_reports_a_bad_setting():
    with override_settings(ASYNCHRORMOUS={"WORKERS": 0}):
        with pytest.raises(ImproperlyConfigured, match="WORKERS"):
            Book.objects.run_async().count()


def test_sqlite_without_busy_timeout_or_wal_is_warned():
    dbs = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.sqlite3"}}
    (warning,) = database_messages(dbs)
    assert warning.id == "asynchrormous.W001" and "database is locked" in warning.msg


def test_private_in_memory_sqlite_is_an_error():
    dbs = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    assert ids(database_messages(dbs)) == ["asynchrormous.E007"]


def test_recommended_sqlite_options_and_servers_pass():
    dbs = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "x.sqlite3",
            "OPTIONS": {"timeout": 20, "init_command": "PRAGMA journal_mode = WAL;"},
        },
        "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": "x"},
        "shared": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "file:x?mode=memory&cache=shared",
            "OPTIONS": {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL"},
        },
    }
    assert database_messages(dbs) == []


def test_untested_backends_are_warned():
    dbs = {"default": {"ENGINE": "django.db.backends.oracle", "NAME": "x"}}
    assert ids(database_messages(dbs)) == ["asynchrormous.W002"]
