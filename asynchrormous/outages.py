"""Database outages: one warning per alias and outage, one info when it is over.

While a server is down every background query fails; logging each would bury the
one line that matters. The first failure of an alias logs a warning, the rest go to
DEBUG, and the next success logs how long it lasted and how many failures it cost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["down", "epoch", "failed", "lost", "succeeded"]

logger = logging.getLogger("asynchrormous")


class _Outage:
    __slots__ = ("began", "failures", "started")

    def __init__(self, began: int) -> None:
        self.began = began  # the epoch it began in
        self.started = time.monotonic()
        self.failures = 1


#: Aliases that are down: read without the lock on the hot path.
down: dict[str, _Outage] = {}
#: Bumped when an outage begins or ends. A job reads it when it starts, so an
#: answer that comes late (a success from before the outage, a failure from
#: before the recovery) cannot end an outage or begin a new one.
epoch = 0
_restored_in: dict[str, int] = {}
_lock = threading.Lock()


def lost(wrapper: Any) -> bool:
    """Whether a job failed because its connection to the server is gone.

    Not a query error (a cancel, a deadlock): the connection still answers. In a
    transaction it cannot answer anyway, so only a closed connection counts there.
    """
    if wrapper.connection is None:
        return True
    if wrapper.in_atomic_block:
        return False
    try:
        return not wrapper.is_usable()
    except Exception:  # the job's own error is the one to raise
        return True


def failed(alias: str, exc: BaseException, since: int) -> None:
    """Note a query on ``alias`` that could not reach the server.

    ``since`` is ``epoch`` when the failed attempt began.
    """
    global epoch
    with _lock:
        outage = down.get(alias)
        if outage is not None:
            outage.failures += 1
            first = False
        elif since < _restored_in.get(alias, 0):
            first = False  # began before the recovery: part of the outage it ended
        else:
            epoch += 1
            down[alias] = _Outage(epoch)
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


def succeeded(alias: str, since: int) -> None:
    """Note a job on ``alias`` that succeeded; it ends the alias's outage if it
    began after the outage did (``since`` is ``epoch`` when it began)."""
    global epoch
    if alias not in down:  # no lock unless the alias is down
        return
    with _lock:
        outage = down.get(alias)
        if outage is None or since < outage.began:
            return
        del down[alias]
        epoch += 1
        _restored_in[alias] = epoch
    logger.info(
        "connection to %r restored after %.1f s, %d failures",
        alias,
        time.monotonic() - outage.started,
        outage.failures,
    )
