"""Sweeps without a cluster: the spec (expansion, hashes, every refusal), the results table (cells, torn lines,
duplicates, other sweeps' folders), the task wrapper, the scheduler check, and the per-point functions against the
experiments' own runs."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from gatelens import __version__
from gatelens.cli import main
from gatelens.experiments import long_range, timescales
from gatelens.experiments.catalog import EXPERIMENTS
from gatelens.experiments.runner import run_experiment
from gatelens.sweep import read_spec, sweep, sweepable
from gatelens.sweep.cluster import probe
from gatelens.sweep.spec import point_key
from gatelens.sweep.table import RESULTS, STATE, ResultsTable, columns, decode, encode
from gatelens.sweep.task import run_point

QUICK = long_range.LONG_RANGE.presets["quick"]
SPEC = """\
experiment = "long-range"
preset = "quick"

[settings]
sequences = 40
hidden = 4
lr = 1

[grid]
architecture = ["gru", "elman"]
length = [4, 8, 16]
seed = [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def spec_dict(**changes: object) -> dict:
    spec = {"experiment": "long-range", "grid": {"architecture": ["gru"], "length": [4], "seed": [0]}}
    return spec | changes


# ---------------------------------------------------------------------------------------------------------------
# the spec


def test_a_spec_expands_into_its_points_in_grid_order(tmp_path: Path) -> None:
    spec = read_spec(write(tmp_path, SPEC))
    assert spec.name == "spec" and spec.preset == "quick" and spec.experiment is long_range.LONG_RANGE
    assert len(spec.points) == 2 * 3 * 2
    assert [tuple(point.values.values()) for point in spec.points[:3]] == [("gru", 4, 0), ("gru", 4, 1), ("gru", 8, 0)]
    for point in spec.points:
        settings = {key: QUICK[key] for key in long_range.POINT.settings}
        # preset < [settings] (lr = 1 is the preset's float type) < the axes' defaults < the point's grid values
        expected = settings | {"sequences": 40, "hidden": 4, "lr": 1.0, "task": "adding"} | point.values
        assert point.config == expected and isinstance(point.config["lr"], float)
        assert point.key == point_key("long-range", expected) and len(point.key) == 16
    assert len({point.key for point in spec.points}) == len(spec.points)


def test_the_sweep_hash_is_that_of_its_points_however_the_grid_is_written(tmp_path: Path) -> None:
    first = read_spec(write(tmp_path, SPEC))
    reordered = SPEC.replace('["gru", "elman"]', '["elman", "gru"]').replace("seed = [0, 1]", "seed = [1, 0]")
    second = read_spec(write(tmp_path, reordered))
    assert second.key == first.key and {p.key for p in second.points} == {p.key for p in first.points}
    moved = SPEC.replace("hidden = 4\n", "").replace("[grid]\n", "[grid]\nhidden = [4]\n")
    assert read_spec(write(tmp_path, moved)).key == first.key  # the same points, given another way
    assert read_spec(write(tmp_path, SPEC.replace("hidden = 4", "hidden = 5"))).key != first.key
    assert read_spec(write(tmp_path, SPEC)).points[0].key == first.points[0].key  # stable across reads


def test_a_dict_spec_and_defaults() -> None:
    spec = read_spec(spec_dict(name="mine"))
    assert spec.name == "mine" and len(spec.points) == 1
    assert spec.points[0].config["task"] == "adding" and spec.points[0].config["seed"] == 0
    assert read_spec(spec) is spec
    assert sweepable() == ["long-range", "timescales"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (spec_dict(experiment="nope"), "unknown experiment 'nope'; expected one of long-range, timescales"),
        (spec_dict(experiment="seed-cases"), "'seed-cases' has no per-point function"),
        ({"grid": {"seed": [0]}}, "no experiment given"),
        (spec_dict(preset="medium"), "unknown preset 'medium' for long-range; expected one of quick, full"),
        (spec_dict(grids={}), "unknown key grids; expected experiment, preset, name, settings, grid"),
        (spec_dict(grid={"hiden": [4]}), "unknown [grid] key hiden for long-range; valid keys: task, length"),
        (spec_dict(settings={"seeds": 3}), "unknown [settings] key seeds"),
        (spec_dict(grid={}), "the grid is empty"),
        ({"experiment": "long-range"}, "no [grid] table"),
        (spec_dict(grid={"architecture": ["gru"], "length": 4}), "[grid] length must be a non-empty list"),
        (spec_dict(grid={"architecture": ["gru"], "length": []}), "[grid] length must be a non-empty list"),
        (spec_dict(grid={"architecture": ["gru"], "length": [4, 4]}), "[grid] length lists 4 more than once"),
        (spec_dict(grid={"architecture": ["gur"], "length": [4]}), "architecture: 'gur' is not one of gru, elman"),
        (spec_dict(grid={"architecture": ["gru"], "length": [0]}), "length: expected an int ≥ 1"),
        (spec_dict(grid={"architecture": ["gru"], "length": [4.5]}), "length: expected an int ≥ 1"),
        (spec_dict(grid={"architecture": ["gru"], "length": [True]}), "length: expected an int ≥ 1"),
        (spec_dict(settings={"hidden": "16"}), "[settings] hidden: expected an int like the preset's 16, got '16'"),
        (spec_dict(settings={"lr": math.nan}), "[settings] lr: expected a finite number"),
        (spec_dict(settings={"split": [0.5, "x", 0.25]}), "[settings] split[1]: expected a finite number"),
        (spec_dict(settings={"seed": 1}), "seed in both [settings] and [grid]"),
        ({"experiment": "long-range", "grid": {"length": [4]}}, "needs a value for architecture: give architecture"),
        (spec_dict(name="a/b"), "name must be a non-empty string usable as a folder name"),
    ],
)
def test_bad_specs_are_refused_with_one_clear_message(spec: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as raised:
        read_spec(spec)
    assert message in str(raised.value)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such sweep spec file"):
        read_spec(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="is not valid TOML"):
        read_spec(write(tmp_path, "experiment = long-range\n"))
    with pytest.raises(TypeError, match="spec must be a path to a TOML file, a dict or a SweepSpec"):
        read_spec(3)


# ---------------------------------------------------------------------------------------------------------------
# the results table and its folder


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -3, 0.1, 1 / 3, 1e-300, -0.0, math.inf, "text", "", "3", "True", "null", "NaN", "a,b\"c",
     "two\nlines", "tab\there", [0.7, 0.15, 0.15], {"a": [1, "x"]}, "Ünïcødé"],
)  # fmt: skip
def test_cells_read_back_exactly(value: object) -> None:
    text = encode(value)
    assert "\n" not in text and decode(text) == value and type(decode(text)) is type(value)
    assert math.copysign(1, decode(encode(-0.0))) == -1
    assert math.isnan(decode(encode(math.nan)))


