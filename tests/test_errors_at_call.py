"""Errors Django raises before a statement is sent are raised at the background call.

A broken ``atomic()`` block, an unsaved related object, a value a field cannot encode:
plain Django raises at once, with its own type and message, and so must a call on a
``run_async()`` queryset. Only the call is wrapped in ``pytest.raises``, never a use of
its result.
"""

import pytest
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.db.transaction import TransactionManagementError

from asynchrormous import resolve
from tests.testapp.models import Author, Book, Document, Publisher

pytestmark = pytest.mark.django_db(transaction=True)


def raised_at_the_call(expected, call):
    """The ``expected`` exception that ``call()`` raises; the test fails if it returns.

    What it returns instead (a lazy result) is used here, so that an error deferred to
    it is reported in the failure and not logged later, whenever it is collected.
    """
    try:
        result = call()
    except expected as exc:
        return exc
    try:
        outcome = f"{resolve(result)!r}"
    except Exception as exc:
        outcome = f"a lazy result whose use raises {exc!r}"
    pytest.fail(f"the call did not raise {expected.__name__}; it returned {outcome}")


# -- A broken atomic() block ------------------------------------------------------

# Each takes a Publisher queryset; "Pub" is the fixture's publisher.
BROKEN_BLOCK_CALLS = {
    "count": lambda qs: qs.count(),
    "exists": lambda qs: qs.exists(),
    "get": lambda qs: qs.get(name="Pub"),
    "first": lambda qs: qs.order_by("pk").first(),
    "aggregate": lambda qs: qs.aggregate(n=Count("id")),
    "in_bulk": lambda qs: qs.in_bulk(["Pub"], field_name="name"),
    "update": lambda qs: qs.update(name="Other"),
    "delete": lambda qs: qs.filter(name="Other").delete(),
    "create": lambda qs: qs.create(name="Other"),
    "get_or_create": lambda qs: qs.get_or_create(name="Other"),
    "update_or_create": lambda qs: qs.update_or_create(name="Pub"),
    "bulk_create": lambda qs: qs.bulk_create([Publisher(name="Other")]),
}


@pytest.mark.parametrize("call", BROKEN_BLOCK_CALLS.values(), ids=BROKEN_BLOCK_CALLS)
def test_in_a_broken_atomic_block_every_call_raises_transactionmanagementerror(
    books, jobs, call
):
    """After an IntegrityError with no savepoint, Django refuses every query at once."""
    with transaction.atomic():
        with pytest.raises(IntegrityError):
            Publisher.objects.create(name="Pub")  # taken: the block is now broken
        with pytest.raises(TransactionManagementError) as plain:
            call(Publisher.objects.all())
        background = raised_at_the_call(
            TransactionManagementError, lambda: call(Publisher.objects.run_async())
        )
        assert str(background) == str(plain.value)
        assert "until the end of the 'atomic' block" in str(plain.value)
    assert list(Publisher.objects.values_list("name", flat=True)) == ["Pub"]


# -- Values Django refuses to save ---------------------------------------------


def test_create_with_an_unsaved_related_object_raises_valueerror_at_the_call(
    books, jobs
):
    with pytest.raises(ValueError) as plain:
        Book.objects.create(title="Lost", author=Author(name="unsaved"))
    background = raised_at_the_call(
        ValueError,
        lambda: Book.objects.run_async().create(
            title="Lost", author=Author(name="unsaved")
        ),
    )
    assert str(background) == str(plain.value)
    assert "save() prohibited to prevent data loss" in str(plain.value)
    assert not Book.objects.filter(title="Lost").exists()
    assert not Author.objects.filter(name="unsaved").exists()


def test_bulk_create_and_update_with_an_unsaved_related_object_raise_at_the_call(
    books, jobs
):
    """Guard (passes today): bulk_create() and update() check related objects first."""
    with pytest.raises(ValueError) as plain:
        Book.objects.bulk_create([Book(title="Lost", author=Author(name="unsaved"))])
    background = raised_at_the_call(
        ValueError,
        lambda: Book.objects.run_async().bulk_create(
            [Book(title="Lost", author=Author(name="unsaved"))]
        ),
    )
    assert str(background) == str(plain.value)
    assert "bulk_create() prohibited" in str(plain.value)
    with pytest.raises(ValueError) as plain:
        Book.objects.update(author=Author(name="unsaved"))
    background = raised_at_the_call(
        ValueError,
        lambda: Book.objects.run_async().update(author=Author(name="unsaved")),
    )
    assert str(background) == str(plain.value)
    assert "Unsaved model instance" in str(plain.value)
    assert jobs == []
    assert not Book.objects.filter(title="Lost").exists()


@pytest.mark.parametrize("value", [object(), {1, 2}], ids=["object", "set"])
def test_create_with_a_value_the_jsonfield_cannot_encode_raises_typeerror_at_the_call(
    jobs, value
):
    with pytest.raises(TypeError) as plain:
        Document.objects.create(data=value)
    background = raised_at_the_call(
        TypeError, lambda: Document.objects.run_async().create(data=value)
    )
    assert str(background) == str(plain.value)
    assert "is not JSON serializable" in str(plain.value)
    assert not Document.objects.exists()


@pytest.mark.parametrize("value", [object(), {1, 2}], ids=["object", "set"])
def test_update_with_a_value_the_jsonfield_cannot_encode_raises_typeerror_at_the_call(
    jobs, value
):
    """Passes today on SQLite and MariaDB, where compiling the UPDATE encodes the value;
    fails on PostgreSQL, where psycopg encodes it only as the statement is sent."""
    Document.objects.create(data={"kept": True})
    with pytest.raises(TypeError) as plain:
        Document.objects.update(data=value)
    background = raised_at_the_call(
        TypeError, lambda: Document.objects.run_async().update(data=value)
    )
    assert str(background) == str(plain.value)
    assert "is not JSON serializable" in str(plain.value)
    assert list(Document.objects.values_list("data", flat=True)) == [{"kept": True}]


@pytest.mark.parametrize("value", [object(), {1, 2}], ids=["object", "set"])
def test_bulk_create_with_a_value_the_jsonfield_cannot_encode_raises_at_the_call(
    jobs, value
):
    """Passes today on SQLite and MariaDB, where compiling the INSERT encodes the value;
    fails on PostgreSQL, where psycopg encodes it only as the statement is sent."""
    with pytest.raises(TypeError) as plain:
        Document.objects.bulk_create([Document(data=value)])
    background = raised_at_the_call(
        TypeError,
        lambda: Document.objects.run_async().bulk_create([Document(data=value)]),
    )
    assert str(background) == str(plain.value)
    assert "is not JSON serializable" in str(plain.value)
    assert jobs == []
    assert not Document.objects.exists()
