"""Write the reliability figures (test-output/reliability/*.json) into README.md.

The section between the two markers below is replaced; run by ``make reliability``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- reliability:start -->"
END = "<!-- reliability:end -->"


def render(reports: list[dict]) -> str:
    lines = [START, ""]
    for report in reports:
        lines.append(
            f"**{report['database']}** ({report['scale']} run, {report['when']}; "
            f"Python {report['python']}, Django {report['django']}, "
            f"{report['machine']}; {'passed' if report['passed'] else 'FAILED'})"
        )
        lines.append("")
        lines.append("| scenario | figures |")
        lines.append("|---|---|")
        for name, found in sorted(report["scenarios"].items()):
            shown = ", ".join(f"{k}: {v}" for k, v in sorted(found.items()))
            lines.append(f"| `{name}` | {shown} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    out = ROOT / "test-output" / "reliability"
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*-full.json"))]
    if not reports:
        print(f"no full-run figures in {out}; run make reliability", file=sys.stderr)
        return 1
    readme = ROOT / "README.md"
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, found, after = rest.partition(END)
    if not found:
        print(f"README.md has no {START} ... {END} section", file=sys.stderr)
        return 1
    readme.write_text(before + render(reports) + after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
