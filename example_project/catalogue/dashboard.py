"""The dashboard's six independent questions, as querysets all three pages share.

Each page runs exactly these; only the way it runs them differs (see views.py). Each
is one statement that reads the whole book table (or a whole index), so each takes
tens of ms on SQLite. None joins per book row: SQLite would join 300,000 rows before
sorting them, and one query would then dwarf the rest of the dashboard.
"""

from __future__ import annotations

from django.db.models import Avg, Count, Max, QuerySet, Sum

from .models import Author, Book, Genre

#: Rows in each top-N list.
TOP = 5

#: One aggregate query over every book.
BOOK_STATS = {
    "avg_price": Avg("price"),
    "avg_pages": Avg("pages"),
    "copies_sold": Sum("copies_sold"),
    "newest": Max("published"),
}


def in_stock() -> QuerySet[Book]:
    """Books with copies on the shelf (counted)."""
    return Book.objects.filter(stock__gt=0)


def top_authors() -> QuerySet[Author]:
    """The most prolific authors."""
    return Author.objects.annotate(titles=Count("books")).order_by("-titles", "pk")


def genres() -> QuerySet[Genre]:
    """Genres by number of books."""
    return Genre.objects.annotate(titles=Count("books")).order_by("-titles", "name")


def latest_books() -> QuerySet[Book]:
    """The newest books first."""
    return Book.objects.order_by("-published", "-pk")


def bestsellers() -> QuerySet[Book]:
    """The best-selling books first (the dashboard shows the first)."""
    return Book.objects.order_by("-copies_sold", "pk")
