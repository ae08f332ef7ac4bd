"""Another process on the test's database and cache: ``python -m tests.cache_peer``.

Environment: the test's own (ASYNCHRORMOUS_TEST_DB, TOX_ENV_NAME), plus
CACHE_PEER_DB (the test database's NAME), CACHE_PEER_BACKEND and
CACHE_PEER_LOCATION (the test's cache server). Reads commands on stdin, one per
line, and answers one JSON line each:

    ping               -> {"pong": true}  (ready)
    read <pk>          -> {"value": <Gauge value, cached>, "outcome": "hit"|...}
    write <pk> <value> -> {"written": 1}
    slow <pk> <seconds> -> {"value": [<values>], "outcome": [...], "selects": <n>}
"""

import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.conf import settings

from tests.cache_helpers import cache_settings

BACKEND = os.environ["CACHE_PEER_BACKEND"]
settings.DATABASES["default"]["NAME"] = os.environ["CACHE_PEER_DB"]
settings.CACHES[BACKEND] = cache_settings(BACKEND, os.environ["CACHE_PEER_LOCATION"])
settings.ASYNCHRORMOUS = {"WORKERS": 2, "CACHE": BACKEND}

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

from tests.cache_helpers import recording, slow_values  # noqa: E402
from tests.testapp.models import Gauge  # noqa: E402


def counting(selects):
    def wrapper(execute, sql, params, many, context):
        if "testapp_gauge" in sql:  # not a new connection's own set-up
            selects.append(sql)
        return execute(sql, params, many, context)

    return wrapper


def main():
    outcomes = recording()
    for line in sys.stdin:
        command, *args = line.split()
        if command == "ping":
            answer = {"pong": True}
        elif command == "read":
            value = Gauge.objects.get(pk=int(args[0])).value
            answer = {"value": value, "outcome": outcomes.take()}
        elif command == "slow":
            selects = []
            with connection.execute_wrapper(counting(selects)):
                value = slow_values(int(args[0]), float(args[1]))
            answer = {
                "value": value,
                "outcome": outcomes.take(),
                "selects": len(selects),
            }
        elif command == "write":
            written = Gauge.fresh.filter(pk=int(args[0])).update(value=int(args[1]))
            answer = {"written": written}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
