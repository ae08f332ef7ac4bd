"""Helpers for the issue-11 regression tests: slow writes, subprocesses, pauses."""

import contextlib
import os
import sys
import threading
from pathlib import Path

from django.db import connection
from django.db.models.expressions import RawSQL

import asynchrormous
from tests.helpers import sleep_expr
from tests.testapp.apps import SLEEP_SQL
from tests.testapp.models import Book

#: The directory holding the ``tests`` package, and the one holding the library the
#: tests import (the same under tox, which installs a wheel).
REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY_ROOT = Path(asynchrormous.__file__).resolve().parent.parent


def slow_same(column, seconds):
    """An UPDATE value: ``column`` unchanged, after the database slept ``seconds``.

    Makes a write "a job that takes time" on every backend (one matched row).
    """
    quoted = connection.ops.quote_name(column)
    sleep = SLEEP_SQL[connection.vendor]
    return RawSQL(f"CASE WHEN {sleep} THEN {quoted} ELSE {quoted} END", [seconds])


def slow_fetch(book, seconds):
    """A started fetch of one book that keeps a worker busy for ``seconds``."""
    return Book.objects.filter(pk=book.pk).annotate(z=sleep_expr(seconds)).start()


def subprocess_env(tmp_path, **extra):
    """Environment for a Python subprocess that imports ``tests`` and the library."""
    paths = [str(tmp_path), str(LIBRARY_ROOT), str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


@contextlib.contextmanager
def paused_on_first_call(name, module_suffix, reached, release, timeout=3.0):
    """In the current thread, pause on entering function ``name`` of a library module.

    The first call of ``name`` defined in a file ending in ``module_suffix`` sets
    ``reached`` and then waits (bounded by ``timeout``) for ``release``: a test can
    then make another thread act at exactly that point. If the library no longer has
    such a function nothing pauses, and the test runs its scenario unforced.
    """
    fired = False

    def tracer(frame, event, arg):
        nonlocal fired
        code = frame.f_code
        if (
            not fired
            and event == "call"
            and code.co_name == name
            and code.co_filename.endswith(module_suffix)
        ):
            fired = True
            reached.set()
            release.wait(timeout)
        return None  # no line tracing: only calls are watched

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def start_thread(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread
