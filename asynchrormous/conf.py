"""The ``ASYNCHRORMOUS`` setting, merged over documented defaults and checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

__all__ = ["DEFAULTS", "Settings", "get_settings", "setting_errors"]

#: Every key of ``settings.ASYNCHRORMOUS`` and its default; the README documents each.
DEFAULTS: dict[str, Any] = {
    # Worker threads, hence at most this many connections per database alias.
    "WORKERS": 8,
    # Seconds a caller waits for a result before ResultTimeout; None waits forever.
    "TIMEOUT": 60.0,
    # Seconds a worker keeps a database connection; None keeps it until it fails.
    "CONNECTION_MAX_AGE": 300.0,
    # Seconds without a job after which a worker closes its connections.
    "CONNECTION_IDLE_TIMEOUT": 60.0,
    # Whether a sync caller runs a job no worker has picked up yet itself, rather
    # than wait for one (README: "the caller runs it"). Off: TIMEOUT then no longer
    # bounds that wait, and the job sees the caller's session state.
    "CALLER_RUNS": False,
    # The alias in settings.CACHES that qs.cache() keeps results in; None: no caching.
    "CACHE": None,
    # Seconds a cached result is kept, unless qs.cache(timeout=...) says otherwise.
    "CACHE_TIMEOUT": 300.0,
    # Prepended to every key this library puts in the cache.
    "CACHE_PREFIX": "asynchrormous",
}

# Check ids, one per key, so a system check can name exactly what is wrong.
CHECK_IDS = {
    "ASYNCHRORMOUS": "asynchrormous.E001",
    "unknown": "asynchrormous.E002",
    "WORKERS": "asynchrormous.E003",
    "TIMEOUT": "asynchrormous.E004",
    "CONNECTION_MAX_AGE": "asynchrormous.E005",
    "CONNECTION_IDLE_TIMEOUT": "asynchrormous.E006",
    "CALLER_RUNS": "asynchrormous.E008",
    "CACHE": "asynchrormous.E009",
    "CACHE_TIMEOUT": "asynchrormous.E010",
    "CACHE_PREFIX": "asynchrormous.E011",
}


@dataclass(frozen=True)
class Settings:
    workers: int
    timeout: float | None
    connection_max_age: float | None
    connection_idle_timeout: float
    caller_runs: bool
    cache: str | None
    cache_timeout: float
    cache_prefix: str


def _is_seconds(value: object, *, allow_none: bool) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def setting_errors() -> list[tuple[str, str]]:
    """``(check id, message)`` for everything wrong in ``settings.ASYNCHRORMOUS``."""
    raw = getattr(settings, "ASYNCHRORMOUS", {})
    if not isinstance(raw, dict):
        return [
            (
                CHECK_IDS["ASYNCHRORMOUS"],
                f"settings.ASYNCHRORMOUS must be a dict, not {type(raw).__name__}.",
            )
        ]
    errors = []
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        errors.append(
            (
                CHECK_IDS["unknown"],
                f"settings.ASYNCHRORMOUS has unknown key(s) {', '.join(unknown)}; "
                f"the known keys are {', '.join(DEFAULTS)}.",
            )
        )
    workers = raw.get("WORKERS", DEFAULTS["WORKERS"])
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        errors.append(
            (
                CHECK_IDS["WORKERS"],
                f"ASYNCHRORMOUS['WORKERS'] must be an integer >= 1, not {workers!r}.",
            )
        )
    for key, allow_none in (
        ("TIMEOUT", True),
        ("CONNECTION_MAX_AGE", True),
        ("CONNECTION_IDLE_TIMEOUT", False),
        ("CACHE_TIMEOUT", False),
    ):
        value = raw.get(key, DEFAULTS[key])
        if not _is_seconds(value, allow_none=allow_none):
            expected = "a number of seconds > 0" + (" or None" if allow_none else "")
            errors.append(
                (
                    CHECK_IDS[key],
                    f"ASYNCHRORMOUS[{key!r}] must be {expected}, not {value!r}.",
                )
            )
    caller_runs = raw.get("CALLER_RUNS", DEFAULTS["CALLER_RUNS"])
    if not isinstance(caller_runs, bool):
        errors.append(
            (
                CHECK_IDS["CALLER_RUNS"],
                f"ASYNCHRORMOUS['CALLER_RUNS'] must be True or False, "
                f"not {caller_runs!r}.",
            )
        )
    cache = raw.get("CACHE", DEFAULTS["CACHE"])
    if cache is not None and cache not in getattr(settings, "CACHES", {}):
        errors.append(
            (
                CHECK_IDS["CACHE"],
                f"ASYNCHRORMOUS['CACHE'] must be None or an alias of settings.CACHES "
                f"({', '.join(map(repr, getattr(settings, 'CACHES', {})))}), "
                f"not {cache!r}.",
            )
        )
    prefix = raw.get("CACHE_PREFIX", DEFAULTS["CACHE_PREFIX"])
    if (
        not isinstance(prefix, str)
        or not prefix
        or not prefix.isprintable()
        or (" " in prefix)
    ):
        errors.append(
            (
                CHECK_IDS["CACHE_PREFIX"],
                f"ASYNCHRORMOUS['CACHE_PREFIX'] must be a non-empty string without "
                f"spaces (memcached refuses keys with them), not {prefix!r}.",
            )
        )
    return errors


_cached: Settings | None = None


def get_settings() -> Settings:
    """The validated settings; raises ImproperlyConfigured naming the bad key."""
    global _cached
    if _cached is None:
        errors = setting_errors()
        if errors:
            raise ImproperlyConfigured(errors[0][1])
        merged = {**DEFAULTS, **getattr(settings, "ASYNCHRORMOUS", {})}
        _cached = Settings(
            workers=merged["WORKERS"],
            timeout=merged["TIMEOUT"],
            connection_max_age=merged["CONNECTION_MAX_AGE"],
            connection_idle_timeout=merged["CONNECTION_IDLE_TIMEOUT"],
            caller_runs=merged["CALLER_RUNS"],
            cache=merged["CACHE"],
            cache_timeout=merged["CACHE_TIMEOUT"],
            cache_prefix=merged["CACHE_PREFIX"],
        )
    return _cached


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    global _cached
    if setting == "ASYNCHRORMOUS":
        _cached = None
