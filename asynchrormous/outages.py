"""Outages: one warning per alias and outage, one info when it is over.

While a server is down every call to it fails; logging each would bury the one
line that matters. The first failure of an alias (a database's, a cache's) logs a
warning, the rest go to DEBUG, and the next success logs how long it lasted and
how many failures it cost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Outages", "down", "epoch", "failed", "lost", "succeeded"]

logger = logging.getLogger("asynchrormous")


class _Outage:
    __slots__ = ("began", "failures", "started")

    def __init__(self, began: int) -> None:
        self.began = began  # the epoch it began in
        self.started = time.monotonic()
        self.failures = 1


#: Bumped when an outage begins or ends. A call reads it when it starts, so an
#: answer that comes late (a success from before the outage, a failure from
#: before the recovery) cannot end an outage or begin a new one.
epoch = 0
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A lock another thread held at the fork is never released in the child."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


class Outages:
    """The outages of one kind of server, keyed by alias, and what they log.

    ``began`` is logged with the alias and ``cause(exc)``, ``failing`` with the
    alias and the exception, ``ended`` with the alias, its seconds and failures.
    """

    def __init__(
        self,
        began: str,
        failing: str,
        ended: str,
        cause: Callable[[BaseException], str] = repr,
    ) -> None:
        self.began = began
        self.failing = failing
        self.ended = ended
        self.cause = cause
        #: Aliases that are down: read without the lock on the hot path.
        self.down: dict[str, _Outage] = {}
        self._restored_in: dict[str, int] = {}

    def failed(self, alias: str, exc: BaseException, since: int) -> None:
        """Note a call to ``alias`` that could not reach the server.

        ``since`` is ``epoch`` when the failed attempt began.
        """
        global epoch
        with _lock:
            outage = self.down.get(alias)
            if outage is not None:
                outage.failures += 1
                first = False
            elif since < self._restored_in.get(alias, 0):
                first = False  # began before the recovery: part of the outage it ended
            else:
                epoch += 1
                self.down[alias] = _Outage(epoch)
                first = True
        if first:
            logger.warning(self.began, alias, self.cause(exc))
        else:
            logger.debug(self.failing, alias, exc)

    def succeeded(self, alias: str, since: int) -> bool:
        """Note a call to ``alias`` that succeeded; whether it ended the alias's
        outage (it does if it began after the outage did: ``since`` is ``epoch``
        when it began)."""
        global epoch
        if alias not in self.down:  # no lock unless the alias is down
            return False
        with _lock:
            outage = self.down.get(alias)
            if outage is None or since < outage.began:
                return False
            del self.down[alias]
            epoch += 1
            self._restored_in[alias] = epoch
        logger.info(
            self.ended, alias, time.monotonic() - outage.started, outage.failures
        )
        return True


_databases = Outages(
    began="lost the connection to %r (%s); further failures are not logged until "
    "a query on it succeeds",
    failing="a query on %r failed: %s",
    ended="connection to %r restored after %.1f s, %d failures",
    cause=lambda exc: f"{type(exc).__name__}: {str(exc).strip()}",
)
#: Database aliases that are down.
down = _databases.down
failed = _databases.failed
succeeded = _databases.succeeded
