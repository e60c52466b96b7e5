"""The coverage record: which catalogue scenario (`bdd/SCENARIOS.md`) each row of
`bdd/COVERAGE.md` answers, and whether the feature scenarios it names exist.

`python -m bdd.coverage` prints the count per area; `bdd/test_coverage.py` fails
when the record and the catalogue or the feature files disagree.

The record has one row per catalogue scenario, in catalogue order:

    | 010 #3 | EH-001b - SSH authentication failure | `ssh_registry.feature`: EH-001b - SSH … | mirrored: … |

The third cell names the feature scenarios that mirror it (several joined by `<br>`),
or `—`. The fourth starts with one of the statuses in `STATUSES`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

BDD = Path(__file__).resolve().parent
CATALOGUE = BDD / "SCENARIOS.md"
RECORD = BDD / "COVERAGE.md"
FEATURES = BDD / "features"

STATUSES = ("mirrored", "not applicable", "needs a GPU", "needs a Mac", "not mirrored")
"""`mirrored` names at least one feature scenario; `not applicable` names the DESIGN
section that rules the scenario out; `not mirrored` says why (nothing of ours does it yet)."""


@dataclass(frozen=True)
class Scenario:
    area: str
    number: int
    title: str


@dataclass(frozen=True)
class Row:
    area: str
    number: int
    title: str
    refs: tuple[tuple[str, str], ...]
    """(feature file, scenario name) pairs."""
    status: str
    line: int

    @property
    def mirrored(self) -> bool:
        return self.status.startswith("mirrored")


_AREA = re.compile(r"^#### (?:(\d{3})-|`bin/[^`]*/([a-z_]+)\.feature`|`bin/10_queen_rbee/)")
_SUBAREA = re.compile(r"^- \*\*([a-z_]+)\.feature: ")
_ITEM = re.compile(r"^\s*(\d+)\. \*\*(.+?)\*\*")
_ROW = re.compile(r"^\| (\S+) #(\d+) \| (.+?) \| (.+?) \| (.+) \|$")
_REF = re.compile(r"^`([a-z_]+\.feature)`: (.+)$")
_FEATURE_SCENARIO = re.compile(r"^\s*Scenario(?: Outline)?: (.+?)\s*$")
_BOUND = re.compile(r"""scenarios\(([^)]*)\)""", re.S)


def area_key(name: str) -> str:
    """The placeholder feature of the daemon-lifecycle crate is that area's file."""
    return {"placeholder": "daemon_lifecycle", "device_detection_endpoint": "device_detection"}.get(name, name)


def read_catalogue(path: Path = CATALOGUE) -> list[Scenario]:
    scenarios: list[Scenario] = []
    area = ""
    for line in path.read_text().splitlines():
        if match := _AREA.match(line):
            area = area_key(match.group(1) or match.group(2) or "")
            continue
        if match := _SUBAREA.match(line):
            area = match.group(1)
            continue
        if area and (match := _ITEM.match(line)):
            title = match.group(2).strip().rstrip(".")
            scenarios.append(Scenario(area, int(match.group(1)), title))
    return scenarios


def read_record(path: Path = RECORD) -> list[Row]:
    rows: list[Row] = []
    for index, line in enumerate(path.read_text().splitlines(), start=1):
        if not (match := _ROW.match(line)):
            continue
        area, number, title, refs_cell, status = match.groups()
        refs: list[tuple[str, str]] = []
        if refs_cell.strip() != "—":
            for ref in refs_cell.split("<br>"):
                ref_match = _REF.match(ref.strip())
                refs.append((ref_match.group(1), ref_match.group(2)) if ref_match else ("", ref.strip()))
        rows.append(Row(area, int(number), title, tuple(refs), status, index))
    return rows


def feature_scenarios(folder: Path = FEATURES) -> dict[str, set[str]]:
    return {
        path.name: {m.group(1) for line in path.read_text().splitlines() if (m := _FEATURE_SCENARIO.match(line))}
        for path in sorted(folder.glob("*.feature"))
    }


def bound_features(folder: Path = BDD) -> set[str]:
    """Feature files that a test module hands to pytest-bdd's `scenarios()`."""
    bound: set[str] = set()
    for module in folder.glob("test_*.py"):
        for call in _BOUND.findall(module.read_text()):
            bound.update(re.findall(r'"([a-z_]+\.feature)"', call))
    return bound


def problems(catalogue: list[Scenario], rows: list[Row], features: dict[str, set[str]],
             bound: set[str]) -> list[str]:
    """Everything that makes the record untrue; empty when it is sound."""
    found: list[str] = []
    expected = [(s.area, s.number, s.title) for s in catalogue]
    listed = [(r.area, r.number, r.title) for r in rows]
    for want, row in zip(expected, rows, strict=False):
        if (row.area, row.number, row.title) != want:
            found.append(f"COVERAGE.md line {row.line}: expected the row for {want[0]} #{want[1]} "
                         f"{want[2]!r}, found {row.area} #{row.number} {row.title!r}")
            break  # one misplaced row shifts every row after it
    missing = [w for w in expected if w not in listed]
    found += [f"catalogue scenario {a} #{n} {t!r} has no row in COVERAGE.md" for a, n, t in missing]
    if len(rows) != len(expected):
        found.append(f"COVERAGE.md has {len(rows)} rows for {len(expected)} catalogue scenarios")
    for row in rows:
        where = f"COVERAGE.md line {row.line} ({row.area} #{row.number})"
        status = next((s for s in STATUSES if row.status.startswith(s)), None)
        if status is None:
            found.append(f"{where}: the status must start with one of {', '.join(STATUSES)}")
        if "not yet" in row.status:
            found.append(f"{where}: says 'not yet'; the row must say what is true today")
        if status == "mirrored" and not row.refs:
            found.append(f"{where}: mirrored, but names no feature scenario")
        if status not in (None, "mirrored") and row.refs:
            found.append(f"{where}: {status}, yet names feature scenarios")
        if status == "not applicable" and "DESIGN §" not in row.status:
            found.append(f"{where}: not applicable, but names no DESIGN section")
        for feature, name in row.refs:
            if feature not in features:
                found.append(f"{where}: no feature file {feature or name!r}")
            elif name not in features[feature]:
                found.append(f"{where}: {feature} has no scenario {name!r}")
            elif feature not in bound:
                found.append(f"{where}: no test module runs {feature}")
    return found


def summary(catalogue: list[Scenario], rows: list[Row]) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(mirrored, total, per area (area, mirrored, total)) in catalogue order."""
    areas: dict[str, list[int]] = {}
    for scenario in catalogue:
        areas.setdefault(scenario.area, [0, 0])[1] += 1
    for row in rows:
        if row.mirrored and row.area in areas:
            areas[row.area][0] += 1
    mirrored = sum(m for m, _ in areas.values())
    return mirrored, len(catalogue), [(a, m, t) for a, (m, t) in areas.items()]


def main() -> int:
    catalogue, rows = read_catalogue(), read_record()
    found = problems(catalogue, rows, feature_scenarios(), bound_features())
    for problem in found:
        print(problem, file=sys.stderr)
    mirrored, total, areas = summary(catalogue, rows)
    for area, m, t in areas:
        print(f"{area:28} {m:3} of {t:3}")
    print(f"{mirrored} of {total} catalogue scenarios mirrored ({100 * mirrored / total:.1f}%)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
