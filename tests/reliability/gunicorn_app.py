"""A WSGI app for gunicorn --preload: its pool is warm in the master before the fork.

Started by ``test_gunicorn_fork.py`` with the test database's name in
``RELIABILITY_DB_NAME`` and a directory in ``RELIABILITY_SESSIONS_DIR``, where every
process writes one line per database session it opens: ``<backend id> <thread>``, in
a file named after its pid. At import, in the master, it runs background queries, so
the master's workers hold open sessions when gunicorn forks its workers.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.conf import settings

settings.DATABASES["default"]["NAME"] = os.environ["RELIABILITY_DB_NAME"]
settings.ROOT_URLCONF = __name__
# The master's sessions must outlive the run untouched: no idle close during it.
settings.ASYNCHRORMOUS = {
    **settings.ASYNCHRORMOUS,
    "CONNECTION_IDLE_TIMEOUT": 3600.0,
    "CONNECTION_MAX_AGE": None,
}

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402
from django.db.models import Sum  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from asynchrormous import resolve, wait  # noqa: E402
from tests.helpers import sleep_expr  # noqa: E402
from tests.testapp.models import Book  # noqa: E402

SESSIONS = Path(os.environ["RELIABILITY_SESSIONS_DIR"])
#: The comment the master's warm-up queries carry, so the test finds them on the server.
WARM_UP = "gunicorn-master-warm-up"


def _record_session(sender: Any, connection: Any, **kwargs: Any) -> None:
    backend = getattr(connection, "test_backend_id", None)  # tests.testapp sets it
    with open(SESSIONS / str(os.getpid()), "a") as f:
        f.write(f"{backend} {threading.current_thread().name}\n")


connection_created.connect(_record_session)


def books(request: HttpRequest) -> JsonResponse:
    """Four background queries of the books from ``year`` on, used at the end."""
    year = int(request.GET["year"])
    recent = Book.objects.filter(year__gte=year).order_by("pk")
    titles = recent.values_list("title", flat=True).start()
    count = recent.run_async().count()
    first = recent.run_async().order_by("year", "pk").first()
    pages = recent.run_async().aggregate(total=Sum("pages"))
    return JsonResponse(
        {
            "pid": os.getpid(),
            "titles": list(titles),
            "count": resolve(count),
            "first": resolve(first).title,
            "pages": resolve(pages)["total"],
        }
    )


urlpatterns = [path("books/", books)]


def _warm_up() -> None:
    """Overlapping background reads, so several of the master's workers connect."""
    first = Book.objects.order_by("pk").values("pk")[:1]
    slow = (
        Book.objects.filter(pk=first)
        .annotate(z=sleep_expr(0.1))
        .extra(where=[f"'{WARM_UP}' <> ''"])  # names the query on the server
    )
    started = [slow.run_async().start() for _ in range(4)]
    wait(*started, timeout=30)
    assert all(len(rows) == 1 for rows in started)
    # The master's own thread opened no session, which its workers would inherit.
    assert connection.connection is None, "the master's main thread holds a session"


_warm_up()

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
