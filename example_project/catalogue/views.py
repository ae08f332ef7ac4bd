"""One dashboard, three ways. Each view only gathers its data; ``page()`` renders it.

1. ``sync_dashboard``: plain Django, each query waits for the one before it.
2. ``background_dashboard``: the same code with ``run_async()``/``start()``: every
   query is running before the template uses the first result.
3. ``gather_dashboard``: an async view awaiting the ``a*`` methods with
   ``asyncio.gather``, which asynchrormous runs side by side on its worker pool.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from . import latency, timeline
from .dashboard import (
    BOOK_STATS,
    TOP,
    bestsellers,
    genres,
    in_stock,
    latest_books,
    top_authors,
)
from .models import Book

Data = dict[str, Any]

PAGES = {
    "sync": "1 · plain Django",
    "background": "2 · run_async()",
    "gather": "3 · asyncio.gather()",
}


@functools.cache
def _source(fetch: Callable[..., Any]) -> str:
    return inspect.getsource(fetch)


def _context(
    name: str, fetch: Callable[..., Any], data: Data, tl: timeline.Timeline
) -> Data:
    return {
        **data,
        "page": name,
        "pages": PAGES,
        "timeline": tl,
        "source": _source(fetch),
        "vendor": connection.display_name,
        "latency_ms": latency.seconds() * 1000,
        "workers": settings.ASYNCHRORMOUS.get("WORKERS", 8),
        "cpus": os.cpu_count(),
    }


def page(
    name: str, *, plain: bool = False
) -> Callable[[Callable[[HttpRequest], Any]], Callable[[HttpRequest], Any]]:
    """Turn a function returning the dashboard's data into a view rendering it.

    The template renders the data first and the timeline last, so that on the
    run_async() page the timeline is drawn only once every lazy result was used.
    ``plain`` times plain statements (the page that runs no background jobs).
    """

    def decorate(fetch: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
        if inspect.iscoroutinefunction(fetch):
            afetch: Callable[[HttpRequest], Awaitable[Data]] = fetch

            @functools.wraps(fetch)
            async def async_view(request: HttpRequest) -> HttpResponse:
                with timeline.recording(name, PAGES[name]) as tl:
                    data = await afetch(request)
                    context = _context(name, fetch, data, tl)
                    return render(request, "catalogue/dashboard.html", context)

            return async_view

        @functools.wraps(fetch)
        def view(request: HttpRequest) -> HttpResponse:
            with timeline.recording(name, PAGES[name]) as tl:
                if plain:
                    with timeline.plain_statements(tl):
                        data = fetch(request)
                else:
                    data = fetch(request)
                context = _context(name, fetch, data, tl)
                return render(request, "catalogue/dashboard.html", context)

        return view

    return decorate


@page("sync", plain=True)
def sync_dashboard(request: HttpRequest) -> Data:
    return {
        "in_stock": in_stock().count(),  # waits
        "stats": Book.objects.aggregate(**BOOK_STATS),  # waits again
        "top_authors": list(top_authors()[:TOP]),  # and again...
        "genres": list(genres()[:TOP]),
        "latest": list(latest_books()[:TOP]),
        "bestseller": bestsellers().first(),
    }


@page("background")
def background_dashboard(request: HttpRequest) -> Data:
    return {
        "in_stock": in_stock().run_async().count(),  # a lazy int, running now
        "stats": Book.objects.run_async().aggregate(**BOOK_STATS),  # a lazy dict
        "top_authors": top_authors().run_async()[:TOP],  # a slice starts the fetch
        "genres": genres()[:TOP].start(),  # start(): submit it now
        "latest": latest_books().run_async()[:TOP],
        "bestseller": bestsellers().run_async().first(),  # a lazy object
    }  # the template blocks on each result only if it is not in yet


@page("gather")
async def gather_dashboard(request: HttpRequest) -> Data:
    counted, stats, authors, genre_rows, latest, bestseller = await asyncio.gather(
        in_stock().acount(),
        Book.objects.aaggregate(**BOOK_STATS),
        top_authors()[:TOP],  # `await queryset` fetches on the pool too
        genres()[:TOP],
        latest_books()[:TOP],
        bestsellers().afirst(),
    )
    return {
        "in_stock": counted,
        "stats": stats,
        "top_authors": authors,
        "genres": genre_rows,
        "latest": latest,
        "bestseller": bestseller,
    }