def _row(spec, point, **changes) -> dict:
    row = {column: None for column in columns(spec)}
    return row | {"point": point.key, "status": "ok", **point.values, "config": point.config} | changes


def test_the_table_appends_once_per_point_and_repairs_a_torn_line(tmp_path: Path) -> None:
    spec = read_spec(spec_dict(grid={"architecture": ["gru", "elman"], "length": [4], "seed": [0]}))
    first, second = spec.points
    table = ResultsTable.open(tmp_path, spec, resume=False)
    table.start()
    assert table.append(_row(spec, first, value=0.25, success=True)) is True
    assert table.append(_row(spec, first, value=0.5)) is False  # a point never gets a second row
    table.close()
    path = tmp_path / RESULTS
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(columns(spec)) and len(lines) == 2
    state = json.loads((tmp_path / STATE).read_text())
    assert state["sweep"] == spec.key and state["points"] == 2 and state["columns"] == columns(spec)
    assert state["spec"]["grid"] == {"architecture": ["gru", "elman"], "length": [4], "seed": [0]}

    good = path.read_text()
    duplicate = good.splitlines(keepends=True)[1]
    path.write_text(good + duplicate + f"{second.key},ok,elm")  # a duplicate row, then a crash in the middle of a row
    table = ResultsTable.open(tmp_path, spec, resume=True)
    assert [row["point"] for row in table.rows] == [first.key]
    assert table.rows[0]["value"] == 0.25 and table.rows[0]["success"] is True
    assert table.rows[0]["config"] == first.config
    assert path.read_text() == good  # rewritten without them


def test_folders_of_other_sweeps_or_with_rows_are_refused(tmp_path: Path) -> None:
    spec = read_spec(spec_dict())
    table = ResultsTable.open(tmp_path, spec, resume=False)
    table.start()
    table.append(_row(spec, spec.points[0]))
    table.close()
    with pytest.raises(ValueError, match="already holds every point of this sweep; its results are there"):
        sweep(spec, out=tmp_path)
    other = spec_dict(grid={"architecture": ["lstm"], "length": [4]})
    with pytest.raises(ValueError, match=r"holds the results of another sweep \(long-range, 1 point; sweep "):
        sweep(other, out=tmp_path, resume=True)
    experiment_folder = tmp_path / "experiment"
    experiment_folder.mkdir()
    (experiment_folder / RESULTS).write_text("part,seed\nrun,0\n")
    with pytest.raises(ValueError, match="exists but is not a sweep's results table"):
        sweep(spec, out=experiment_folder)
    (tmp_path / RESULTS).write_text("point,status\n")
    with pytest.raises(ValueError, match=r"does not hold this sweep's columns \(missing: architecture, baseline"):
        sweep(spec, out=tmp_path, resume=True)


