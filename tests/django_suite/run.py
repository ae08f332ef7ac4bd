#!/usr/bin/env python
"""Run Django's own ORM tests with every QuerySet an asynchrormous one.

DESIGN.md, "Compatibility with Django itself": with every queryset an AsyncQuerySet
(``async``) Django's suite must pass exactly what unpatched Django (``plain``)
passes; with every queryset also in background mode (``background``) the pass
rate is tracked, not enforced. Examples::

    python tests/django_suite/run.py --db sqlite postgres          # plain vs async
    python tests/django_suite/run.py --db sqlite --mode background

The Django source distribution matching the installed Django is downloaded once
into ``.django-suite/`` at the repository root, where logs and reports go too.
Exit status: 0 when async matches plain, 1 when it does not, 2 when a run crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".django-suite"

# The ORM apps of Django's tests/ directory: ~6,000 tests, about a minute per run
# on 2 cores, for sqlite and postgres alike.
APPS = """
    aggregation aggregation_regress annotations async backends basic bulk_create
    composite_pk constraints contenttypes_tests custom_columns custom_lookups
    custom_managers custom_methods custom_pk datatypes dates datetimes db_functions
    defer defer_regress delete delete_regress distinct_on_fields expressions
    expressions_case expressions_window extra_regress field_defaults filtered_relation
    fixtures fixtures_regress force_insert_update foreign_object from_db_value
    generic_relations generic_relations_regress get_earliest_or_latest
    get_object_or_404 get_or_create indexes known_related_objects lookup
    m2m_and_m2o m2m_intermediary m2m_multiple m2m_recursive m2m_regress m2m_signals
    m2m_through m2m_through_regress m2o_recursive managers_regress many_to_many
    many_to_one many_to_one_null model_fields model_forms model_formsets
    model_formsets_regress model_inheritance model_inheritance_regress model_regress
    multiple_database mutually_referential nested_foreign_keys null_fk
    null_fk_ordering null_queries one_to_one or_lookups order_with_respect_to
    ordering pagination postgres_tests prefetch_related proxy_model_inheritance
    proxy_models queries queryset_pickle raw_query reserved_names reverse_lookup
    save_delete_hooks select_for_update select_related select_related_onetoone
    select_related_regress serializers signals string_lookup timezones
    transaction_hooks transactions unmanaged_models update update_only_fields
    xor_lookups
""".split()

# Timing-based tests that fail under load whatever the mode; never compared.
FLAKY = {
    "serializers.test_deserialization.TestDeserializer.test_crafted_xml_performance",
}

BAD = ("error", "failure", "unexpected_success")


@dataclass
class Run:
    mode: str
    db: str
    seconds: float
    records: dict[str, dict[str, str]]

    def counts(self) -> Counter[str]:
        return Counter(record["outcome"] for record in self.records.values())

    def summary(self) -> str:
        n = self.counts()
        return (
            f"{self.mode:>10} {self.db:<8} {len(self.records):5} tests "
            f"{n['success']:5} passed {n['failure']:4} failures {n['error']:4} "
            f"errors {n['skip']:4} skipped {n['expected_failure']} expected "
            f"failures  {self.seconds:6.1f} s"
        )


def django_tests_dir() -> Path:
    """Django's tests/ for the installed version, downloaded and extracted once."""
    version = importlib.metadata.version("Django")
    source = CACHE / f"django-{version}"
    if not (source / "tests" / "runtests.py").exists():
        CACHE.mkdir(exist_ok=True)
        # Download and extract aside, then rename: concurrent runs never see a
        # half-extracted tree.
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:"]
            subprocess.run(
                [*pip, "--no-deps", f"Django=={version}", "-d", tmp], check=True
            )
            (archive,) = Path(tmp).glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python before 3.10.12 / 3.11.4 has no extraction filters
                    tar.extractall(tmp)
            with contextlib.suppress(OSError):  # another run got there first
                (Path(tmp) / source.name).rename(source)
    return source / "tests"


def output(kind: str, db: str, args: argparse.Namespace, ext: str) -> Path:
    """Where a run's files go; a --suffix keeps concurrent runs' files apart."""
    suffix = "" if args.suffix == "local" else f"-{args.suffix}"
    return CACHE / f"{kind}-{db}{suffix}.{ext}"


