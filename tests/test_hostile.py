"""A hostile review of background mode: arguments, overrides, ordering, shutdown."""

import threading

import pytest
from django.db import models

import asynchrormous
from asynchrormous import AsyncQuerySetMixin, resolve
from asynchrormous.results import submit
from tests.helpers import Counted, occupy_a_worker
from tests.testapp.models import Author, Book, Document, Publisher

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def one_busy_worker(settings):
    """WORKERS=1 and that worker held until ``release`` is set (bounded)."""
    settings.ASYNCHRORMOUS = {"WORKERS": 1, "TIMEOUT": 30.0}
    release = threading.Event()
    blocker = occupy_a_worker(release)
    yield release
    release.set()
    assert blocker.result() is True


# -- Arguments are captured by reference, not at the call ------------------------


def test_bulk_create_of_a_batch_list_cleared_after_the_call_creates_the_batch(
    books, one_busy_worker
):
    """The usual batching loop: ``batch.clear()`` right after ``bulk_create(batch)``.

    Plain Django has inserted the rows when bulk_create() returns; the background
    call captures the list at the call (it once handed the worker the caller's list,
    found empty, and the writes were lost).
    """
    batch = [Publisher(name=f"batch {i}") for i in range(3)]
    made = Publisher.objects.run_async().bulk_create(batch)
    batch.clear()
    one_busy_worker.set()
    resolve(made)
    assert Publisher.objects.filter(name__startswith="batch").count() == 3


def test_create_with_a_dict_mutated_after_the_call_stores_the_value_at_the_call(
    books, one_busy_worker
):
    """Plain Django stores ``{"v": 1}``: the value at the call, not the dict as the
    caller changes it afterwards."""
    payload = {"v": 1}
    doc = Document.objects.run_async().create(data=payload)
    payload["v"] = 2
    one_busy_worker.set()
    pk = resolve(doc).pk
    assert Document.objects.get(pk=pk).data == {"v": 1}


def test_update_with_a_list_mutated_after_the_call_writes_the_value_at_the_call(
    books, one_busy_worker
):
    """Plain Django's UPDATE uses the value given at the call, not the list as the
    caller changes it afterwards."""
    doc = Document.objects.create(data=[])
    value = [1]
    n = Document.objects.run_async().filter(pk=doc.pk).update(data=value)
    value.append(2)
    one_busy_worker.set()
    assert resolve(n) == 1
    assert Document.objects.get(pk=doc.pk).data == [1]


def test_get_or_create_defaults_mutated_after_the_call_use_the_values_at_the_call(
    books, one_busy_worker
):
    """``defaults`` reused in a loop: Django creates with the values at the call."""
    defaults = {"pages": 1}
    got = Book.objects.run_async().get_or_create(
        title="New", author=books[0].author, defaults=defaults
    )
    defaults["pages"] = 999
    one_busy_worker.set()
    obj, created = resolve(got)
    assert created
    assert Book.objects.get(pk=obj.pk).pages == 1


# -- Custom QuerySets: the dry run is plain QuerySet, the worker is not ----------------


class NamedQuerySet(AsyncQuerySetMixin, models.QuerySet):
    """filter() understands a lookup of its own, ``named=`` (as translation or
    soft-delete libraries' querysets do); get(), count()... go through filter()."""

    def filter(self, *args, **kwargs):
        if "named" in kwargs:
            kwargs["title"] = kwargs.pop("named")
        return super().filter(*args, **kwargs)


def test_get_through_a_custom_filter_override_works_as_in_django(books):
    """Django's get() calls self.filter(): ``get(named=...)`` works in plain Django.

    The dry run keeps the queryset's own class, so its filter() handles ``named``
    (a dry run as plain QuerySet once raised FieldError at the call).
    """
    manager = NamedQuerySet.as_manager()
    manager.model = Book
    assert manager.get(named="Book 2") == books[2]  # plain Django
    assert resolve(manager.run_async().get(named="Book 2")) == books[2]


class DefaultYearBase(models.QuerySet):
    """A third-party base QuerySet (below the mixin) whose create() sets a field."""

    def create(self, **kwargs):
        kwargs.setdefault("year", 1234)
        return super().create(**kwargs)


