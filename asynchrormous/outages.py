"""Database outages: one warning per alias and outage, one info when it is over.

While a server is down every background read fails; logging each would bury the
one line that matters. The first failure of an alias logs a warning, the rest go to
DEBUG, and the next success logs how long it lasted and how many failures it cost.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["down", "failed", "succeeded"]

logger = logging.getLogger("asynchrormous")


class _Outage:
    __slots__ = ("failures", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.failures = 1


#: Aliases that are down, and since when: read without the lock on the hot path.
down: dict[str, _Outage] = {}
# When each alias's last outage ended: a failure of an attempt that started
# before then belongs to that outage, not to a new one.
_restored_at: dict[str, float] = {}
_lock = threading.Lock()


def failed(alias: str, exc: BaseException, started: float) -> None:
    """Note a query on ``alias`` that could not reach the server.

    ``started`` is when the failed attempt began (``time.monotonic()``).
    """
    with _lock:
        outage = down.get(alias)
        if outage is not None:
            outage.failures += 1
            first = False
        elif started < _restored_at.get(alias, float("-inf")):
            first = False  # reported late, by an attempt made before the recovery
        else:
            down[alias] = _Outage(time.monotonic())
            first = True
    if first:
        logger.warning(
            "lost the connection to %r (%s: %s); further failures are not logged "
            "until a query on it succeeds",
            alias,
            type(exc).__name__,
            str(exc).strip(),
        )
    else:
        logger.debug("a query on %r failed: %s", alias, exc)


def succeeded(alias: str) -> None:
    """Note a query on ``alias`` that reached the server; ends its outage if any."""
    if alias not in down:  # no lock unless the alias is down
        return
    with _lock:
        outage = down.pop(alias, None)
        now = time.monotonic()
        if outage is not None:
            _restored_at[alias] = now
    if outage is not None:
        logger.info(
            "connection to %r restored after %.1f s, %d failures",
            alias,
            now - outage.since,
            outage.failures,
        )