def run_suite(mode: str, db: str, args: argparse.Namespace) -> Run:
    """One runtests.py run; outcomes come back as JSON written by runner.py."""
    results = output(mode, db, args, "json")
    log = output(mode, db, args, "log")
    results.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        "DJANGO_SUITE_DB": db,
        "DJANGO_SUITE_MODE": mode,
        "DJANGO_SUITE_SUFFIX": args.suffix,
        "DJANGO_SUITE_RESULTS": str(results),
    }
    command = [
        sys.executable,
        "runtests.py",
        "--settings=tests.django_suite.settings",
        f"--parallel={args.parallel}",
        "--noinput",
        # Elsewhere every postgres_tests test is skipped, after its migrations.
        *(app for app in args.apps if db == "postgres" or app != "postgres_tests"),
    ]
    print(f"running {mode} on {db}, log in {log.relative_to(ROOT)}", flush=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        # A session of its own, so a timeout also kills the test processes.
        process = subprocess.Popen(
            command,
            cwd=args.tests_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            print(f"  killed after {args.timeout} s", file=out)
    seconds = time.monotonic() - started
    if not results.exists():
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        print(f"{mode} on {db} crashed; end of {log}:\n{tail}", file=sys.stderr)
        raise SystemExit(2)
    records = json.loads(results.read_text(encoding="utf-8"))
    run = Run(mode, db, seconds, records)
    print(run.summary(), flush=True)
    return run


def outcome(run: Run, test_id: str) -> str:
    return run.records.get(test_id, {}).get("outcome", "not run")


def compare(plain: Run, async_: Run) -> int:
    """Print how async differs from plain; the number of differences that fail."""
    ids = sorted((set(plain.records) | set(async_.records)) - FLAKY)
    worse = []
    for test_id in ids:
        before, after = outcome(plain, test_id), outcome(async_, test_id)
        if before == after:
            continue
        fails = after in BAD or "skip" in (before, after) or after == "not run"
        if fails:
            worse.append(test_id)
        record = async_.records.get(test_id, {})
        detail = f"{record.get('type', '')}: {record.get('message', '')}"
        print(
            f"  {'REGRESSION' if fails else 'differs'} {test_id}: {before} -> "
            f"{after} {detail if after in BAD else ''}"
        )
    if worse:
        print(f"async on {plain.db}: {len(worse)} test(s) differ from plain Django")
    else:
        print(f"async on {plain.db}: same outcomes as plain Django")
    return len(worse)


# Known causes, matched in order against "<exception type>: <first line>". A
# failure matching none is grouped by that line with its specifics blanked out.
CAUSES = [
    (
        "bug: a keyword argument collides with the library's own parameters (name=)",
        r"got multiple values for argument",
    ),
    ("environment: psycopg_pool is not installed (plain fails too)", r"psycopg_pool"),
    ("bug: repr() of Model.objects.raw() says AsyncRawQuerySet", r"AsyncRawQuerySet"),
    ("lazy: __bool__ returned a lazy bool", r"should return bool"),
    (
        "slicing starts the fetch: a subquery with OuterRef cannot run on its own",
        r"reference to an outer query",
    ),
    (
        "lazy: repr() or a message shows <LazyObjectResult: ...>, not the model",
        r"^AssertionError: '<(LazyObjectResult|SimpleLazyObject)"
        r"|(LazyObjectResult|SimpleLazyObject).*' not found in '|not found in .*"
        r"(LazyObjectResult|SimpleLazyObject)",
    ),
    (
        "lazy: the exception comes where the result is used, after assertRaises",
        r"^AssertionError: .*not raised$",
    ),
    (
        "lazy: a get() inside try/except DoesNotExist (Django's or the test's) "
        "raises later",
        r"^(DoesNotExist|MultipleObjectsReturned|ObjectDoesNotExist|"
        r"DeserializationError|Http404): ",
    ),
    (
        "lazy: identity or type() check on a proxy (assertIs, assertIsNone, ==)",
        r"(LazyObjectResult|__proxy__|SimpleLazyObject)|^AssertionError: "
        r"(True|False|None) is not (True|False|None)$|is not an instance of",
    ),
    ("query count on the caller's connection differs", r"queries executed"),
]


def cause_of(record: dict[str, str]) -> str:
    line = f"{record.get('type', '?')}: {record.get('message', '')}"
    for label, pattern in CAUSES:
        if re.search(pattern, line):
            return label
    generic = re.sub(r"0x[0-9a-f]+|\d+", "N", line)
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", generic)[:110]


def background_report(run: Run, path: Path) -> None:
    """Write .django-suite/background-<db>.txt: failing tests grouped by cause."""
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for test_id, record in sorted(run.records.items()):
        if record["outcome"] in BAD and test_id not in FLAKY:
            groups[cause_of(record)].append(test_id)
    failing = sum(map(len, groups.values()))
    ran = len(run.records) - run.counts()["skip"]
    rate = 100 * (ran - failing) / ran if ran else 0.0
    lines = [f"{run.summary()}", f"pass rate {rate:.1f}% of {ran} tests run", ""]
    for cause, test_ids in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        lines.append(f"{len(test_ids):4}  {cause}")
        for test_id in test_ids:
            record = run.records[test_id]
            message = f"{record.get('type', '')}: {record.get('message', '')}"
            lines.append(f"        {test_id}  {message}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    print(
        f"background on {run.db}: pass rate {rate:.1f}% ({failing} failing of "
        f"{ran} run); top causes:"
    )
    for cause, test_ids in sorted(groups.items(), key=lambda g: -len(g[1]))[:8]:
        print(f"  {len(test_ids):4}  {cause}")
    print(f"report in {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument(
        "--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite"]
    )
    parser.add_argument(
        "--mode",
        nargs="+",
        default=["plain", "async"],
        choices=["plain", "async", "background"],
        help="runs in order; plain and async together are compared (default)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=os.cpu_count() or 1,
        help="test processes (default: one per core)",
    )
    parser.add_argument(
        "--apps",
        nargs="+",
        default=APPS,
        help="Django test labels (default: the ORM apps)",
    )
    parser.add_argument(
        "--suffix",
        default=re.sub(r"\W", "_", os.environ.get("TOX_ENV_NAME", "local")),
        help="added to test database names, to keep concurrent runs apart",
    )
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds before a run is killed"
    )
    args = parser.parse_args(argv)
    args.tests_dir = django_tests_dir()

    failed = 0
    for db in args.db:
        runs = {mode: run_suite(mode, db, args) for mode in args.mode}
        if "plain" in runs and "async" in runs:
            failed += compare(runs["plain"], runs["async"])
        if "background" in runs:
            background_report(runs["background"], output("background", db, args, "txt"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
