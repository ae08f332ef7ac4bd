"""Settings for the bookshop demo; the environment picks the database and the latency.

- ``DATABASE_URL``: SQLite file ``bookshop.sqlite3`` beside this project when unset;
  ``postgres://postgres@127.0.0.1:5432/demo`` for PostgreSQL (see database_url.py).
- ``DEMO_LATENCY_MS``: milliseconds of simulated network round trip added to every
  statement the served pages send (see catalogue/latency.py). 0 (the default) is off.
- ``DEMO_DEBUG=1``: Django's DEBUG. Off by default, so timings are not skewed by
  Django recording every query.
"""

import os
from pathlib import Path

from .database_url import database_from_url, sqlite_database

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "bookshop-demo-not-a-secret"
DEBUG = os.environ.get("DEMO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = ["asynchrormous", "catalogue"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bookshop.urls"
TEMPLATES = [
    {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}
]
ASGI_APPLICATION = "bookshop.asgi.application"
WSGI_APPLICATION = "bookshop.wsgi.application"

_url = os.environ.get("DATABASE_URL", "").strip()
DATABASES = {
    "default": database_from_url(_url)
    if _url
    else sqlite_database(BASE_DIR / "bookshop.sqlite3")
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# The library's default, written out: up to 8 background queries at once (and so up
# to 8 connections) per server process. The dashboard sends 6.
ASYNCHRORMOUS = {"WORKERS": 8}

DEMO_LATENCY_MS = float(os.environ.get("DEMO_LATENCY_MS") or 0)
