import itertools
import threading
import time

from django.apps import AppConfig
from django.db.backends.signals import connection_created

#: Which thread opened each server-side session: backend id -> thread name.
BACKEND_THREADS: dict[int, str] = {}
_sqlite_sessions = itertools.count(1)

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
        backend_id = next(_sqlite_sessions)
        connection.connection.create_function("backend_id", 0, lambda: backend_id)
    else:
        with connection.connection.cursor() as cursor:
            cursor.execute("SELECT " + BACKEND_ID_SQL[connection.vendor])
            backend_id = cursor.fetchone()[0]
    BACKEND_THREADS[backend_id] = threading.current_thread().name
    connection.test_backend_id = backend_id


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        connection_created.connect(_record_backend)
