"""Deterministic sample data: one seed, the same catalogue on every database.

Rows go in with ``bulk_create`` in batches, so a few hundred thousand books take
seconds, not minutes. Distributions are skewed the way a real shop's are: a few
prolific authors, a long tail of books that sell little, more new books than old.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterator
from decimal import Decimal

from django.core.management.color import no_style
from django.db import connection

from .models import Author, Book, Genre, Publisher

__all__ = ["DEFAULT_BOOKS", "clear", "generate"]

DEFAULT_BOOKS = 300_000
BATCH = 5_000

GENRES = (
    "Literary fiction", "Crime", "Thriller", "Science fiction", "Fantasy", "Romance",
    "Historical fiction", "Horror", "Biography", "History", "Science", "Travel",
    "Cookery", "Poetry", "Children's", "Graphic novels",
)  # fmt: skip
FIRST = (
    "Ada", "Alan", "Amara", "Ben", "Carmen", "Chen", "Dara", "Elena", "Emil", "Farah",
    "Grace", "Hugo", "Ines", "Ivan", "Jun", "Kofi", "Lena", "Luca", "Maya", "Nadia",
    "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wen", "Yara",
)  # fmt: skip
LAST = (
    "Abbott", "Bauer", "Costa", "Dube", "Ekström", "Fischer", "García", "Haddad",
    "Ito", "Jensen", "Kowalski", "Laine", "Moreau", "Nakamura", "Okafor", "Petrov",
    "Quintana", "Rossi", "Sato", "Tanaka", "Umarov", "Varga", "Walsh", "Xu", "Yilmaz",
    "Zhou",
)  # fmt: skip
ADJECTIVES = (
    "Silent", "Hidden", "Last", "Broken", "Golden", "Distant", "Burning", "Quiet",
    "Winter", "Lost", "Secret", "Crimson", "Northern", "Paper", "Glass", "Wild",
)  # fmt: skip
NOUNS = (
    "Garden", "River", "House", "Orchard", "Lighthouse", "Kingdom", "Letters",
    "Harbour", "Station", "Library", "Island", "Engine", "Mountain", "Daughter",
    "Archive", "Forest",
)  # fmt: skip
PLACES = (
    "Lisbon", "Kyoto", "Lagos", "Oslo", "Lima", "Cairo", "Tallinn", "Hanoi",
    "Quebec", "Tbilisi", "Porto", "Dakar",
)  # fmt: skip
PUBLISHER_WORDS = (
    "Harbor", "Northwind", "Lantern", "Meridian", "Oak", "Riverbend", "Saltmarsh",
    "Tinder", "Vellum", "Willow", "Cobalt", "Fennel", "Juniper", "Kestrel", "Larch",
)  # fmt: skip
PUBLISHER_KINDS = ("Press", "Books", "House", "& Sons", "Editions", "Publishing")
COUNTRIES = ("GB", "US", "FR", "DE", "JP", "NG", "BR", "IN", "SE", "IT")

FIRST_DAY = datetime.date(1950, 1, 1)
LAST_DAY = datetime.date(2024, 12, 31)


def _title(rng: random.Random) -> str:
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"The {adjective} {noun}"
    if pattern == 1:
        return f"{noun} of {rng.choice(PLACES)}"
    if pattern == 2:
        return f"A {adjective} {noun} in {rng.choice(PLACES)}"
    return f"The {noun}'s {rng.choice(NOUNS)}"


def _books(
    rng: random.Random, count: int, authors: int, publishers: int, genres: int
) -> Iterator[Book]:
    """``count`` unsaved books over author/publisher/genre ids 1..n (see generate)."""
    days = (LAST_DAY - FIRST_DAY).days
    for pk in range(1, count + 1):
        yield Book(
            pk=pk,
            title=_title(rng),
            # random() ** 2 leans to low ids: a few authors write a lot.
            author_id=1 + int(authors * rng.random() ** 2),
            publisher_id=rng.randint(1, publishers),
            genre_id=1 + int(genres * rng.random() ** 1.5),
            # random() ** 0.5 leans to recent days: the shop stocks more new books.
            published=FIRST_DAY
            + datetime.timedelta(days=int(days * rng.random() ** 0.5)),
            pages=min(1400, max(48, int(rng.gauss(320, 110)))),
            price=Decimal(f"{rng.uniform(4.99, 49.99):.2f}"),
            rating=round(min(5.0, max(1.0, rng.gauss(3.8, 0.6))), 2),
            copies_sold=min(2_000_000, int(40 * rng.paretovariate(1.2))),
            stock=0 if rng.random() < 0.3 else rng.randint(1, 60),
        )


def generate(books: int = DEFAULT_BOOKS, *, seed: int = 7) -> dict[str, int]:
    """Fill empty catalogue tables; the counts of what was made, by model.

    Primary keys are given explicitly (1..n), so books can point at their authors
    without reading ids back, and the catalogue is identical on every database.
    """
    rng = random.Random(seed)
    n_authors = max(10, books // 15)
    n_publishers = max(5, min(80, books // 2_000))
    Genre.objects.bulk_create(Genre(pk=i, name=n) for i, n in enumerate(GENRES, 1))
    names = [f"{w} {k}" for w in PUBLISHER_WORDS for k in PUBLISHER_KINDS]
    rng.shuffle(names)
    Publisher.objects.bulk_create(
        Publisher(pk=i, name=names[i - 1], country=rng.choice(COUNTRIES))
        for i in range(1, n_publishers + 1)
    )
    Author.objects.bulk_create(
        (
            Author(
                pk=i,
                name=f"{rng.choice(FIRST)} {rng.choice('ABCDEFGHJKLMNPRSTW')}. "
                f"{rng.choice(LAST)}",
                born=rng.randint(1900, 2000),
            )
            for i in range(1, n_authors + 1)
        ),
        batch_size=BATCH,
    )
    rows = _books(rng, books, n_authors, n_publishers, len(GENRES))
    batch: list[Book] = []
    for book in rows:
        batch.append(book)
        if len(batch) == BATCH:
            Book.objects.bulk_create(batch)
            batch = []
    Book.objects.bulk_create(batch)
    _reset_sequences()
    return {
        "books": books,
        "authors": n_authors,
        "publishers": n_publishers,
        "genres": len(GENRES),
    }


def _reset_sequences() -> None:
    """PostgreSQL: move the id sequences past the explicit ids, for later inserts."""
    statements = connection.ops.sequence_reset_sql(
        no_style(), [Genre, Publisher, Author, Book]
    )
    if statements:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)


def clear() -> None:
    """Delete the whole catalogue, books first (one DELETE each, no cascade walk)."""
    for model in (Book, Author, Publisher, Genre):
        model.objects.all().delete()
