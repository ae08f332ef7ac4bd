import threading
import time

from django.apps import AppConfig
from django.db.backends.signals import connection_created

#: Which thread opened each server-side session: backend id -> thread name.
BACKEND_THREADS: dict[int, str] = {}

# What each vendor calls "the session running this statement".
BACKEND_ID_SQL = {
    "postgresql": "pg_backend_pid()",
    "mysql": "CONNECTION_ID()",
    "sqlite": "backend_id()",
}
SLEEP_SQL = {
    "postgresql": "pg_sleep(%s) IS NULL",
    "mysql": "SLEEP(%s)",
    "sqlite": "sleep(%s)",
}


def _sqlite_sleep(seconds):
    # The SQLite engine's own time: sqlite3 releases the GIL while a statement runs.
    time.sleep(seconds)
    return 0


def _record_backend(sender, connection, **kwargs):
    if connection.vendor == "sqlite":
        connection.connection.create_function("sleep", 1, _sqlite_sleep)
        connection.connection.create_function("backend_id", 0, threading.get_ident)
        backend_id = threading.get_ident()
    else:
        with connection.connection.cursor() as cursor:
            cursor.execute("SELECT " + BACKEND_ID_SQL[connection.vendor])
            backend_id = cursor.fetchone()[0]
    BACKEND_THREADS[backend_id] = threading.current_thread().name


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        connection_created.connect(_record_backend)
