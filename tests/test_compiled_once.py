"""One call, one compilation: the worker sends the statement the caller compiled.

A background terminal runs Django's method on the caller up to its first statement
(so Django's errors come at the call) and then on a worker. The worker's run reaches
the same statement and sends the SQL the caller compiled, with the compiler's state;
later statements are compiled on the worker only. So user code in compilation (a
custom expression's ``as_sql()``, a field's ``pre_save()`` during an INSERT) runs as
often as in plain Django, and sees what plain Django's run sees.
"""

import pytest
from django.db import models, transaction
from django.db.models import F, Sum

from asynchrormous import resolve
from tests.helpers import Counted
from tests.testapp.models import Book, Memo, Note, Tag

pytestmark = pytest.mark.django_db(transaction=True)


def counted(field="pages"):
    return Counted(F(field), output_field=models.IntegerField())


CALLS = {
    "count": lambda qs: qs.filter(pages__gte=counted("year")).count(),
    "exists": lambda qs: qs.filter(pages__gte=counted("year")).exists(),
    "get": lambda qs, b: qs.get(pk=b[0].pk, pages=counted()).title,
    "get select_related": lambda qs, b: (
        qs.select_related("author", "publisher")
        .get(pk=b[0].pk, pages=counted())
        .author.name
    ),
    "get prefetch_related": lambda qs, b: [
        t.name
        for t in qs.prefetch_related("tags")
        .annotate(n=counted())
        .get(pk=b[0].pk, n=b[0].pages)
        .tags.all()
    ],
    "first": lambda qs: qs.order_by(counted(), "pk").first().title,
    "last": lambda qs: qs.order_by(counted(), "pk").last().title,
    "aggregate": lambda qs: qs.aggregate(total=Sum(counted())),
    "in_bulk": lambda qs, b: sorted(
        qs.filter(pages__gte=counted()).in_bulk([x.pk for x in b])
    ),
    "contains": lambda qs, b: qs.filter(pages=counted()).contains(b[0]),
    "update": lambda qs, b: qs.filter(pk=b[0].pk).update(pages=counted()),
    "delete": lambda qs, b: qs.filter(pk=b[0].pk, pages=counted()).delete()[0],
    "values get": lambda qs, b: qs.values("title").get(pk=b[0].pk, pages=counted()),
}


def call(name, qs, books):
    fn = CALLS[name]
    return fn(qs, books) if fn.__code__.co_argcount == 2 else fn(qs)


def plain_then_rolled_back(name, books):
    """Plain Django's answer and compilation count, leaving the rows as they were."""
    Counted.runs = 0
    with transaction.atomic():
        answer = call(name, Book.objects.all(), books)
        transaction.set_rollback(True)
    return answer, Counted.runs


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_terminal_compiles_as_often_as_plain_django(books, jobs, name):
    Tag.objects.create(name="classic").books.add(books[0])
    jobs.clear()
    plain, plain_runs = plain_then_rolled_back(name, books)
    assert plain_runs >= 1
    Counted.runs = 0
    result = call(name, Book.objects.run_async(), books)
    assert resolve(result) == plain
    assert Counted.runs == plain_runs
    assert jobs and all(job["thread"].startswith("asynchrormous-") for job in jobs)


@pytest.fixture
def memos(db):
    return [Memo.objects.create(data={"n": i}, title=f"memo {i}") for i in range(3)]


def test_an_update_of_both_tables_of_an_inherited_model_compiles_once(memos, jobs):
    """Django first selects the rows' keys, then updates each table: the caller
    compiles the SELECT, and the worker sends it and compiles the two UPDATEs.
    A guard: it passed before the worker sent the caller's SQL too."""

    def update(qs):
        return qs.filter(pk__in=[m.pk for m in memos[:2]]).update(
            data={"updated": True}, title=Counted(F("title"))
        )

    Counted.runs = 0
    with transaction.atomic():
        plain = update(Memo.objects.all())
        transaction.set_rollback(True)
    plain_runs = Counted.runs
    Counted.runs = 0
    assert resolve(update(Memo.objects.run_async())) == plain == 2
    assert Counted.runs == plain_runs == 1
    assert sorted(Memo.objects.filter(data={"updated": True}).values_list("pk")) == (
        sorted((m.pk,) for m in memos[:2])
    )
    assert jobs[0]["thread"].startswith("asynchrormous-")


def test_a_value_made_while_compiling_an_insert_is_the_one_sent(db, jobs):
    """auto_now's pre_save() runs while the INSERT compiles: the caller's objects
    carry the value the worker sent, as in plain Django. A guard: it passed
    before the worker sent the caller's SQL too (the worker compiled again)."""
    notes = [Note(text=f"bulk {i}") for i in range(3)]
    made = Note.objects.run_async().bulk_create(notes)
    assert len(resolve(made)) == 3
    stored = dict(Note.objects.values_list("text", "stamped"))
    assert {n.text: n.stamped for n in notes} == stored
    assert jobs[0]["thread"].startswith("asynchrormous-")
