"""Which tables a statement reads or writes, from its SQL text.

Reads and writes are matched by name against the tables Django knows (every
model's ``db_table``, through tables included), so raw SQL, subqueries and joins
all count. A name that merely appears in the text (a column, a comment) counts
too: it can only cost a cache entry, never leave one stale.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from django.apps import apps
from django.db.models.signals import class_prepared

__all__ = ["ALL", "normalized", "tables_in", "written_tables"]

#: Stands for every table of the database: a statement whose writes cannot be
#: told apart (DDL, TRUNCATE ... CASCADE, a procedure call, several statements).
ALL = "*"

# A statement starting with one of these writes no table's rows. SELECT counts
# even though a function it calls might write: that cannot be seen from SQL.
_READS = frozenset(
    "SELECT SHOW DESCRIBE DESC SET SAVEPOINT RELEASE ROLLBACK COMMIT BEGIN START "
    "END PRAGMA VALUES".split()
)
# These write the rows of the tables they name (COPY ... TO reads: harmless).
_WRITES = frozenset("INSERT UPDATE DELETE REPLACE MERGE COPY LOAD WITH".split())
_HEAD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
_WRITE_WORD = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|REPLACE)\b", re.IGNORECASE)
# A table a statement names: FROM t, JOIN t, INSERT INTO t, UPDATE t, COPY t, ...
_NAME = r"[\"`\[]?[\w$]+[\"`\]]?"
_NAMED = re.compile(
    rf"\b(?:FROM|JOIN|INTO|UPDATE|COPY|TABLE)\s+((?:{_NAME}\.)*{_NAME})",
    re.IGNORECASE,
)


def normalized(name: str) -> str:
    """A table name as both sides compare it: unquoted, unqualified, lower case."""
    name = name.replace("`", '"').replace("[", '"').replace("]", '"')
    return name.rsplit('".', 1)[-1].rsplit(".", 1)[-1].strip('" ').lower()


@functools.lru_cache(maxsize=1)
def _known_tables() -> re.Pattern[str] | None:
    """One pattern matching every table name Django knows, as a whole word."""
    names = {
        normalized(model._meta.db_table)
        for model in apps.get_models(include_auto_created=True)
    }
    if not names:
        return None
    alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    return re.compile(rf"(?<![\w$])(?:{alternatives})(?![\w$])", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def tables_in(sql: str) -> frozenset[str]:
    """The tables ``sql`` names: every model's table it mentions anywhere (raw SQL
    included), and any other table it names after FROM, JOIN, INTO, UPDATE, ..."""
    known = _known_tables()
    found = {normalized(name) for name in _NAMED.findall(sql)}
    if known is not None:
        found.update(match.lower() for match in known.findall(sql))
    return frozenset(found)


def _models_changed(**kwargs: Any) -> None:
    _known_tables.cache_clear()
    tables_in.cache_clear()


class_prepared.connect(_models_changed)


@functools.lru_cache(maxsize=4096)
def written_tables(sql: str) -> frozenset[str] | None:
    """The tables whose rows ``sql`` may change: None for none, ``{ALL}`` for any."""
    head = _HEAD.match(sql)
    word = head.group(1).upper() if head else ""
    # Several statements in one call: each may be anything.
    several = ";" in sql.strip().rstrip(";")
    if word in _READS and not several:
        return None
    if word == "EXPLAIN":
        # EXPLAIN ANALYZE runs the statement it explains.
        return frozenset({ALL}) if _WRITE_WORD.search(sql) else None
    if word not in _WRITES or several:
        return frozenset({ALL})
    if word == "WITH" and not _WRITE_WORD.search(sql):
        return None
    return tables_in(sql)
