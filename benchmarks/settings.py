"""Django settings of the benchmark's main process (and of its W4 child processes)."""

import os

from benchmarks.common import DB_HOST, DB_NAME, DB_PORT, DB_USER, WORKERS

SECRET_KEY = "benchmarks-only"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["asynchrormous", "benchmarks.benchapp"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": DB_NAME,
        "USER": DB_USER,
        "HOST": DB_HOST,
        "PORT": DB_PORT,
        # Django's default CONN_MAX_AGE = 0 closes connections only at the end of a
        # request; with no requests here, every thread keeps its connection.
        "OPTIONS": {"application_name": os.environ.get("BENCH_APP_NAME", "bench")},
    }
}
# W6 runs its child processes with fewer workers (BENCH_WORKERS), and with the
# caller running jobs no worker has picked up (BENCH_CALLER_RUNS, off by default).
ASYNCHRORMOUS = {
    "WORKERS": int(os.environ.get("BENCH_WORKERS", WORKERS)),
    "CALLER_RUNS": os.environ.get("BENCH_CALLER_RUNS") == "1",
}
