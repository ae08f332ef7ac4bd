"""Write the reliability figures (test-output/reliability/*.json) into README.md.

The section between the two markers below is replaced; run by ``make reliability``.
``--scale short`` renders the short runs instead (what ``make test`` leaves), and
``--print`` shows the section without touching README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- reliability:start -->"
END = "<!-- reliability:end -->"
# The databases in the order the README shows them.
ORDER = ("postgres", "postgres-pool", "mariadb", "sqlite", "sqlite-memory")


def number(value: Any) -> str:
    """A figure as text: thousands separated, floats as they were rounded."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,}"
    if isinstance(value, dict):
        return (
            ", ".join(f"{k.replace('_', ' ')} {number(v)}" for k, v in value.items())
            or "none"
        )
    if isinstance(value, (list, tuple)):
        return "; ".join(number(v) for v in value)
    return str(value)


# A figure's unit, from the end of its name: duration_s -> "duration: 8.6 s".
UNITS = {"_s": "s", "_ms": "ms", "_us": "µs", "_mb": "MiB", "_kb": "KiB"}


def figure(key: str, value: Any) -> str:
    for suffix, unit in UNITS.items():
        if key.endswith(suffix) and isinstance(value, (int, float)):
            return f"{key[: -len(suffix)].replace('_', ' ')}: {number(value)} {unit}"
    return f"{key.replace('_', ' ')}: {number(value)}"


def figures_cell(found: dict[str, Any]) -> str:
    shown = [figure(key, value) for key, value in found.items() if key != "errors"]
    return "<br>".join(shown) or "—"


def errors_cell(found: dict[str, Any] | None) -> str:
    if not found or "errors" not in found:
        return "—"
    errors = found["errors"]
    if not errors:
        return "none"
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(errors.items()))


def scenario_name(report: dict[str, Any], test: str) -> str:
    module = report.get("modules", {}).get(test)
    if module is None:
        return "—"
    title = report.get("titles", {}).get(module, module)
    short = title.split(":")[0] if ":" in title else title
    return f"{short} (`{module}.py`)"


def render_report(report: dict[str, Any]) -> list[str]:
    load = report.get("load_average") or {}
    loads = " → ".join(
        f"{values[0]:.2f}" for values in (load.get("start"), load.get("end")) if values
    )
    server = report.get("server", report["vendor"])
    result = "passed" if report["passed"] else "**FAILED**"
    lines = [
        f"**{server}** (`{report['database']}`), {report['scale']} run, "
        f"{report['when']}: {result}. Python {report['python']}, Django "
        f"{report['django']}, asynchrormous {report['asynchrormous']}; "
        f"{report['machine']}"
        + (f"; load average {loads} (1 min, start → end)" if loads else "")
        + ".",
        "",
        "| scenario | test | result | figures | errors |",
        "|---|---|---|---|---|",
    ]
    outcomes: dict[str, str] = report.get("outcomes", {})
    scenarios: dict[str, dict[str, Any]] = report["scenarios"]
    tests = sorted(
        set(outcomes) | set(scenarios),
        key=lambda t: (report.get("modules", {}).get(t, "~"), t),
    )
    for test in tests:
        found = scenarios.get(test)
        outcome = outcomes.get(test, "passed" if report["passed"] else "?")
        if outcome == "skipped" and found is None:
            continue  # not for this database
        lines.append(
            f"| {scenario_name(report, test)} | `{test}` | {outcome} | "
            f"{figures_cell(found or {})} | {errors_cell(found)} |"
        )
    lines.append("")
    return lines


def render(reports: list[dict[str, Any]]) -> str:
    lines = [START, ""]
    for report in sorted(
        reports,
        key=lambda r: ORDER.index(r["database"]) if r["database"] in ORDER else 99,
    ):
        lines.extend(render_report(report))
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "short"), default="full")
    parser.add_argument("--print", action="store_true", dest="print_only")
    args = parser.parse_args(argv)
    out = ROOT / "test-output" / "reliability"
    reports = [
        json.loads(p.read_text()) for p in sorted(out.glob(f"*-{args.scale}.json"))
    ]
    if not reports:
        print(
            f"no {args.scale}-run figures in {out}; run make reliability",
            file=sys.stderr,
        )
        return 1
    section = render(reports)
    if args.print_only:
        print(section)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, found, after = rest.partition(END)
    if not found:
        print(f"README.md has no {START} ... {END} section", file=sys.stderr)
        return 1
    readme.write_text(before + section + after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