class DefaultYearQuerySet(AsyncQuerySetMixin, DefaultYearBase):
    pass


def test_create_runs_the_create_override_of_a_base_below_the_mixin(books):
    """``class QS(AsyncQuerySetMixin, TheirQuerySet)``, as documented.

    Plain Django runs TheirQuerySet.create(): the row gets year 1234. So does the
    background create(), which defers to the base's own create() (it once saved the
    instance itself, with the model default 2000).
    """
    manager = DefaultYearQuerySet.as_manager()
    manager.model = Book
    plain = manager.create(title="plain", author=books[0].author)
    assert plain.year == 1234
    made = resolve(manager.run_async().create(title="bg", author=books[0].author))
    assert Book.objects.get(pk=made.pk).year == 1234


class EmptyAuditBase(models.QuerySet):
    """A base below the mixin whose bulk_create() records each call."""

    calls = []

    def bulk_create(self, objs, *args, **kwargs):
        type(self).calls.append(len(objs))
        return super().bulk_create(objs, *args, **kwargs)


class EmptyAuditQuerySet(AsyncQuerySetMixin, EmptyAuditBase):
    pass


def test_a_base_override_runs_once_even_when_django_answers_without_sql(books):
    """bulk_create([]) sends no statement, so the dry run's answer is the result.

    Plain Django runs the base's override once, and so must the dry run.
    """
    manager = EmptyAuditQuerySet.as_manager()
    manager.model = Publisher
    EmptyAuditBase.calls = []
    assert resolve(manager.run_async().bulk_create([])) == []
    assert EmptyAuditBase.calls == [0]


# -- A caller's later write overtakes its earlier read ------------------------------


@pytest.fixture
def slow_first_read(settings):
    """WORKERS=2; the first background read pauses on its worker before its SQL.

    Models a worker that is slow to start a job (GIL, scheduling): ``reached`` is set
    when the read is on its worker, and it goes on when ``release`` is set.
    """
    import sys

    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 30.0}
    reached, release = threading.Event(), threading.Event()
    fired = []

    def tracer(frame, event, arg):
        code = frame.f_code
        if (
            event == "call"
            and not fired
            and code.co_name in ("_read", "_fetch_rows")
            and code.co_filename.endswith("asynchrormous/queryset.py")
        ):
            fired.append(True)
            reached.set()
            release.wait(10)
        return None

    asynchrormous.shutdown()
    threading.settrace(tracer)  # worker threads are made after this
    try:
        yield reached, release
    finally:
        threading.settrace(None)
        release.set()
        sys.settrace(None)


@pytest.mark.parametrize("how", ["count", "count of a started fetch"])
def test_a_count_taken_before_a_delete_is_the_count_before_the_delete(
    books, slow_first_read, how
):
    """``n = qs.count(); qs.delete()``: in plain Django n is 6, the rows then.

    A caller's write waits for its earlier reads, so the delete cannot run on the
    second worker while the read waits to start (n was 0 before that rule).
    """
    reached, release = slow_first_read
    qs = Book.objects.run_async()
    if how == "count of a started fetch":
        qs.start()
    n = qs.count()
    assert reached.wait(10)
    deleted = Book.objects.run_async().delete()
    resolve(deleted)  # the write has landed; the read has not started yet
    release.set()
    assert n == 6


# -- shutdown() ---------------------------------------------------------------------


def _restart_with_new_settings():
    from django.test import override_settings

    with override_settings(ASYNCHRORMOUS={"WORKERS": 2, "TIMEOUT": 30.0}):
        pass


@pytest.mark.parametrize(
    "body",
    [asynchrormous.shutdown, _restart_with_new_settings],
    ids=["shutdown", "override_settings"],
)
def test_shutdown_called_inside_a_background_job_does_not_raise(books, body):
    """A job may shut the pool down (directly, or via override_settings of
    ASYNCHRORMOUS in code that runs in a job): shutdown() does not join its own
    worker (that raised ``RuntimeError: cannot join current thread``).
    """
    job = submit(body, alias="default", writes=False, description="x")
    assert job.result(10) is None


