"""No lost writes: a background write lands or its failure is reported, once.

DESIGN.md, "Under concurrency, cancellation and faults": at shutdown() and at
interpreter exit queued writes run to completion (bounded by TIMEOUT); a job dropped
or failing there is logged; a fire-and-forget create() that fails is logged; an
error already raised to the caller is never also logged as unobserved.
"""

import gc
import logging
import subprocess
import sys
import textwrap
import threading

import pytest
from django.db import DatabaseError, IntegrityError, connection
from django.db.models.expressions import RawSQL

import asynchrormous
from asynchrormous import resolve, wait
from tests.helpers import not_shared_cache
from tests.regression_helpers import slow_fetch, subprocess_env
from tests.testapp.models import Book, Publisher

pytestmark = pytest.mark.django_db(transaction=True)

WRITES = [f"w{i}" for i in range(20)]


def asynchrormous_records(caplog, level=logging.WARNING):
    return [
        r for r in caplog.records if r.name == "asynchrormous" and r.levelno >= level
    ]


def naming(records, *words):
    """The records whose message (or logged traceback) mentions every word."""
    found = []
    for record in records:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {type(record.exc_info[1]).__name__} {record.exc_info[1]}"
        if all(word in text for word in words):
            found.append(record)
    return found


def join_workers(timeout=15.0):
    """Wait, bounded, until no worker thread of any pool is left running."""
    for thread in threading.enumerate():
        if thread.name.startswith("asynchrormous-"):
            thread.join(timeout)
            assert not thread.is_alive(), f"{thread.name} still running"


SCRIPT = """
import django

django.setup()

from tests.regression_helpers import slow_fetch
from tests.testapp.models import Book, Publisher

# WORKERS = 2: two slow reads hold both workers, so every write below is queued
# behind them when the script ends.
book = Book.objects.get(title="Book 0")
for _ in range(2):
    slow_fetch(book, 1.0)
for i in range(20):
    Publisher.objects.run_async().create(name=f"w{i}")
# Exits normally, without resolving anything.
"""


@not_shared_cache
def test_a_script_that_exits_after_background_creates_loses_none_of_them(
    books, tmp_path
):
    (tmp_path / "lost_writes_settings.py").write_text(
        textwrap.dedent(
            """
            import os

            from tests.settings import *  # noqa: F403

            DATABASES["default"]["NAME"] = os.environ["LOST_WRITES_DB"]  # noqa: F405
            ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 20.0}
            """
        )
    )
    script = tmp_path / "exit_with_queued_writes.py"
    script.write_text(SCRIPT)
    env = subprocess_env(
        tmp_path,
        DJANGO_SETTINGS_MODULE="lost_writes_settings",
        LOST_WRITES_DB=str(connection.settings_dict["NAME"]),
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    landed = Publisher.objects.filter(name__in=WRITES).count()
    assert landed == 20, f"only {landed} of 20 writes landed; stderr:\n{done.stderr}"


def test_shutdown_runs_queued_writes_to_completion(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 20.0}
    for _ in range(2):
        slow_fetch(books[0], 0.5)  # both workers busy: the creates are queued
    made = [Publisher.objects.run_async().create(name=name) for name in WRITES[:5]]
    asynchrormous.shutdown()
    assert Publisher.objects.filter(name__in=WRITES).count() == 5
    assert sorted(resolve(p).name for p in made) == sorted(WRITES[:5])


def test_a_queued_write_that_fails_at_shutdown_is_logged(books, settings, caplog):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 20.0}
    slow_fetch(books[0], 0.5)  # the worker is busy: the create is queued
    Publisher.objects.run_async().create(name="Pub")  # a duplicate, never used
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        asynchrormous.shutdown()
        gc.collect()
    records = naming(asynchrormous_records(caplog, logging.ERROR), "create")
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert isinstance(records[0].exc_info[1], IntegrityError)


def test_a_queued_write_that_shutdown_cannot_run_in_time_lands_or_is_logged(
    books, settings, caplog
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 0.5}
    slow_fetch(books[0], 2.0)  # holds the only worker past shutdown's bound
    Publisher.objects.run_async().create(name="late")
    with caplog.at_level(logging.WARNING, logger="asynchrormous"):
        asynchrormous.shutdown(timeout=0.5)
        join_workers()  # whatever the workers still do, they have done it
        gc.collect()
    landed = Publisher.objects.filter(name="late").exists()
    reported = naming(asynchrormous_records(caplog), "create")
    assert landed or reported, (
        "the queued create neither landed nor was reported; logged: "
        f"{[r.getMessage() for r in caplog.records]}"
    )


def test_a_fire_and_forget_create_that_fails_is_logged(books, settings, caplog):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 20.0}
    slow_fetch(books[0], 0.3)  # the create is still queued when its result is dropped
    Publisher.objects.run_async().create(name="Pub")  # a duplicate; result dropped
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        # A later read by the same caller waits for its writes, then every job ends.
        assert Publisher.objects.count() == 1
        asynchrormous.shutdown()
        gc.collect()
    records = naming(asynchrormous_records(caplog, logging.ERROR), "create")
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert isinstance(records[0].exc_info[1], IntegrityError)


def test_a_failed_create_kept_but_never_used_is_logged_exactly_once(
    books, settings, caplog
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 20.0}
    made = Publisher.objects.run_async().create(name="Pub")  # a duplicate
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        wait(made)  # finished, but its outcome is never looked at
        del made
        asynchrormous.shutdown()
        gc.collect()
    records = naming(asynchrormous_records(caplog, logging.ERROR), "create")
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert isinstance(records[0].exc_info[1], IntegrityError)


def test_an_error_raised_to_the_caller_is_never_also_logged_as_unobserved(
    books, caplog
):
    # Fails on the server on every backend; compiles fine on the caller.
    broken = RawSQL("(SELECT x FROM no_such_table)", [])
    qs = Book.objects.annotate(broken=broken).run_async().start()
    n = qs.count()  # derived from the started fetch
    with pytest.raises(DatabaseError):
        int(n)
    with caplog.at_level(logging.ERROR, logger="asynchrormous"):
        del n, qs
        gc.collect()
    assert asynchrormous_records(caplog, logging.ERROR) == [], caplog.text
