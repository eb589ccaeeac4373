"""Sweeps on a local Dask cluster of 2 worker processes: every row checked against the per-point function run in
this process, failures recorded, the aggregate recomputed from the rows; and a sweep killed mid-way, resumed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatelens.cli import main
from gatelens.experiments import long_range
from gatelens.sweep import SweepResult, read_spec, sweep
from gatelens.sweep.table import RESULTS, columns, decode
from tests.sweep_specs import SLOW, in_process

TINY = """\
experiment = "long-range"
name = "tiny"

[settings]
sequences = 40
hidden = 4
epochs = 2
probe = 4

[grid]
architecture = ["gru", "elman"]
length = [1, 4, 8]   # the adding problem needs T ≥ 2: the points with length 1 raise
seed = [0, 1]
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> SweepResult:
    folder = tmp_path_factory.mktemp("sweep-local")
    spec = folder / "tiny.toml"
    spec.write_text(TINY, encoding="utf-8")
    return sweep(spec, out=folder / "out", workers=2)


def test_every_point_has_exactly_one_row(result: SweepResult) -> None:
    spec = result.spec
    assert len(spec.points) == 12 and result.complete and result.ran == 12 and not result.lost
    assert [row["point"] for row in result.rows] == [point.key for point in spec.points]  # one each, grid order
    with (result.out / RESULTS).open(newline="") as file:
        table = list(csv.reader(file))
    assert table[0] == columns(spec) and len(table) == 1 + 12
    assert Counter(line[0] for line in table[1:]) == Counter(point.key for point in spec.points)
    on_file = {line[0]: {column: decode(cell) for column, cell in zip(table[0], line)} for line in table[1:]}
    assert all(on_file[row["point"]] == row for row in result.rows)  # the result is what the file says
    workers = {row["worker"] for row in result.rows}
    assert len(workers) <= 2 and all(worker.startswith("tcp://127.0.0.1:") for worker in workers)


def test_every_row_holds_its_configuration_and_the_in_process_metrics(result: SweepResult) -> None:
    for point, row in zip(result.spec.points, result.rows):
        assert {key: row[key] for key in point.values} == point.values and row["config"] == point.config
        assert row["seconds"] >= 0 and row["started"] <= row["finished"]
        if point.values["length"] == 1:
            continue
        assert row["status"] == "ok" and row["error"] is None, row
        assert {key: row[key] for key in long_range.POINT_METRICS} == in_process(point.config), row


def test_a_point_that_raises_is_recorded_and_the_sweep_goes_on(result: SweepResult) -> None:
    failed = [row for row in result.rows if row["status"] == "error"]
    assert failed == result.failed and {row["length"] for row in failed} == {1} and len(failed) == 4
    with pytest.raises(ValueError) as raised:
        in_process(result.spec.points[0].config)  # the same error, raised here
    for row in failed:
        assert row["error"] == f"ValueError: {raised.value}"
        assert all(row[key] is None for key in long_range.POINT_METRICS)
    assert "12 points: 8 ok, 4 failed" in result.text and f"4 × ValueError: {raised.value}" in result.text


def test_the_aggregate_is_recomputed_from_the_rows(result: SweepResult) -> None:
    assert [(row["architecture"], row["length"]) for row in result.summary] == [
        (architecture, length) for architecture in ("gru", "elman") for length in (1, 4, 8)
    ]
    for entry in result.summary:
        own = [row for row in result.rows if (row["architecture"], row["length"]) == (entry["architecture"],
                                                                                     entry["length"])]  # fmt: skip
        ok = [row for row in own if row["status"] == "ok"]
        assert (entry["points"], entry["ok"], entry["failed"]) == (2, len(ok), 2 - len(ok))
        if not ok:
            assert entry["success_rate"] is None and entry["horizon_trained_median"] is None
            continue
        assert entry["success_rate"] == sum(row["success"] for row in ok) / len(ok)
        for metric in ("horizon_init", "horizon_trained", "value"):
            assert entry[f"{metric}_median"] == sorted(row[metric] for row in ok)[len(ok) // 2]
    with (result.out / "summary.csv").open(newline="") as file:
        on_file = [{key: decode(value) for key, value in row.items()} for row in csv.DictReader(file)]
    assert on_file == result.summary
    markdown = (result.out / "summary.md").read_text()
    assert result.text in markdown and "## failed points" in markdown and "| gru | 4 | 2 | 2 | 0 |" in markdown
    names = {path.name for path in result.files}
    assert names == {"sweep.json", RESULTS, "summary.csv", "summary.md", "success.png", "horizon_init.png",
                     "horizon_trained.png"}  # fmt: skip
    assert all((result.out / name).read_bytes()[:4] == b"\x89PNG" for name in names if name.endswith(".png"))


# ---------------------------------------------------------------------------------------------------------------
# a sweep killed mid-way, resumed


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts, each in its own session; killed with their process group at the end."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _rows_on_file(path: Path) -> int:
    try:
        return max(path.read_text().count("\n") - 1, 0)
    except FileNotFoundError:
        return 0


def test_a_killed_sweep_resumes_with_only_the_missing_points(
    tmp_path: Path, started: list[subprocess.Popen], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, out = tmp_path / "slow.toml", tmp_path / "out"
    spec.write_text(SLOW, encoding="utf-8")
    points = read_spec(spec).points
    command = "import sys; from gatelens.cli import main; sys.exit(main())"
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", command, "sweep", str(spec), "--workers", "1", "--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    started.append(process)
    path = out / RESULTS
    deadline = time.monotonic() + 300  # a guard against a hang only
    while _rows_on_file(path) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, log.read_text()  # still running: points are left to do
    os.killpg(process.pid, signal.SIGKILL)  # the machine "crashes": the command, its cluster, its workers
    process.wait()
    before = path.read_text()
    kept = before.splitlines(keepends=True)[1:]
    assert 2 <= len(kept) < len(points) and before.endswith("\n")
    done = [line.split(",")[0] for line in kept]
    with path.open("a") as file:
        file.write(f"{points[-1].key},ok,lstm,30,")  # and a row torn by the crash, as if mid-write

    status = main(["sweep", str(spec), "--out", str(out), "--resume", "--workers", "1"])
    captured = capsys.readouterr()
    text = " ".join(captured.out.split())
    assert status == 0
    assert f"{len(points)}/{len(points)} points · failed 0 · running 0" in captured.err  # the progress line
    after = path.read_text()
    assert after.startswith(before)  # the rows written before the crash are untouched; the torn one is gone
    new = [line.split(",")[0] for line in after.splitlines()[len(before.splitlines()) :]]
    assert sorted(done + new) == sorted(point.key for point in points)  # each point once
    assert set(new) == {point.key for point in points} - set(done)  # only the missing ones ran
    assert f"This run ran {len(new)}; {len(done)} were already done." in text
    assert f"{len(points)} points: {len(points)} ok, 0 failed" in text
