"""Settings for the example's tests: a file test database, so that workers overlap.

Django's default in-memory SQLite test database runs one connection at a time (see
asynchrormous's README), which would hide exactly what the demo shows. With
``DATABASE_URL`` set, the tests run on that server instead, in their own database.
"""

import os
from pathlib import Path

from .settings import *  # noqa: F403
from .settings import BASE_DIR, DATABASES

#: Screenshots and the SQLite test database; gitignored, as for the library's tests.
OUTPUT_DIR = (
    Path(os.environ.get("ASYNCHRORMOUS_TEST_OUTPUT", BASE_DIR.parent / "test-output"))
    / "example_project"
)
OUTPUT_DIR.mkdir(parents=True, exist_ok=True)

# Parallel tox environments share the servers: each gets its own test database.
_SUFFIX = os.environ.get("TOX_ENV_NAME", "local").replace("-", "_").replace(".", "_")
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": str(OUTPUT_DIR / f"test_{_SUFFIX}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_bookshop_{_SUFFIX}"}

ASYNCHRORMOUS = {"WORKERS": 8, "TIMEOUT": 30.0}
