"""Make every QuerySet that Django or its test apps create an asynchrormous one.

Patching ``QuerySet.__new__`` (rather than ``Manager.get_queryset``) also catches
querysets built directly (``QuerySet(model)``), by related managers and by custom
managers that construct their own QuerySet subclass. Each class ``C`` is swapped
for a variant ``(SuiteQuerySetMixin, C)``, built once and cached, that keeps ``C``'s
name, module and qualname so reprs and messages read exactly as Django's do.
"""

from __future__ import annotations

from typing import Any

from django.db.models.query import QuerySet

from asynchrormous import AsyncQuerySetMixin

__all__ = ["SuiteQuerySetMixin", "async_variant", "install", "set_background"]


class SuiteQuerySetMixin(AsyncQuerySetMixin[Any]):
    """Base of every variant; its ``_background`` is the default for new querysets."""

    _background = False
    _original: type[QuerySet[Any]] = QuerySet

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The variant shares its name with the original, so pickle could not find
        # it by name: pickle the original class, whose __new__ yields the variant.
        return (_new_instance, (type(self)._original,), self.__getstate__())


_variants: dict[type, type] = {}


def async_variant(cls: type[QuerySet[Any]]) -> type[QuerySet[Any]]:
    """The class with AsyncQuerySetMixin first in its MRO that stands in for ``cls``."""
    try:
        return _variants[cls]
    except KeyError:
        pass
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_original": cls,
    }
    variant = type(cls.__name__, (SuiteQuerySetMixin, cls), namespace)
    return _variants.setdefault(cls, variant)


def _new(cls: type[QuerySet[Any]], *args: Any, **kwargs: Any) -> QuerySet[Any]:
    if not issubclass(cls, AsyncQuerySetMixin):
        cls = async_variant(cls)
    return object.__new__(cls)


def _new_instance(cls: type[QuerySet[Any]]) -> QuerySet[Any]:
    return cls.__new__(cls)


def install() -> None:
    """Patch QuerySet creation; idempotent."""
    QuerySet.__new__ = _new  # type: ignore[method-assign,assignment]


def set_background(on: bool) -> None:
    """Make querysets created from now on start in background mode (or not)."""
    SuiteQuerySetMixin._background = on
