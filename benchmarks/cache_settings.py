"""Django settings of W7's processes, one per contender (``BENCH_W7_CONTENDER``).

Every contender that caches gets its own Redis database on 127.0.0.1:6379 (13 to 15;
the tests claim 1 to 12, see tests/cache_servers.py), which its process empties when
it starts. cachalot and cacheops patch Django globally, hence one process each.
"""

import os

from benchmarks.common import DB_HOST, DB_NAME, DB_PORT, DB_USER, W7_REDIS_DBS

CONTENDER = os.environ["BENCH_W7_CONTENDER"]
REDIS_URL = f"redis://127.0.0.1:6379/{W7_REDIS_DBS.get(CONTENDER, 0)}"
TIMEOUT = 300

SECRET_KEY = "benchmarks-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": DB_NAME,
        "USER": DB_USER,
        "HOST": DB_HOST,
        "PORT": DB_PORT,
        "OPTIONS": {"application_name": f"bench-w7-{CONTENDER}"},
    }
}
# Django's own Redis backend for asynchrormous and cachalot (cacheops has its own
# client, redis-py as well).
REDIS_CACHE = {
    "BACKEND": "django.core.cache.backends.redis.RedisCache",
    "LOCATION": REDIS_URL,
    # What asynchrormous's check W004 asks for (README, Caching).
    "OPTIONS": {"socket_timeout": 0.25, "socket_connect_timeout": 0.25},
}

if CONTENDER in ("asynchrormous", "asynchrormous-locmem"):
    INSTALLED_APPS = ["asynchrormous", "benchmarks.benchapp"]
    # The LocMemCache variant (this process only: no invalidation across processes)
    # shows what the library costs without the round trips to Redis.
    LOCMEM_CACHE = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    CACHES = {"default": LOCMEM_CACHE if CONTENDER.endswith("-locmem") else REDIS_CACHE}
    ASYNCHRORMOUS = {
        "WORKERS": 2,
        "CACHE": "default",
        "CACHE_TIMEOUT": TIMEOUT,
        "CACHE_PREFIX": "asynchrormous",
    }
elif CONTENDER == "cachalot":
    INSTALLED_APPS = ["cachalot", "benchmarks.cacheapp"]
    CACHES = {"default": REDIS_CACHE}
    CACHALOT_TIMEOUT = TIMEOUT
    CACHALOT_ONLY_CACHABLE_TABLES = ("benchapp_item",)
elif CONTENDER == "cacheops":
    INSTALLED_APPS = ["cacheops", "benchmarks.cacheapp"]
    CACHEOPS_REDIS = REDIS_URL
    # No op is cached by default: the benchmark asks with .cache(), as it does
    # asynchrormous.
    CACHEOPS = {"cacheapp.item": {"ops": (), "timeout": TIMEOUT}}
elif CONTENDER == "plain":
    INSTALLED_APPS = ["benchmarks.cacheapp"]
else:
    raise RuntimeError(f"BENCH_W7_CONTENDER {CONTENDER!r} is not a W7 contender")
