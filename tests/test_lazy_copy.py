"""Lazy results survive copying: copies are the plain values ``resolve()`` gives.

``pickle``, ``copy.copy``, ``copy.deepcopy`` and Django's cache framework (which
pickles) turn a background count, ``exists()``, ``aggregate()``, ``update()`` or
``delete()`` into the plain int, bool, dict or tuple that ``resolve()`` and
``json.dumps`` accept, and a background ``get()`` into a model instance.
"""

import copy
import json
import pickle

import pytest
from django.core.cache import caches
from django.db.models import Count, Max
from django.test import override_settings

from asynchrormous import resolve
from tests.helpers import ran_in_background
from tests.testapp.models import Book

pytestmark = pytest.mark.django_db(transaction=True)

COPIES = {
    "pickle": lambda value: pickle.loads(pickle.dumps(value)),
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}

# What a background call returns, its plain type, and its value as JSON.
LAZY_VALUES = {
    "count": (lambda: Book.objects.run_async().count(), int, "6"),
    "exists": (lambda: Book.objects.run_async().exists(), bool, "true"),
    "aggregate": (
        lambda: Book.objects.run_async().aggregate(n=Count("id"), most=Max("year")),
        dict,
        '{"most": 1995, "n": 6}',
    ),
    "update": (
        lambda: Book.objects.run_async().filter(pages__lt=130).update(year=2000),
        int,
        "3",
    ),
    "delete": (
        lambda: Book.objects.run_async().filter(pages__lt=130).delete(),
        tuple,
        '[3, {"testapp.Book": 3}]',
    ),
}


@pytest.mark.parametrize("how", COPIES.values(), ids=COPIES)
@pytest.mark.parametrize("made", LAZY_VALUES.values(), ids=LAZY_VALUES)
def test_a_copied_lazy_result_is_the_plain_value(books, jobs, made, how):
    make, kind, as_json = made
    lazy = make()
    copied = how(lazy)
    assert type(resolve(copied)) is kind
    assert json.dumps(copied, sort_keys=True) == as_json
    assert type(copied) is kind
    assert json.dumps(resolve(lazy), sort_keys=True) == as_json  # the original too
    assert len(jobs) == 1 and ran_in_background(jobs[0])


@pytest.mark.parametrize("how", COPIES.values(), ids=COPIES)
def test_a_copied_lazy_object_is_a_model_instance(books, jobs, how):
    """Guard (passes today): a copy of a background ``get()`` is the instance."""
    lazy = Book.objects.run_async().get(title="Book 3")
    copied = how(lazy)
    assert type(copied) is Book and type(resolve(copied)) is Book
    assert copied == books[3] and copied.pages == 130
    assert json.dumps({"title": copied.title}) == '{"title": "Book 3"}'
    assert len(jobs) == 1 and ran_in_background(jobs[0])


LOCMEM = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "asynchrormous-tests-lazy-copy",
    }
}


@pytest.mark.parametrize("made", LAZY_VALUES.values(), ids=LAZY_VALUES)
def test_djangos_cache_gives_back_the_plain_value(books, jobs, made):
    make, kind, as_json = made
    with override_settings(CACHES=LOCMEM):
        cache = caches["default"]
        cache.set("lazy", make())
        got = cache.get("lazy")
        cache.clear()
    assert type(resolve(got)) is kind
    assert json.dumps(got, sort_keys=True) == as_json
    assert type(got) is kind
    assert len(jobs) == 1 and ran_in_background(jobs[0])


def test_djangos_cache_gives_back_a_lazy_object_as_the_instance(books, jobs):
    """Guard (passes today): a cached background ``get()`` is the model instance."""
    with override_settings(CACHES=LOCMEM):
        cache = caches["default"]
        cache.set("lazy", Book.objects.run_async().get(title="Book 2"))
        got = cache.get("lazy")
        cache.clear()
    assert type(got) is Book and got == books[2]
    assert len(jobs) == 1 and ran_in_background(jobs[0])
