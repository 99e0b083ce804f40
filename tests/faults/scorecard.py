"""Render the fault tier's measured rows as the README's failover scorecard.

`make faults-scorecard` runs tests/faults with SIGNALBOX_FAULTS_SCORECARD set, then this:
`python -m tests.faults.scorecard <rows.json> README.md` replaces the table between the
scorecard markers. Rows of behaviour the gateway does not have yet are listed after the
measured ones, marked "not built", with why: a scorecard only of passes would hide them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- faults-scorecard:begin -->", "<!-- faults-scorecard:end -->"

# Rows of behaviour the gateway does not have yet: (case, expected, why). None today.
NOT_BUILT: list[tuple[str, str, str]] = []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    lines = ["| case | expected | measured | result |", "|---|---|---|---|"]
    for row in rows:
        result = "pass" if row.get("passed") else "FAIL"
        lines.append(f"| {_cell(row['case'])} | {_cell(row['expected'])} | {_cell(row['measured'])} | {result} |")
    for case, expected, why in NOT_BUILT:
        lines.append(f"| {_cell(case)} | {_cell(expected)} | {_cell(why)} | not built |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows_file, readme = Path(argv[0]), Path(argv[1])
    rows = json.loads(rows_file.read_text())
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(rows)}\n{END}{tail}")
    print(f"{readme}: {len(rows)} measured cases, {len(NOT_BUILT)} not built")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
