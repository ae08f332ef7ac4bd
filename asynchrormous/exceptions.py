"""Exceptions of asynchrormous; each also subclasses what Python users already catch."""

from concurrent.futures import CancelledError

__all__ = ["AsynchrormousError", "Cancelled", "ResultTimeout"]


class AsynchrormousError(Exception):
    """Base class of the errors asynchrormous raises itself."""


class ResultTimeout(AsynchrormousError, TimeoutError):
    """A background result was not ready within the timeout."""


class Cancelled(AsynchrormousError, CancelledError):
    """The background job behind a result was cancelled before it ran."""
