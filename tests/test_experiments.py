"""Experiments: each quick preset run for real, its results checked by content; the command line's errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gatelens.cli import main
from gatelens.experiments.catalog import EXPERIMENTS, experiment


def _rows(folder: Path, part: str) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["part"] == part]


def test_seed_cases_quick(tmp_path: Path) -> None:
    report = experiment("seed-cases", out=tmp_path)
    assert {path.name for path in report.files} == {"config.json", "results.csv", "results.md", "credit_by_source.png"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["experiment"] == "seed-cases" and config["preset"] == "quick" and config["seeds"] == 3
    cases = _rows(tmp_path, "gate case")
    assert len(cases) == 3 * 2 * 3  # seeds × reset placements × cases
    assert {(row["reset"], row["case"]) for row in cases} == {
        (reset, case) for reset in ("after", "before") for case in ("z → 1", "z → 0, r → 0", "z → 0, r → 1")
    }
    for row in cases:
        assert float(row["gatelens_vs_limit"]) <= 1e-6 and float(row["autograd_vs_limit"]) <= 1e-6, row
        assert float(row["gatelens_vs_autograd"]) <= 1e-12, row
    blocking = _rows(tmp_path, "blocking")
    assert len(blocking) == 3 * 2
    for row in blocking:
        assert float(row["max_z_r_at_block"]) < 1e-12 and float(row["grad_norm_W_iz"]) > 1e-4, row
        if row["loss"] == "many-to-one":
            assert float(row["share_before_block"]) < 1e-12, row
        else:
            assert float(row["share_before_block"]) > 0.1, row
    text = (tmp_path / "results.md").read_text()
    assert "## gate case" in text and "## blocking" in text and "many-to-many" in text
    assert (tmp_path / "credit_by_source.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_override_the_preset(tmp_path: Path) -> None:
    experiment("seed-cases", seeds=1, out=tmp_path)
    assert {row["seed"] for row in _rows(tmp_path, "blocking")} == {"0"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["experiment", "nope"], "unknown experiment 'nope'; expected one of seed-cases"),
        (["experiment", "seed-cases", "--preset", "medium"], "unknown preset 'medium'"),
        (["experiment", "seed-cases", "--seeds", "0"], "seeds must be an int ≥ 1"),
    ],
)
def test_command_line_errors_are_one_line(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()  # nothing is written before the checks pass


def test_an_unwritable_folder_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["experiment", "seed-cases", "--out", str(blocker / "out")]) == 2
    assert "is not a writable directory" in capsys.readouterr().err


def test_command_line_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "seed-cases", "--seeds", "1", "--out", str(tmp_path)]) == 0
    assert "results in" in capsys.readouterr().out and (tmp_path / "results.csv").exists()


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    assert "example: gatelens experiment seed-cases" in capsys.readouterr().out
    assert set(EXPERIMENTS) >= {"seed-cases"}


def test_command_line_json_holds_the_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "seed-cases", "--seeds", "1", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(result["rows"]) == len(rows) and result["summary"] and str(tmp_path / "results.csv") in result["files"]
    assert [str(row["part"]) for row in result["rows"]] == [row["part"] for row in rows]
