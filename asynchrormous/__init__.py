"""Run Django ORM queries in the background; block only where the result is used."""

from .exceptions import AsynchrormousError, Cancelled, ResultTimeout
from .model_mixin import AsyncModelMixin
from .pool import shutdown
from .queryset import AsyncManager, AsyncQuerySet, AsyncQuerySetMixin
from .results import cancel, is_ready, resolve, wait
from .transaction import atomic

__all__ = [
    "AsyncManager",
    "AsyncModelMixin",
    "AsyncQuerySet",
    "AsyncQuerySetMixin",
    "AsynchrormousError",
    "Cancelled",
    "ResultTimeout",
    "atomic",
    "cancel",
    "is_ready",
    "resolve",
    "shutdown",
    "wait",
]