def test_a_grid_written_in_another_key_order_resumes_the_same_table(tmp_path: Path) -> None:
    grid = {"architecture": ["gru", "elman"], "length": [4, 6], "seed": [0]}
    spec = read_spec(spec_dict(grid=grid))
    table = ResultsTable.open(tmp_path, spec, resume=False)
    table.start()
    table.append(_row(spec, spec.points[0], value=0.25))
    table.close()
    with pytest.raises(ValueError, match=r"already holds 1 of the 4 points of this sweep; resume it .* the 3 missing"):
        sweep(spec, out=tmp_path)
    reordered = read_spec(spec_dict(grid={key: grid[key] for key in ("seed", "length", "architecture")}))
    assert reordered.key == spec.key and columns(reordered) != columns(spec)
    resumed = ResultsTable.open(tmp_path, reordered, resume=True)
    assert resumed.columns == columns(spec) and resumed.rows[0]["value"] == 0.25
    resumed.start()
    resumed.append(_row(reordered, reordered.points[1], value=0.5))
    resumed.close()
    again = ResultsTable.open(tmp_path, spec, resume=True)
    assert [row["value"] for row in again.rows] == [0.25, 0.5]
    assert {row["point"] for row in again.rows} == {spec.points[0].key, reordered.points[1].key}


def test_a_folder_written_with_other_versions_is_refused(tmp_path: Path) -> None:
    spec = read_spec(spec_dict())
    table = ResultsTable.open(tmp_path, spec, resume=False)
    table.start()
    table.close()
    state = json.loads((tmp_path / STATE).read_text())
    state["versions"]["torch"] = "1.0.0"
    (tmp_path / STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"was written with torch 1\.0\.0 \(now .*\); rows from other versions"):
        ResultsTable.open(tmp_path, spec, resume=True)


def test_a_worker_with_other_versions_records_an_error_row() -> None:
    row = run_point(lambda config: {"x": 1}, {}, ("x",), {"gatelens": "9.9.9"})
    assert row["status"] == "error" and row["metrics"] == {}
    assert f"this worker runs gatelens {__version__} (the sweep runs 9.9.9)" in row["error"]
    assert run_point(lambda config: {"x": 1}, {}, ("x",), {"gatelens": __version__})["status"] == "ok"


def test_a_grid_too_large_is_refused_before_it_is_expanded() -> None:
    huge = {"architecture": ["gru"], "length": list(range(2, 1002)), "seed": list(range(1000))}
    with pytest.raises(ValueError, match=r"the grid has 1,000,000 points \(1 architecture × 1000 length × 1000 seed\)"):
        read_spec(spec_dict(grid=huge))


def test_a_complete_sweep_resumed_runs_nothing_and_starts_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = read_spec(spec_dict())
    table = ResultsTable.open(tmp_path, spec, resume=False)
    table.start()
    table.append(_row(spec, spec.points[0], status="error", error="ValueError: no"))
    table.close()
    result = sweep(spec, out=tmp_path, resume=True, scheduler="tcp://127.0.0.1:1", timeout=0.1)  # never contacted
    assert result.ran == 0 and result.complete and [row["error"] for row in result.failed] == ["ValueError: no"]
    assert "1 failed" in result.text and "1 × ValueError: no" in result.text
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "summary.csv").is_file()
    toml = 'experiment = "long-range"\n[grid]\narchitecture = ["gru"]\nlength = [4]\nseed = [0]\n'
    status = main(["sweep", str(write(tmp_path, toml)), "--out", str(tmp_path), "--resume"])
    assert status == 1 and "1 × ValueError: no" in " ".join(capsys.readouterr().out.split())  # a failed point: 1


# ---------------------------------------------------------------------------------------------------------------
# the task run on a worker


def test_a_point_that_raises_is_a_result_with_its_error() -> None:
    def failing(config: dict) -> dict:
        raise ValueError(f"no\n  good: {config['x']}")

    outcome = run_point(failing, {"x": 1}, ("a",))
    assert outcome["status"] == "error" and outcome["error"] == "ValueError: no good: 1" and outcome["metrics"] == {}
    assert outcome["worker"] == "local" and outcome["seconds"] >= 0
    outcome = run_point(lambda config: {"b": 1}, {}, ("a",))
    assert outcome["status"] == "error" and "expected a dict with the keys ['a']" in outcome["error"]


