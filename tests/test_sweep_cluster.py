"""Sweeps on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on 127.0.0.1, started here.
The command line reaches it by address and gets the numbers of the per-point function run in this process; a worker
killed while it runs points loses nothing: every point still ends with exactly one row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from distributed import Client

from gatelens.cli import main
from gatelens.experiments import long_range
from gatelens.sweep import SweepResult, read_spec, sweep
from gatelens.sweep.table import RESULTS, now
from tests.sweep_specs import SLOW, in_process

TINY = """\
experiment = "long-range"

[settings]
sequences = 40
hidden = 4
epochs = 2
probe = 4

[grid]
architecture = ["gru", "elman"]
length = [4, 8]
"""
GUARD = 300.0  # seconds: a guard against a hang only, never a limit on speed


@dataclass
class Cluster:
    address: str
    client: Client
    workers: dict[str, subprocess.Popen]  # by name
    folder: Path

    def address_of(self, name: str) -> str:
        return next(
            address for address, info in self.client.scheduler_info()["workers"].items() if info["name"] == name
        )


def _start(arguments: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", *arguments], stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("dask-cluster")
    file = folder / "scheduler.json"
    processes: list[subprocess.Popen] = []
    client = None
    try:
        scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        processes.append(_start([*scheduler, "--scheduler-file", str(file)], folder / "scheduler.log"))
        deadline = time.monotonic() + GUARD
        while not file.exists() and processes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert file.exists(), (folder / "scheduler.log").read_text()
        address = json.loads(file.read_text())["address"]
        workers = {
            name: _start(["distributed.cli.dask_worker", "--scheduler-file", str(file), "--name", name, "--nthreads",
                          "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"], folder / f"{name}.log")
            for name in ("w1", "w2")
        }  # fmt: skip
        processes += workers.values()
        client = Client(address, timeout=30, set_as_default=False)
        client.wait_for_workers(2, timeout=GUARD)
        yield Cluster(address, client, workers, folder)
    finally:
        if client is not None:
            client.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _metrics(row: dict) -> dict:
    return {key: row[key] for key in long_range.POINT_METRICS}


def _keys_on_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(",")[0] for line in lines[1:]]


def test_the_command_line_sweeps_on_the_scheduler_with_the_same_numbers(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY, encoding="utf-8")
    status = main(["sweep", str(spec), "--scheduler", cluster.address, "--out", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err
    result = sweep(spec, out=tmp_path / "out", resume=True, scheduler=cluster.address)  # complete: nothing runs
    assert result.ran == 0 and result.complete and len(result.rows) == 4
    workers = set(cluster.client.scheduler_info()["workers"])
    for point, row in zip(result.spec.points, result.rows):
        assert row["point"] == point.key and row["status"] == "ok" and row["worker"] in workers
        assert _metrics(row) == in_process(point.config)  # the same numbers as here, in this process


def test_a_worker_killed_mid_sweep_loses_nothing_and_duplicates_nothing(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "slow.toml"
    path.write_text(SLOW, encoding="utf-8")
    spec, out = read_spec(path), tmp_path / "out"
    victim, survivor = cluster.address_of("w1"), cluster.address_of("w2")
    outcome: list[SweepResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(sweep(spec, cluster.client, out=out))
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    with Client(cluster.address, timeout=30, set_as_default=False) as monitor:
        deadline, in_flight = time.monotonic() + GUARD, []
        while not in_flight and thread.is_alive() and time.monotonic() < deadline:
            if _keys_on_file(out / RESULTS):  # the sweep is under way …
                running = monitor.processing().get(victim, [])
                in_flight = [key for key in running if str(key).startswith("gatelens-sweep-")]  # … and w1 runs ours
            time.sleep(0.01)
        assert in_flight, "w1 never ran a point of the sweep while it was under way"
        cluster.workers["w1"].send_signal(signal.SIGKILL)
        killed_at = now()
    thread.join(GUARD)
    assert not thread.is_alive() and not isinstance(outcome[0], BaseException), outcome
    result = outcome[0]

    assert result.complete and not result.lost and not result.failed, result.text
    assert result.ran == len(spec.points)
    assert Counter(_keys_on_file(out / RESULTS)) == Counter(point.key for point in spec.points)  # once each
    assert {row["worker"] for row in result.rows} <= {victim, survivor}
    assert all(row["finished"] <= killed_at for row in result.rows if row["worker"] == victim)
    lost_points = {str(key).split("-")[2] for key in in_flight}  # gatelens-sweep-<point>-<run token>
    retried = [row for row in result.rows if row["point"] in lost_points and row["worker"] == survivor]
    assert retried, "the points w1 was running when it died were not run again on w2"
    by_key = {point.key: point for point in spec.points}
    for row in retried + [row for row in result.rows if row["worker"] == victim][:1]:
        assert _metrics(row) == in_process(by_key[row["point"]].config)
