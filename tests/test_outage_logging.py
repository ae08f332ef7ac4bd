"""A database outage logs one warning per alias and outage, and one info at its end.

The outage: the database's port becomes one that is bound but not listening, so
every connect is refused at once (and no other process can take that port).
"""

import logging
import socket

import pytest
from django.db import OperationalError, connection, connections

import asynchrormous
from asynchrormous import outages, resolve
from asynchrormous.results import submit
from tests.testapp.models import Book

needs_a_server = pytest.mark.skipif(connection.vendor == "sqlite", reason="no server")

# Django's psycopg pool opens its connections once, with the port it started with:
# changing the port in the settings takes nothing down.
pytestmark = pytest.mark.skipif(
    bool(connection.settings_dict.get("OPTIONS", {}).get("pool")),
    reason="Django's connection pool keeps the port it started with",
)


@pytest.fixture
def outage(transactional_db):
    """``down()`` makes new connections to the database fail until ``up()``.

    The workers' kept connections go with the pool (as they would in a restart);
    the test's own thread keeps its connection, for the teardown's flush.
    """
    config = connections.settings["default"]  # the dict every thread's wrapper uses
    real_port = config["PORT"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # never listening: a connect gets a reset

    class Outage:
        def down(self):
            asynchrormous.shutdown(timeout=30)
            config["PORT"] = sock.getsockname()[1]

        def up(self):
            config["PORT"] = real_port

    try:
        yield Outage()
    finally:
        config["PORT"] = real_port
        asynchrormous.shutdown(timeout=30)
        sock.close()
        outages.down.pop("default", None)


def records(caplog, level):
    return [
        r for r in caplog.records if r.name == "asynchrormous" and r.levelno == level
    ]


@needs_a_server
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("outage_count", [2])
def test_an_outage_logs_one_warning_then_one_info_when_a_query_succeeds(
    outage, settings, caplog, outage_count
):
    settings.ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": 10.0}
    caplog.set_level(logging.DEBUG, logger="asynchrormous")
    for _ in range(outage_count):
        outage.down()
        caplog.clear()
        # Submitted together, so the four workers fail at the same time.
        pending = [Book.objects.run_async().count() for _ in range(40)]
        for result in pending:
            with pytest.raises(OperationalError):
                resolve(result)
        (warning,) = records(caplog, logging.WARNING)
        message = warning.getMessage()
        assert message.startswith("lost the connection to 'default' (OperationalError:")
        assert not records(caplog, logging.INFO)

        outage.up()
        assert resolve(Book.objects.run_async().count()) == 0
        (info,) = records(caplog, logging.INFO)
        assert info.getMessage().startswith("connection to 'default' restored after ")
        assert info.getMessage().endswith(" s, 40 failures"), info.getMessage()
        # Queries once it is back cost no record above DEBUG.
        for _ in range(10):
            resolve(Book.objects.run_async().count())
        assert len(records(caplog, logging.WARNING)) == 1
        assert len(records(caplog, logging.INFO)) == 1


@needs_a_server
@pytest.mark.django_db(transaction=True)
def test_a_write_on_a_new_connection_ends_the_outage(outage, settings, caplog):
    """The outage ends at the first success of any job, not only of a read."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    caplog.set_level(logging.INFO, logger="asynchrormous")
    outage.down()
    with pytest.raises(OperationalError):
        resolve(Book.objects.run_async().count())
    outage.up()
    assert resolve(Book.objects.run_async().update(pages=1)) == 0
    (info,) = records(caplog, logging.INFO)
    assert info.getMessage().endswith(" s, 1 failures"), info.getMessage()


def test_late_answers_neither_end_an_outage_nor_begin_one(caplog):
    """Workers report in any order: a success of a job that began before the
    outage, or a failure of one that began before the recovery, changes nothing."""
    caplog.set_level(logging.DEBUG, logger="asynchrormous")
    error = OperationalError("connection refused")
    try:
        before_outage = outages.epoch
        outages.failed("late", error, outages.epoch)
        outages.succeeded("late", before_outage)  # answered late: still down
        assert "late" in outages.down
        before_recovery = outages.epoch
        outages.failed("late", error, before_recovery)
        outages.succeeded("late", outages.epoch)
        assert "late" not in outages.down
        outages.failed("late", error, before_recovery)  # answered late: still up
        assert "late" not in outages.down
        levels = [r.levelno for r in caplog.records if r.name == "asynchrormous"]
        assert levels.count(logging.WARNING) == 1
        (info,) = [r for r in caplog.records if r.levelno == logging.INFO]
        assert info.getMessage().endswith(" s, 2 failures")
    finally:
        outages.down.pop("late", None)


@needs_a_server
@pytest.mark.django_db(transaction=True)
def test_failed_writes_are_failures_of_the_outage_too(outage, settings, caplog):
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 10.0}
    caplog.set_level(logging.INFO, logger="asynchrormous")
    outage.down()
    writes = [Book.objects.run_async().update(pages=i) for i in range(10)]
    for result in writes:
        with pytest.raises(OperationalError):
            resolve(result)
    (warning,) = records(caplog, logging.WARNING)
    assert warning.args[0] == "default"
    outage.up()
    resolve(Book.objects.run_async().count())
    (info,) = records(caplog, logging.INFO)
    assert info.getMessage().endswith(" s, 10 failures"), info.getMessage()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="cancels itself")
@pytest.mark.django_db(transaction=True)
def test_a_query_error_on_a_live_connection_is_no_outage(settings, caplog):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    caplog.set_level(logging.INFO, logger="asynchrormous")

    def cancelled():
        with connections["default"].cursor() as cursor:
            # Cancels its own statement: OperationalError, the session lives on.
            cursor.execute("SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(5)")

    job = submit(cancelled, alias="default", writes=False, description="cancelled")
    with pytest.raises(OperationalError, match="canceling statement"):
        job.result(10)
    assert resolve(Book.objects.run_async().count()) == 0
    assert not records(caplog, logging.WARNING) and not outages.down