def test_a_point_runs_on_one_thread_seeded_and_leaves_the_process_as_it_was() -> None:
    seen = {}

    def measure(config: dict) -> dict:
        config["mutated"] = True
        seen["threads"] = torch.get_num_threads()
        return {"draw": torch.rand(()), "array": np.arange(2, dtype=np.int64), "flag": np.bool_(True)}

    threads, state = torch.get_num_threads(), torch.get_rng_state()
    config = {"seed": 5}
    outcome = run_point(measure, config, ("draw", "array", "flag"))
    assert outcome["status"] == "ok" and seen["threads"] == 1 and config == {"seed": 5}
    assert outcome["metrics"] == {"draw": torch.rand((), generator=torch.Generator().manual_seed(5)).item(),
                                  "array": [0, 1], "flag": True}  # fmt: skip
    assert type(outcome["metrics"]["draw"]) is float
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------------------
# where it runs: refused before any work


def test_an_unreachable_scheduler_is_one_error_not_a_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket is closed
    spec = write(tmp_path, SPEC)
    status = main(["sweep", str(spec), "--scheduler", f"tcp://127.0.0.1:{port}", "--timeout", "0.5",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0
    assert err.startswith(f"gatelens: error: cannot reach a Dask scheduler at tcp://127.0.0.1:{port} within 0.5 s")
    assert not (tmp_path / "out" / STATE).exists()  # nothing was written
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ConnectionError, match="cannot reach a Dask scheduler at .* within 0.5 s"):
            probe(f"tcp://127.0.0.1:{silent.getsockname()[1]}", 0.5)
    with pytest.raises(ConnectionError, match="expected an address such as tcp://host:8786"):
        probe("localhost", 0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers sets the size of the local cluster"),
        (["--workers", "0"], "workers must be an int ≥ 1"),
        (["--timeout", "0"], "the connection timeout must be a number of seconds > 0"),
    ],
)
def test_bad_options_are_one_line(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["sweep", str(write(tmp_path, SPEC)), "--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("gatelens: error: ") and message in err and "\n" not in err


def test_bad_specs_on_the_command_line_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["sweep", str(write(tmp_path, SPEC.replace("seed = [0, 1]", "sed = [0, 1]")))])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "unknown [grid] key sed for long-range; valid keys: task, length, architecture, seed" in err
    status = main(["sweep", str(write(tmp_path, 'experiment = "long-range"\n[grid]\n'))])
    assert status == 2 and "the grid is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the per-point functions: the experiments' own rows


@pytest.mark.parametrize("name", sweepable())
def test_declarations_are_consistent(name: str) -> None:
    point = EXPERIMENTS[name].point
    for preset in EXPERIMENTS[name].presets.values():
        assert set(point.settings) <= set(preset) and not set(point.axes) & set(preset)
    names = [*point.axes, *point.settings, *point.metrics]
    assert len(names) == len(set(names))
    assert set(point.figures) <= set(point.metrics) and {point.x, point.lines, point.panels} - {None} <= set(names)


def test_the_long_range_point_gives_the_experiments_rows(tmp_path: Path) -> None:
    tiny = dict(QUICK, adding_steps=[4], copy_delays=[2], sequences=40, hidden=4, epochs=2, probe=4)
    experiment = dataclasses.replace(long_range.LONG_RANGE, presets={"quick": tiny})
    report = run_experiment(experiment, preset="quick", seeds=1, out=tmp_path)
    base = {key: tiny[key] for key in long_range.POINT.settings}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner and the sweep's task run it
    try:
        for row in (row for row in report.outcome.rows if row["part"] == "run"):
            axes = {key: row[key] for key in ("task", "length", "architecture", "seed")}
            assert long_range.point(base | axes) == {key: row[key] for key in long_range.POINT_METRICS}, row
    finally:
        torch.set_num_threads(threads)


def test_the_timescales_point_gives_the_experiments_rows(tmp_path: Path) -> None:
    tiny = dict(timescales.TIMESCALES.presets["quick"], steps=12, sequences=40, hidden=4, epochs=2, probe=8)
    experiment = dataclasses.replace(timescales.TIMESCALES, presets={"quick": tiny})
    report = run_experiment(experiment, preset="quick", seeds=2, out=tmp_path)
    base = {key: tiny[key] for key in timescales.POINT.settings}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in (row for row in report.outcome.rows if row["part"] == "runs"):
            found = timescales.point(base | {"seed": row["seed"]})
            errors = [row[f"rmse_delay_{delay}"] for delay in tiny["delays"]]
            assert found == {
                "epochs_run": row["epochs"],
                "rmse_by_delay": errors,
                "rmse_mean": sum(errors) / len(errors),
                "spearman_gate_influence": row["spearman_gate_influence"],
                "long_term_units": row["long_term_units"],
                "short_term_units": row["short_term_units"],
            }
    finally:
        torch.set_num_threads(threads)
