"""The data generator: deterministic, and skipped when the catalogue is loaded."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from catalogue.generate import clear, generate
from catalogue.models import Author, Book, Genre, Publisher


def snapshot() -> list[tuple[object, ...]]:
    return list(
        Book.objects.order_by("pk").values_list(
            "pk", "title", "author__name", "published", "price", "copies_sold"
        )
    )


@pytest.mark.django_db
def test_the_same_seed_makes_the_same_catalogue() -> None:
    counts = generate(600, seed=3)
    assert counts == {"books": 600, "authors": 40, "publishers": 5, "genres": 16}
    first = snapshot()
    clear()
    assert not Book.objects.exists() and not Author.objects.exists()
    generate(600, seed=3)
    assert snapshot() == first


@pytest.mark.django_db
def test_ids_keep_counting_after_the_generated_ones() -> None:
    generate(100)
    # Explicit ids must not leave PostgreSQL's sequences behind.
    genre = Genre.objects.create(name="Essays")
    publisher = Publisher.objects.create(name="New Press", country="GB")
    assert genre.pk == 17
    assert publisher.pk > 5


@pytest.mark.django_db
def test_command_skips_a_loaded_catalogue_and_force_makes_it_again() -> None:
    out = StringIO()
    call_command("generate_catalogue", books=300, stdout=out)
    assert "Generated 300 books" in out.getvalue()
    call_command("generate_catalogue", books=500, stdout=out)
    assert "already loaded (300 books); skipping" in out.getvalue()
    assert Book.objects.count() == 300
    call_command("generate_catalogue", books=500, force=True, stdout=out)
    assert Book.objects.count() == 500
