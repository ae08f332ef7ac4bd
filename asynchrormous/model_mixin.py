"""AsyncModelMixin: a model's own async methods on the worker pool."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from django.db import router

from . import aio

__all__ = ["AsyncModelMixin"]


class AsyncModelMixin:
    """``asave()``, ``adelete()``, ``arefresh_from_db()`` that run in parallel.

    Django's own run one after another on a single thread. Signals fire as in Django,
    on the worker that saves. Mix it in first: ``class Book(AsyncModelMixin, Model)``.
    """

    def _async_alias(self, using: str | None, for_write: bool) -> str:
        if using:
            return using
        route = router.db_for_write if for_write else router.db_for_read
        return route(type(self), instance=self)  # type: ignore[arg-type]

    async def _arun(
        self,
        method: str,
        using: str | None,
        for_write: bool,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if using is not None:
            kwargs["using"] = using
        return await aio.run(
            functools.partial(getattr(self, method), *args, **kwargs),
            alias=self._async_alias(using, for_write),
            writes=for_write,
            description=f"{type(self).__name__}.a{method}()",
        )

    async def asave(self, *args: Any, using: str | None = None, **kwargs: Any) -> None:
        await self._arun("save", using, True, *args, **kwargs)

    asave.alters_data = True  # type: ignore[attr-defined]

    async def adelete(
        self, using: str | None = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        return await self._arun("delete", using, True, keep_parents=keep_parents)

    adelete.alters_data = True  # type: ignore[attr-defined]

    async def arefresh_from_db(
        self,
        using: str | None = None,
        fields: Iterable[str] | None = None,
        from_queryset: Any = None,
    ) -> None:
        await self._arun(
            "refresh_from_db", using, False, fields=fields, from_queryset=from_queryset
        )
