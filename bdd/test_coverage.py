"""The coverage record (`bdd/COVERAGE.md`) against the catalogue and the feature files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdd import coverage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "SCENARIOS.md"


def test_the_catalogue_copy_is_the_shared_one() -> None:
    if not SHARED.exists():
        pytest.skip("no ../shared/SCENARIOS.md beside this checkout")
    assert coverage.CATALOGUE.read_text() == SHARED.read_text(), "copy ../shared/SCENARIOS.md to bdd/"


def test_the_catalogue_has_its_329_scenarios() -> None:
    scenarios = coverage.read_catalogue()
    assert len(scenarios) == 329
    assert len({(s.area, s.number) for s in scenarios}) == 329


def test_every_catalogue_scenario_has_a_true_row(capsys: pytest.CaptureFixture[str]) -> None:
    catalogue, rows = coverage.read_catalogue(), coverage.read_record()
    problems = coverage.problems(catalogue, rows, coverage.feature_scenarios(), coverage.bound_features())
    assert not problems, "\n".join(problems)
    mirrored, total, _ = coverage.summary(catalogue, rows)
    with capsys.disabled():
        print(f"\n{mirrored} of {total} catalogue scenarios mirrored ({100 * mirrored / total:.1f}%)")
    assert mirrored / total >= 0.8


def test_the_checker_catches_an_untrue_record(tmp_path: Path) -> None:
    catalogue = coverage.read_catalogue()
    features = coverage.feature_scenarios()
    bound = coverage.bound_features()
    text = coverage.RECORD.read_text()
    first = next(line for line in text.splitlines() if line.startswith("| 010 #1 |"))
    cases = {
        "no row": text.replace(first + "\n", ""),
        "no such scenario": text.replace("`ssh_registry.feature`: Add remote rbee-hive node to registry",
                                         "`ssh_registry.feature`: Nothing like it", 1),
        "not yet": text.replace(first, first[:-1] + " not yet |"),
        "no design section": text.replace(first, "| 010 #1 | Add remote rbee-hive node to registry | — | not applicable: none |"),
    }
    for name, changed in cases.items():
        path = tmp_path / f"{name}.md"
        path.write_text(changed)
        assert coverage.problems(catalogue, coverage.read_record(path), features, bound), name
