"""The TEST_RUNNER for Django's suite: records every outcome to JSON for run.py.

Recording results (instead of parsing unittest's text output) gives exact test ids
and exception types. Child processes of ``--parallel`` send their exceptions as
text, so a failure whose exception or traceback cannot be pickled (a lazy proxy in
its arguments, no tblib installed) is still reported instead of crashing the run.
"""

from __future__ import annotations

import json
import multiprocessing.util
import os
import traceback
import unittest
from typing import Any

from django.test import runner as django_runner
from django.test.runner import (
    DiscoverRunner,
    ParallelTestSuite,
    RemoteTestResult,
    RemoteTestRunner,
)

__all__ = ["SuiteRunner"]

MODE = os.environ.get("DJANGO_SUITE_MODE", "plain")

ErrInfo = tuple[Any, Any, Any]


def _shutdown_pool() -> None:
    """Close worker connections, so test databases can be cloned and dropped."""
    if MODE != "plain":
        import asynchrormous

        asynchrormous.shutdown(timeout=30)


class RemoteError(Exception):
    """An exception from a child process, reduced to its type name and text."""

    def __init__(self, type_name: str, message: str, text: str) -> None:
        super().__init__(type_name, message, text)
        self.type_name = type_name
        self.message = message
        self.text = text

    def __str__(self) -> str:
        return self.text


class RemoteFailure(RemoteError, AssertionError):
    """A failed assertion from a child process (unittest tells failures by type)."""


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception as error:  # a lazy proxy whose evaluation fails
        text = f"<str() raised {type(error).__name__}>"
    return text.strip().partition("\n")[0][:300]


def _describe(err: ErrInfo) -> tuple[str, str]:
    value = err[1]
    if isinstance(value, RemoteError):
        return value.type_name, value.message
    return err[0].__name__, _first_line(value)


def _is_failure(test: Any, err: ErrInfo) -> bool:
    # unittest's rule; class-level errors come on an _ErrorHolder, which has none.
    return issubclass(err[0], getattr(test, "failureException", None) or AssertionError)


class _PortableResult(RemoteTestResult):
    def _portable(self, test: Any, err: ErrInfo | None) -> ErrInfo | None:
        if err is None:
            return None
        type_name, message = _describe(err)
        text = "".join(traceback.format_exception(*err))
        kind = RemoteFailure if _is_failure(test, err) else RemoteError
        return (kind, kind(type_name, message, text), None)

    def addError(self, test: Any, err: ErrInfo) -> None:
        super().addError(test, self._portable(test, err))

    def addFailure(self, test: Any, err: ErrInfo) -> None:
        super().addFailure(test, self._portable(test, err))

    def addSubTest(self, test: Any, subtest: Any, err: ErrInfo | None) -> None:
        super().addSubTest(test, subtest, self._portable(test, err))

    def addExpectedFailure(self, test: Any, err: ErrInfo) -> None:
        super().addExpectedFailure(test, self._portable(test, err))


class _PortableRunner(RemoteTestRunner):
    resultclass = _PortableResult


def _init_suite_worker(*args: Any) -> None:
    django_runner._init_worker(*args)  # type: ignore[attr-defined]
    # Pool processes end through multiprocessing's exit, not atexit.
    multiprocessing.util.Finalize(None, _shutdown_pool, exitpriority=100)


class _SuiteParallelTestSuite(ParallelTestSuite):
    init_worker = _init_suite_worker
    runner_class = _PortableRunner


class RecordingResult(unittest.TextTestResult):
    """A TextTestResult that also keeps each outcome, exception type and message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[str, dict[str, str]] = {}

    def _record(self, test: Any, outcome: str, err: ErrInfo | None = None) -> None:
        record = self.records.setdefault(test.id(), {})
        if record.get("outcome") not in ("error", "failure"):
            record["outcome"] = outcome
        if err is not None and "type" not in record:
            record["type"], record["message"] = _describe(err)
            value = err[1]
            record["text"] = (
                value.text
                if isinstance(value, RemoteError)
                else "".join(traceback.format_exception(*err))
            )

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._record(test, "success")

    def addError(self, test: Any, err: ErrInfo) -> None:
        super().addError(test, err)
        self._record(test, "error", err)

    def addFailure(self, test: Any, err: ErrInfo) -> None:
        super().addFailure(test, err)
        self._record(test, "failure", err)

    def addSubTest(self, test: Any, subtest: Any, err: ErrInfo | None) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._record(test, "failure" if _is_failure(test, err) else "error", err)

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skip")
        self.records[test.id()].setdefault("message", str(reason))

    def addExpectedFailure(self, test: Any, err: ErrInfo) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "expected_failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected_success")


class SuiteRunner(DiscoverRunner):
    """DiscoverRunner that writes outcomes to $DJANGO_SUITE_RESULTS and, in
    background mode, switches new querysets to background only while tests run."""

    parallel_test_suite = _SuiteParallelTestSuite

    def get_resultclass(self) -> type[unittest.TextTestResult]:
        return RecordingResult

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        # Forked children inherit the switch; setup and teardown stay plain.
        if MODE == "background":
            from .patch import set_background

            set_background(True)
        try:
            result = super().run_suite(suite, **kwargs)
        finally:
            if MODE == "background":
                set_background(False)
            _shutdown_pool()
        path = os.environ.get("DJANGO_SUITE_RESULTS")
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(getattr(result, "records", {}), f, indent=0, sort_keys=True)
        return result

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        _shutdown_pool()
        super().teardown_databases(old_config, **kwargs)
