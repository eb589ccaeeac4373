"""The timescales experiment's quick preset, checked by content against independent recomputations."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import gatelens as gl
from gatelens.experiments.catalog import experiment
from gatelens.experiments.tasks import multi_timescale
from gatelens.experiments.timescales import TIMESCALES, _spearman
from gatelens.experiments.train import build_model, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("timescales")
    experiment("timescales", out=out)
    return out


def _rows(folder: Path, part: str) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["part"] == part]


def test_every_unit_of_every_seed_is_reported(folder: Path) -> None:
    config = TIMESCALES.presets["quick"]
    units = _rows(folder, "units")
    assert len(units) == config["seeds"] * config["hidden"]
    assert {(row["seed"], row["unit"]) for row in units} == {
        (str(seed), f"h{j}") for seed in range(config["seeds"]) for j in range(config["hidden"])
    }
    for row in units:
        z, tau = float(row["mean_update_gate"]), float(row["tau_gate"])
        assert 0 < z < 1 and tau == pytest.approx(1 / (1 - z), rel=1e-5)
        assert row["kind"] == ("long-term" if tau >= 10 else "short-term" if tau <= 2 else "mixed")
        assert 0 <= float(row["tau_influence"]) <= config["steps"] // 2
    assert {path.name for path in folder.iterdir()} >= {"gate_vs_influence.png", "influence_profiles.png"}


def test_seed_zero_matches_an_independent_run(folder: Path) -> None:
    """Retrain seed 0 as the experiment does, then recompute its gates, influence and correlation directly."""
    config = TIMESCALES.presets["quick"]
    data = multi_timescale(config["steps"], config["sequences"], 0, delays=tuple(config["delays"])).split()
    model = build_model("gru", 1, config["hidden"], len(config["delays"]), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, data, epochs=config["epochs"], lr=config["lr"], batch_size=32, patience=10, seed=0)
    finally:
        torch.set_num_threads(threads)
    trace = gl.load(model.rnn).trace(data["test"].inputs[:, : config["probe"]])
    z = trace.recurrence().cache.z.mean((0, 1))  # keep convention: the carry is z itself
    steps = config["steps"]
    influence = gl.input_influence(trace, anchors=list(range(steps // 2, steps)), max_lag=steps // 2).timescale
    rows = [row for row in _rows(folder, "units") if row["seed"] == "0"]
    assert torch.allclose(torch.tensor([float(row["mean_update_gate"]) for row in rows]), z.float(), rtol=1e-5)
    assert torch.allclose(torch.tensor([float(row["tau_influence"]) for row in rows]), influence, rtol=1e-5)
    run = _rows(folder, "runs")[0]
    assert float(run["spearman_gate_influence"]) == pytest.approx(_spearman(z, influence), abs=1e-6)


def test_spearman_is_rank_correlation() -> None:
    a = torch.tensor([0.1, 0.5, 0.2, 0.9])
    assert _spearman(a, a.exp()) == pytest.approx(1.0)
    assert _spearman(a, -a) == pytest.approx(-1.0)
    assert _spearman(a, torch.tensor([1.0, 2.0, 4.0, 3.0])) == pytest.approx(0.4)
