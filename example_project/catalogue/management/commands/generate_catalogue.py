"""``manage.py generate_catalogue``: the sample catalogue, the same on every run.

Big enough that each dashboard query takes tens of milliseconds on SQLite (a few
hundred thousand books), quick enough to make on first start. Skips when books are
already there, so ``make demo`` can run it every time.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from catalogue.generate import DEFAULT_BOOKS, clear, generate
from catalogue.models import Book


class Command(BaseCommand):
    help = "Generate the sample bookshop catalogue (skipped if books exist)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--books",
            type=int,
            default=DEFAULT_BOOKS,
            help=f"number of books (default {DEFAULT_BOOKS:,})",
        )
        parser.add_argument("--seed", type=int, default=7, help="random seed")
        parser.add_argument(
            "--force",
            action="store_true",
            help="delete the catalogue and generate it again",
        )

    def handle(self, *args: Any, books: int, seed: int, force: bool, **kw: Any) -> None:
        existing = Book.objects.count()
        if existing and not force:
            self.stdout.write(
                f"The catalogue is already loaded ({existing:,} books); skipping. "
                f"--force makes it again."
            )
            return
        started = time.perf_counter()
        # One transaction: an interrupted run leaves no half catalogue to skip over.
        with transaction.atomic():
            clear()
            counts = generate(books, seed=seed)
        seconds = time.perf_counter() - started
        summary = ", ".join(f"{n:,} {what}" for what, n in counts.items())
        self.stdout.write(
            self.style.SUCCESS(f"Generated {summary} in {seconds:.1f} s.")
        )
