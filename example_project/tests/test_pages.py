"""Every page through Django's test client.

Django's TestCase (``django_db`` without ``transaction=True``) wraps each test in a
transaction, and asynchrormous then runs background work inline on the caller's
thread. The page tests use ``transaction=True`` so that the worker pool really runs.
"""

from __future__ import annotations

import itertools
import re
import threading

import pytest
from django.db import connection
from django.test import Client

from catalogue import latency
from catalogue.models import Book
from page_parts import bars, data_section

PAGES = ("sync", "background", "gather")

JOB_LABELS = {
    "background": [
        "Book queryset.count()",
        "Book queryset.aggregate()",
        "fetch of Author queryset",
        "fetch of Genre queryset",
        "fetch of Book queryset",
        "Book queryset.first()",
    ],
    "gather": [
        "Book queryset.acount()",
        "Book queryset.aaggregate()",
        "fetch of Author queryset",
        "fetch of Genre queryset",
        "fetch of Book queryset",
        "Book queryset.afirst()",
    ],
}


def total_ms(html: str) -> float:
    match = re.search(r'id="timeline" data-total-ms="([0-9.]+)"', html)
    assert match, "no timeline total on the page"
    return float(match.group(1))


def get(client: Client, page: str) -> str:
    response = client.get(f"/{page}/")
    assert response.status_code == 200
    return response.content.decode()


def test_root_redirects_to_the_first_page(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/sync/"


@pytest.mark.django_db(transaction=True)
def test_sync_page_times_its_six_statements_on_the_request_thread(
    client: Client, catalogue: dict[str, int]
) -> None:
    drawn = bars(get(client, "sync"))
    assert len(drawn) == 6
    assert len({bar["thread"] for bar in drawn}) == 1
    assert not drawn[0]["thread"].startswith("asynchrormous-")
    assert all(bar["label"].startswith("SELECT") for bar in drawn)
    # One after another: each starts after the one before it ended.
    for before, after in itertools.pairwise(drawn):
        assert float(after["start"]) >= float(before["start"]) + float(before["ms"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("page", ["background", "gather"])
def test_parallel_pages_draw_one_bar_per_background_job(
    client: Client, catalogue: dict[str, int], page: str
) -> None:
    drawn = bars(get(client, page))
    assert sorted(bar["label"] for bar in drawn) == sorted(JOB_LABELS[page])
    assert all(bar["thread"].startswith("asynchrormous-") for bar in drawn)


@pytest.mark.django_db(transaction=True)
def test_the_three_pages_show_the_same_data(
    client: Client, catalogue: dict[str, int]
) -> None:
    sections = {page: data_section(get(client, page)) for page in PAGES}
    assert sections["sync"] == sections["background"] == sections["gather"]
    in_stock = Book.objects.filter(stock__gt=0).count()
    assert f'id="in-stock">{in_stock:,}<' in sections["sync"]
    assert sections["sync"].count("<li>") == 3 * 5  # three top-5 lists


@pytest.mark.django_db(transaction=True)
def test_requests_served_at_once_keep_their_own_timelines(
    catalogue: dict[str, int],
) -> None:
    pages: dict[int, str] = {}

    def load(i: int) -> None:
        pages[i] = get(Client(), "background")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(pages) == [0, 1, 2]
    for html in pages.values():
        assert len(bars(html)) == 6


@pytest.mark.django_db
def test_in_a_transaction_background_jobs_run_inline_and_are_still_drawn(
    client: Client, catalogue: dict[str, int]
) -> None:
    drawn = bars(get(client, "background"))
    assert sorted(bar["label"] for bar in drawn) == sorted(JOB_LABELS["background"])
    assert {bar["thread"] for bar in drawn} == {threading.current_thread().name}


@pytest.mark.django_db(transaction=True)
def test_latency_reaches_the_request_thread_and_every_worker(
    client: Client, catalogue: dict[str, int]
) -> None:
    latency.install(40)
    connection.close()  # reopened with the latency wrapper
    totals = {}
    for page in PAGES:
        html = get(client, page)
        drawn = bars(html)
        assert len(drawn) == 6
        assert all(float(bar["ms"]) >= 40 for bar in drawn), page
        totals[page] = total_ms(html)
    assert totals["sync"] >= 6 * 40
    # Six round trips side by side cost about one.
    assert totals["background"] < totals["sync"] / 2
    assert totals["gather"] < totals["sync"] / 2


@pytest.mark.django_db(transaction=True)
def test_latency_survives_a_connection_opened_inside_an_execute_wrapper() -> None:
    latency.install(1)
    connection.close()

    def passthrough(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        return execute(sql, params, many, context)

    # asynchrormous's instrumentation opens worker connections inside such a block;
    # Django pops the last wrapper on exit, which must not be the latency's.
    with connection.execute_wrapper(passthrough):
        Book.objects.exists()
    assert latency.active_on(connection)
    assert passthrough not in connection.execute_wrappers