def _wait_then_report(started, release):
    started.set()
    return release.wait(3)  # bounded: a correct shutdown() waits this long at most


def test_shutdown_after_shutdown_wait_false_still_waits_for_the_workers(books):
    """``shutdown(wait=False)`` then ``shutdown()`` (or two threads, or the test
    runner's destroy_test_db after someone's shutdown): the second call waits for
    the workers the first left running, as ThreadPoolExecutor's second
    shutdown(wait=True) does (it once found no pool and returned while a worker held
    its connection; on PostgreSQL, DROP DATABASE then fails).
    """
    started, release = threading.Event(), threading.Event()
    job = submit(
        _wait_then_report,
        started,
        release,
        alias="default",
        writes=False,
        description="long job",
    )
    assert started.wait(10)
    asynchrormous.shutdown(wait=False)
    asynchrormous.shutdown(timeout=10)
    alive = [
        t.name for t in threading.enumerate() if t.name.startswith("asynchrormous-")
    ]
    release.set()
    job.result(10)
    assert alive == []


# -- frozen() changes what Django would have done ------------------------------------


def test_create_with_a_generator_as_json_value_raises_typeerror_as_django_does(books):
    """Plain Django: ``create(data=<generator>)`` raises TypeError ("Object of type
    generator is not JSON serializable") and stores nothing; so does the
    background create(), which leaves field values' iterators alone.
    """
    with pytest.raises(TypeError):
        Document.objects.create(data=(i for i in (1, 2)))
    with pytest.raises(TypeError):
        resolve(Document.objects.run_async().create(data=(i for i in (1, 2))))
    assert Document.objects.count() == 0


# -- Dry runs that reach the database -------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda bs: Publisher.objects.run_async().bulk_create([Publisher(name="n")]),
        lambda bs: Book.objects.run_async().bulk_update(bs[:1], ["pages"]),
        lambda bs: Author.objects.run_async().update_or_create(name="Ann"),
    ],
    ids=["bulk_create", "bulk_update", "update_or_create"],
)
def test_a_background_write_call_does_not_block_on_the_callers_pending_writes(
    books, settings, call
):
    """A background terminal is submitted at once; the wait for the caller's earlier
    writes belongs in the job. On SQLite the dry run of these methods enters
    Django's ``atomic()``, which sends ``BEGIN IMMEDIATE`` on the caller's connection;
    the dry run keeps it from the database. It once went through the library's own
    write barrier, so the call itself blocked until the caller's pending write was
    done (ResultTimeout at the call), and took SQLite's write lock.
    """
    settings.ASYNCHRORMOUS = {"WORKERS": 2, "TIMEOUT": 1.0}
    release = threading.Event()
    pending = submit(release.wait, 10, alias="default", writes=True, description="w")
    try:
        result = call(books)  # must not wait for ``pending``
    finally:
        release.set()
    assert pending.result(10) is True
    resolve(result, timeout=10)


# -- Read-your-writes on a connection shared between threads ------------------------


def _write_after(release, name):
    release.wait(2)  # the caller's read below must wait for this write
    return Publisher.objects.create(name=name).pk


def test_read_your_writes_holds_when_another_thread_shares_the_connection(books):
    """LiveServerTestCase shares the test thread's connection with the server thread.

    The caller's pending write installs a barrier on that connection; the other
    thread's query waits for its own (no) pending jobs and leaves the barrier, which
    belongs to the caller, in place: the caller's next plain read waits for its write.
    """
    from django.db import connections

    conn = connections["default"]
    conn.ensure_connection()
    release = threading.Event()
    write = submit(
        _write_after,
        release,
        "mine",
        alias="default",
        writes=True,
        description="my write",
    )
    conn.inc_thread_sharing()
    try:

        def server_thread():
            connections["default"] = conn  # as LiveServerThread does
            Author.objects.exists()

        other = threading.Thread(target=server_thread)
        other.start()
        other.join(10)
        assert not other.is_alive()
        seen = Publisher.objects.filter(name="mine").exists()  # plain read: waits
    finally:
        conn.dec_thread_sharing()
        release.set()
    write.result(10)
    assert seen


