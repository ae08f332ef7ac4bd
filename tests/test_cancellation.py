"""A cancel touches only its own job; awaits are bounded by TIMEOUT."""

import asyncio
import threading

import pytest

from asynchrormous import Cancelled, ResultTimeout, cancel
from asynchrormous.results import lazy_result, submit
from tests.helpers import sleep_expr
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_cancel_reaches_the_server_before_the_worker_moves_on(books, settings):
    """The worker cannot start its next job while a cancel of its last one is on the
    way: a cancel that arrived late would otherwise stop the next job's statement."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    in_a = threading.Event()
    finish_a = threading.Event()

    def a():
        in_a.set()
        assert finish_a.wait(10)
        return Book.objects.count()

    job_a = submit(a, alias="default", writes=False, description="a")
    assert await asyncio.to_thread(in_a.wait, 10)
    # Hold the delivery of a cancel of A, as a slow cancel request would.
    job_a.running.lock.acquire()
    started_b = threading.Event()

    def b():
        started_b.set()
        return Book.objects.count()

    job_b = submit(b, alias="default", writes=False, description="b")
    finish_a.set()
    # A has ended its work, but its worker waits for the cancel in flight.
    assert not await asyncio.to_thread(started_b.wait, 0.3)
    job_a.running.lock.release()
    assert await asyncio.to_thread(job_b.result, 10) == 6
    assert job_a.result(10) == 6


async def test_awaiting_a_result_someone_else_cancelled_raises_cancelled(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    release = threading.Event()
    blocker = submit(release.wait, 10, alias="default", writes=False, description="x")
    n = Book.objects.run_async().count()  # queued behind the blocker
    waiter = asyncio.create_task(_await(n))
    await asyncio.sleep(0)
    assert cancel(n)
    with pytest.raises(Cancelled):
        await asyncio.wait_for(waiter, 10)
    assert not waiter.cancelled()  # the awaiting task itself was not cancelled
    release.set()
    assert blocker.result(10) is True


async def _await(value):
    return await value


async def test_one_awaiters_cancel_leaves_a_shared_fetch_to_the_others(books, settings):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 10.0}
    release = threading.Event()
    submit(release.wait, 10, alias="default", writes=False, description="x")
    qs = Book.objects.order_by("pk").start()
    first = asyncio.create_task(_await(qs))
    second = asyncio.create_task(_await(qs))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    rows = await asyncio.wait_for(second, 10)
    assert [b.pk for b in rows] == [b.pk for b in books]


async def test_awaiting_a_job_is_bounded_by_timeout_and_the_job_goes_on(
    books, settings
):
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 0.3}
    release = threading.Event()
    job = submit(release.wait, 10, alias="default", writes=False, description="wait")
    with pytest.raises(ResultTimeout, match=r"wait was not ready after 0\.30 s"):
        await _await(lazy_result(job, bool))
    release.set()
    assert await _await(lazy_result(job, bool)) is True


async def test_a_cancellation_storm_hits_no_bystander(books, settings):
    """About a thousand tasks time out on sleeping statements while others, never
    cancelled, run beside them: not one of those fails, and the pool answers after."""
    settings.ASYNCHRORMOUS = {"WORKERS": 4, "TIMEOUT": 30.0}
    pks = [b.pk for b in books]

    async def impatient(i):
        qs = Book.objects.filter(pk=pks[i % 6]).annotate(z=sleep_expr(0.02))
        try:
            async with asyncio.timeout(0.005 * (i % 4)):
                await qs.afirst()
        except TimeoutError:
            return "cancelled"
        return "finished"

    async def bystander(i):
        qs = Book.objects.filter(pk=pks[i % 6]).annotate(z=sleep_expr(0.01))
        return (await qs.afirst()).pk == pks[i % 6]

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(
            *(impatient(i) for i in range(1000)),
            *(bystander(i) for i in range(200)),
            return_exceptions=True,
        )
    storm, bystanders = outcomes[:1000], outcomes[1000:]
    assert bystanders == [True] * 200, [o for o in bystanders if o is not True][:5]
    assert all(o in ("cancelled", "finished") for o in storm), [
        o for o in storm if o not in ("cancelled", "finished")
    ][:5]
    assert storm.count("cancelled") > 500
    async with asyncio.timeout(10):
        assert await Book.objects.acount() == 6
