"""Django settings of contender D's process: django-async-backend with its pool."""

from benchmarks.common import DB_HOST, DB_NAME, DB_PORT, DB_USER, WORKERS

SECRET_KEY = "benchmarks-only"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_async_backend", "benchmarks.dapp"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_BACKEND_DISABLE_POOL_WARNING = True
DATABASES = {
    "default": {
        "ENGINE": "django_async_backend.db.backends.postgresql",
        "NAME": DB_NAME,
        "USER": DB_USER,
        "HOST": DB_HOST,
        "PORT": DB_PORT,
        "OPTIONS": {
            "application_name": "bench-d",
            # As many pooled connections as asynchrormous has workers.
            "pool": {"min_size": WORKERS, "max_size": WORKERS},
        },
    }
}