async def test_shutdown_during_an_async_atomic_block_leaves_no_worker_running(books):
    """DESIGN: "shutdown() fails pending and pinned work with a clear error".

    shutdown() closes the block's pin: its worker rolls back and stops, and the
    block's later queries and its exit raise Cancelled (the worker was once left
    running, and the block went on on the old pool).
    """
    import asyncio

    from asynchrormous import atomic

    # The block cannot commit: leaving it raises the same clear error.
    with pytest.raises(asynchrormous.Cancelled, match="shutdown"):
        async with atomic():
            await Publisher.objects.acreate(name="in block")
            await asyncio.to_thread(asynchrormous.shutdown, timeout=3)
            alive = [
                t.name
                for t in threading.enumerate()
                if t.name.startswith("asynchrormous-")
            ]
            assert alive == []  # the pinned worker was told to stop
            with pytest.raises(asynchrormous.Cancelled, match="shutdown"):
                await Publisher.objects.acreate(name="after shutdown")
    # Nothing of the block was committed, nothing escaped it.
    assert not await Publisher.objects.filter(
        name__in=["in block", "after shutdown"]
    ).aexists()


# -- Routing ---------------------------------------------------------------------------


class ReadsOfPublisherGoToAReplica:
    """Reads of Publisher go to a replica (not configured here); writes to default."""

    def db_for_read(self, model, **hints):
        return "replica" if model is Publisher else None

    def db_for_write(self, model, **hints):
        return "default"


def test_background_create_is_routed_with_db_for_write_as_in_django(books, settings):
    """Plain Django's create() saves ``using=self.db`` after setting ``_for_write``:
    db_for_write. The background create() reads ``self.db`` before it sets
    ``_for_write``, so it routes the INSERT with db_for_read: the write goes to the
    read replica (here: ConnectionDoesNotExist at the call).
    """
    settings.DATABASE_ROUTERS = [ReadsOfPublisherGoToAReplica()]
    assert Publisher.objects.create(name="plain").name == "plain"
    made = Publisher.objects.run_async().create(name="background")
    assert resolve(made).name == "background"
    assert Publisher.objects.using("default").filter(name="background").exists()


# -- User code in compilation runs twice -------------------------------------------


# Fetches and terminals send the SQL the caller compiled (tests/test_compiled_once.py
# covers every terminal).
@pytest.mark.parametrize(
    "call",
    [
        "update",
        "fetch",
        "count",
    ],
)
def test_a_custom_expression_is_compiled_once_per_call_as_in_django(books, call):
    """DESIGN: "build (and compile) on the caller, and hand the built query to the
    worker". Plain Django compiles once per call. The caller compiles (in the dry
    run, or _submit_fetch) and the worker sends that SQL: as_sql() runs once. It
    once ran twice for terminals, compiled by the dry run and by the worker.
    """

    def run(qs):
        if call == "update":
            return qs.filter(pk=books[0].pk).update(pages=Counted(models.F("pages")))
        if call == "fetch":
            fetched = qs.filter(pages__gte=Counted(models.F("year")))
            return fetched.start() if qs._background else fetched
        return qs.filter(pages__gte=Counted(models.F("year"))).count()

    Counted.runs = 0
    plain = run(Book.objects.all())
    if call == "fetch":
        list(plain)
    assert Counted.runs == 1
    Counted.runs = 0
    resolve(run(Book.objects.run_async()))
    assert Counted.runs == 1


class SlottedQuerySet(AsyncQuerySetMixin, models.QuerySet):
    """A custom QuerySet with a slot of its own: valid Python, fine for Django."""

    __slots__ = ("tenant",)


def test_a_custom_queryset_with_slots_can_run_a_background_terminal(books):
    """Plain Django counts. The dry run assigns ``__class__ = QuerySet``, which Python
    refuses for a different layout: TypeError at every background terminal."""
    manager = SlottedQuerySet.as_manager()
    manager.model = Book
    assert manager.count() == 6
    assert resolve(manager.run_async().count()) == 6
