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

__all__ = [
    "ALL",
    "changes_the_session",
    "normalized",
    "tables_in",
    "volatile",
    "without_leading_comments",
    "written_tables",
]

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
_QUALIFIED = rf"(?:{_NAME}\.)*{_NAME}"
_NAMED = re.compile(
    rf"\b(?:FROM|JOIN|INTO|UPDATE|COPY|TABLE)\s+(?:ONLY\s+)?({_QUALIFIED})",
    re.IGNORECASE,
)
# The tables of a FROM list after its first: FROM a, b AS x, c
_FROM_LIST = re.compile(
    rf"\bFROM\s+{_QUALIFIED}(?:\s+(?:AS\s+)?\w+)?((?:\s*,\s*{_QUALIFIED}"
    rf"(?:\s+(?:AS\s+)?(?!WHERE\b|GROUP\b|ORDER\b|LIMIT\b)\w+)?)+)",
    re.IGNORECASE,
)
_LISTED = re.compile(rf",\s*({_QUALIFIED})")
# Words between a write's verb and its table: UPDATE ONLY t, INSERT IGNORE INTO t,
# UPDATE OR REPLACE t, DELETE LOW_PRIORITY QUICK FROM t, ...
_MODIFIERS = (
    r"(?:(?:ONLY|LOW_PRIORITY|HIGH_PRIORITY|DELAYED|QUICK|IGNORE"
    r"|OR\s+(?:REPLACE|ROLLBACK|ABORT|FAIL|IGNORE))\s+)*"
)
# The one table a write writes, as Django and most raw SQL spell it; a write whose
# target is not found this way may write any table.
_TARGET = {
    "INSERT": re.compile(
        rf"INSERT\s+{_MODIFIERS}(?:INTO\s+)?({_QUALIFIED})", re.IGNORECASE
    ),
    "REPLACE": re.compile(
        rf"REPLACE\s+{_MODIFIERS}(?:INTO\s+)?({_QUALIFIED})", re.IGNORECASE
    ),
    "UPDATE": re.compile(
        rf"UPDATE\s+{_MODIFIERS}({_QUALIFIED})(?:\s+(?:AS\s+)?\w+)?\s+SET\b",
        re.IGNORECASE,
    ),
    "DELETE": re.compile(
        rf"DELETE\s+{_MODIFIERS}(?:({_QUALIFIED})\s+)?FROM\s+(?:ONLY\s+)?"
        rf"({_QUALIFIED})(?:\s+(?:AS\s+)?\w+)?\s*(?:WHERE\b|$|;)",
        re.IGNORECASE,
    ),
    "MERGE": re.compile(rf"MERGE\s+INTO\s+({_QUALIFIED})", re.IGNORECASE),
    "COPY": re.compile(rf"COPY\s+({_QUALIFIED})", re.IGNORECASE),
}
# Statements that change what the session's later statements read: another
# schema or database, another role, another isolation level. Django's own
# connection set-up is left out.
_SESSION = re.compile(
    r"\s*(?:USE\b|SET\b(?!\s+(?:SESSION\s+)?(?:SQL_AUTO_IS_NULL|NAMES|TIME\s*ZONE"
    r"|CONSTRAINTS|SESSION\s+TRANSACTION\s+ISOLATION\s+LEVEL\s+READ\s+COMMITTED)\b))",
    re.IGNORECASE,
)
# Functions whose value changes from one run to the next.
_VOLATILE = re.compile(
    r"\b(?:RANDOM|RAND|NOW|SYSDATE|UUID|GEN_RANDOM_UUID|NEXTVAL|CLOCK_TIMESTAMP"
    r"|STATEMENT_TIMESTAMP|TRANSACTION_TIMESTAMP|UNIX_TIMESTAMP|UTC_TIMESTAMP"
    r"|UTC_DATE|UTC_TIME|CURRENT_TIMESTAMP|CURRENT_DATE|CURRENT_TIME|LOCALTIMESTAMP"
    r"|LOCALTIME|CURDATE|CURTIME|JULIANDAY)\b",
    re.IGNORECASE,
)


# Whitespace and comments before a statement's first word: ``-- note``, MySQL's
# ``# note``, ``/* note */`` (a hint such as ``/*+ ... */`` included).
_LEADING_COMMENTS = re.compile(
    r"(?:\s+|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S
)


def without_leading_comments(sql: str) -> str:
    """``sql`` from its first word: a comment before it does not hide a BEGIN."""
    return sql[_LEADING_COMMENTS.match(sql).end() :]  # type: ignore[union-attr]


@functools.lru_cache(maxsize=4096)
def changes_the_session(sql: str) -> bool:
    """Whether ``sql`` makes the session read differently (``SET search_path``,
    ``USE other``, ``SET ROLE``): its later reads are the session's own."""
    return _SESSION.match(without_leading_comments(sql)) is not None


@functools.lru_cache(maxsize=4096)
def volatile(sql: str) -> bool:
    """Whether ``sql`` calls a function whose value changes between runs."""
    return _VOLATILE.search(sql) is not None


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
    for listed in _FROM_LIST.findall(sql):
        found.update(normalized(name) for name in _LISTED.findall(listed))
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
    if word == "WITH":
        # A data-modifying CTE may write any of the tables it names.
        return frozenset({ALL}) if _WRITE_WORD.search(sql) else None
    target = _TARGET[word].match(sql.lstrip()) if word in _TARGET else None
    if target is None:
        return frozenset({ALL})  # LOAD DATA, or a form not recognised
    return tables_in(sql) | {normalized(name) for name in target.groups() if name}
