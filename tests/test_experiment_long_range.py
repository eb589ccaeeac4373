"""The long-range experiment: its quick preset run once for real, its results checked by content and recomputed."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import gatelens as gl
from gatelens.experiments import adding_problem, build_model, copy_task, train
from gatelens.experiments import long_range as lr
from gatelens.experiments.runner import Report, run_experiment

QUICK = lr.LONG_RANGE.presets["quick"]
LENGTHS = {"adding": QUICK["adding_steps"], "copy": QUICK["copy_delays"]}
ARCHITECTURES = ("gru", "elman", "lstm", "gru-chrono")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return run_experiment(lr.LONG_RANGE, preset="quick", out=tmp_path_factory.mktemp("long-range"))


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread, as the experiment runs: the same arithmetic, and no overhead on tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _part(report: Report, part: str) -> list[dict]:
    return [row for row in report.outcome.rows if row["part"] == part]


def _csv(report: Report) -> list[dict[str, str]]:
    with (report.out / "results.csv").open() as file:
        return list(csv.DictReader(file))


def _upper_median(values: list) -> int | float:
    return sorted(values)[len(values) // 2]


def _data(task: str, length: int, seed: int) -> dict:
    """The run's data, generated independently of the experiment's helpers."""
    if task == "adding":
        whole = adding_problem(length, QUICK["sequences"], seed)
    else:
        whole = copy_task(length, QUICK["sequences"], seed, symbols=QUICK["copy_symbols"], length=QUICK["copy_length"])
    return whole.split(QUICK["split"])


def _build(architecture: str, data: dict, seed: int) -> torch.nn.Module:
    train_part = data["train"]
    chrono = float(train_part.steps) if architecture == "gru-chrono" else None
    kind = "gru" if architecture == "gru-chrono" else architecture
    return build_model(kind, train_part.input_size, QUICK["hidden"], train_part.output_size, chrono=chrono, seed=seed)


def _horizon(network: torch.nn.Module, probe: torch.Tensor) -> int:
    """Upper median over the probe of the first lag with ‖∂h_T/∂h_{T−ℓ}‖₂ < eps, "never" (−1) counted as T."""
    lags = gl.propagation(gl.load(network.rnn).trace(probe)).horizon(QUICK["eps"])[0].tolist()
    return _upper_median([probe.shape[0] if lag == -1 else lag for lag in lags])


def test_every_run_is_present_once(report: Report) -> None:
    runs = Counter((row["task"], row["length"], row["architecture"], row["seed"]) for row in _part(report, "run"))
    expected = {
        (task, length, architecture, seed)
        for task, lengths in LENGTHS.items()
        for length, architecture, seed in itertools.product(lengths, ARCHITECTURES, range(QUICK["seeds"]))
    }
    assert set(runs) == expected and set(runs.values()) == {1}
    summaries = Counter((row["task"], row["length"], row["architecture"]) for row in _part(report, "summary"))
    assert set(summaries) == {key[:3] for key in expected} and set(summaries.values()) == {1}
    assert len(_csv(report)) == len(runs) + len(summaries)


def test_success_follows_the_metric_and_its_threshold(report: Report) -> None:
    for row in _part(report, "run"):
        assert 1 <= row["epochs_run"] <= QUICK["epochs"] and 0 <= row["best_epoch"] <= row["epochs_run"], row
        if row["task"] == "adding":
            assert row["metric"] == "test MSE" and 0.05 < row["baseline"] < 0.4, row  # Var(U + U) = 1/6
            assert row["threshold"] == pytest.approx(0.1 * row["baseline"], rel=1e-12), row
            assert row["success"] == (row["value"] < row["threshold"]), row
        else:
            assert row["metric"] == "recall accuracy" and 0.0 <= row["value"] <= 1.0, row
            assert row["baseline"] == 1 / QUICK["copy_symbols"] and row["threshold"] == 0.9, row
            assert row["success"] == (row["value"] >= 0.9), row
    for row in _csv(report):  # the file says the same
        if row["part"] == "run":
            assert row["success"] in ("True", "False")
            value, threshold = float(row["value"]), float(row["threshold"])
            passed = value < threshold if row["task"] == "adding" else value >= threshold
            assert (row["success"] == "True") == passed, row


def test_horizons_are_lags_within_the_sequence(report: Report) -> None:
    for row in _part(report, "run"):
        steps = row["length"] if row["task"] == "adding" else row["length"] + 2 * QUICK["copy_length"]
        assert row["steps"] == steps, row
        for when in ("init", "trained"):
            horizon, reached = row[f"horizon_{when}"], row[f"reached_{when}"]
            assert isinstance(horizon, int) and 1 <= horizon <= steps, row
            assert 0.0 <= reached <= 1.0, row
            if reached < 0.5:  # most probe sequences never fall below eps: the median counts them as T
                assert horizon == steps, row


def test_initial_horizons_equal_an_independent_recomputation(report: Report) -> None:
    with _one_thread():
        for row in _part(report, "run"):
            data = _data(row["task"], row["length"], row["seed"])
            network = _build(row["architecture"], data, row["seed"])
            assert _horizon(network, data["test"].inputs[:, : QUICK["probe"]]) == row["horizon_init"], row


def test_one_run_retrained_independently_gives_the_same_row(report: Report) -> None:
    row = min(_part(report, "run"), key=lambda row: row["epochs_run"] * row["steps"])  # the cheapest to repeat
    data = _data(row["task"], row["length"], row["seed"])
    network = _build(row["architecture"], data, row["seed"])
    settings = {key: QUICK[key] for key in ("epochs", "batch_size", "lr", "clip", "patience")}
    with _one_thread():
        result = train(network, data, seed=row["seed"], **settings)
        horizon = _horizon(network, data["test"].inputs[:, : QUICK["probe"]])
        with torch.no_grad():
            predicted = network(data["test"].inputs)
    assert len(result.history) == row["epochs_run"] and result.best_epoch == row["best_epoch"]
    assert horizon == row["horizon_trained"]
    test = data["test"]
    if row["task"] == "adding":
        value = float(((predicted[-1] - test.targets) ** 2).mean())
    else:
        recall = QUICK["copy_length"]
        value = float((predicted[-recall:].argmax(-1) == test.targets[-recall:]).double().mean())
    assert value == pytest.approx(row["value"], rel=1e-6)


def test_summary_rows_aggregate_the_runs(report: Report) -> None:
    runs = _part(report, "run")
    for summary in _part(report, "summary"):
        own = [
            row
            for row in runs
            if (row["task"], row["length"], row["architecture"])
            == (summary["task"], summary["length"], summary["architecture"])
        ]
        assert summary["runs"] == len(own) == QUICK["seeds"]
        assert summary["success_rate"] == pytest.approx(sum(row["success"] for row in own) / len(own), abs=1e-15)
        assert summary["horizon_init"] == _upper_median([row["horizon_init"] for row in own])
        assert summary["horizon_trained"] == _upper_median([row["horizon_trained"] for row in own])
        assert summary["value_median"] == _upper_median([row["value"] for row in own])


def test_the_summary_paragraph_reads_the_rows(report: Report) -> None:
    text = report.outcome.summary
    summaries = _part(report, "summary")
    for task, symbol in (("adding", "T"), ("copy", "D")):
        for architecture in ARCHITECTURES:
            passed = [
                row["length"]
                for row in summaries
                if row["task"] == task and row["architecture"] == architecture and row["success_rate"] >= 0.5
            ]
            longest = next(
                row
                for row in summaries
                if (row["task"], row["architecture"], row["length"]) == (task, architecture, max(LENGTHS[task]))
            )
            assert f"{architecture} {longest['horizon_init']} → {longest['horizon_trained']}" in text
            assert f"{architecture} {f'{symbol} = {max(passed)}' if passed else 'none'}" in text
    assert f"{QUICK['seeds']} seeds per task" in text


def test_files_hold_the_configuration_tables_and_figures(report: Report) -> None:
    names = {path.name for path in report.files}
    assert names == {"config.json", "results.csv", "results.md", "success_rate.png", "horizon.png"}
    assert all((report.out / name).is_file() for name in names)
    config = json.loads((report.out / "config.json").read_text())
    assert config["experiment"] == "long-range" and config["preset"] == "quick" and config["seeds"] == QUICK["seeds"]
    assert config["config"] == {key: value for key, value in QUICK.items() if key != "seeds"}
    text = (report.out / "results.md").read_text()
    assert "# long-range (quick)" in text and "## run" in text and "## summary" in text
    assert report.outcome.summary in text
    for stem in ("success_rate", "horizon"):
        assert (report.out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        figure = report.outcome.figures[stem]
        assert [axes.get_title().split(":")[0] for axes in figure.axes] == ["adding problem", "copy task"]
        lines = figure.axes[0].get_lines()  # horizon: init and trained per architecture, and the ceiling T
        assert len(lines) == (4 if stem == "success_rate" else 4 * 2 + 1)


def test_chrono_sets_the_gru_update_gate_biases(report: Report) -> None:
    data = _data("adding", max(LENGTHS["adding"]), seed=0)["train"]
    plain = lr.model("gru", data, 0, QUICK["hidden"]).rnn
    chrono = lr.model("gru-chrono", data, 0, QUICK["hidden"]).rnn
    size, steps = QUICK["hidden"], data.steps
    z = slice(size, 2 * size)  # PyTorch's gate order r, z, n: z is the keep gate
    for name, value in plain.named_parameters():
        other = getattr(chrono, name)
        if name.startswith("bias"):
            rest = torch.cat([value[:size], value[2 * size :]]), torch.cat([other[:size], other[2 * size :]])
            assert torch.equal(*rest), name  # the reset and candidate biases are untouched
        else:
            assert torch.equal(value, other), name  # so are all weights
    b_iz, b_hz = chrono.bias_ih_l0[z].detach(), chrono.bias_hh_l0[z].detach()
    assert not torch.equal(b_iz, plain.bias_ih_l0[z]) and torch.equal(b_hz, torch.zeros(size))
    timescale = 1 / (1 - torch.sigmoid(b_iz.double()))  # = 1 + U, U ~ U[1, T_max − 1], T_max = T
    assert timescale.min() >= 2 - 1e-6 and timescale.max() <= steps + 1e-6 and timescale.std() > 1
    # and the run's chrono GRU is the one built here: its initial horizon is that of this model
    row = next(
        row
        for row in _part(report, "run")
        if (row["task"], row["length"], row["architecture"], row["seed"]) == ("adding", steps, "gru-chrono", 0)
    )
    probe = _data("adding", steps, seed=0)["test"].inputs[:, : QUICK["probe"]]
    with _one_thread():
        assert _horizon(lr.model("gru-chrono", data, 0, QUICK["hidden"]), probe) == row["horizon_init"]


def test_seeds_override_the_preset_and_threads_are_restored(tmp_path: Path) -> None:
    tiny = dict(QUICK, adding_steps=[4], copy_delays=[2], sequences=40, hidden=4, epochs=1, probe=4)
    experiment = dataclasses.replace(lr.LONG_RANGE, presets={"quick": tiny})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1, so that a thread count left at 1 shows
    try:
        report = run_experiment(experiment, preset="quick", seeds=1, out=tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    runs = _part(report, "run")
    assert {row["seed"] for row in runs} == {0} and len(runs) == 2 * len(ARCHITECTURES)
    assert json.loads((tmp_path / "config.json").read_text())["seeds"] == 1
    assert report.outcome.summary.startswith("1 seed per task")
