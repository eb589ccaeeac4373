"""The rehmer-kroll experiment's quick preset, run once and checked by content against independent recomputations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from gatelens.experiments.rehmer_kroll import REHMER_KROLL
from gatelens.experiments.runner import Report, run_experiment
from gatelens.experiments.tasks import first_order_system, wiener_hammerstein
from gatelens.experiments.train import build_model

F64 = torch.float64
KINDS = ("gru", "elman")
QUICK = REHMER_KROLL.presets["quick"]
SEEDS = [str(seed) for seed in range(QUICK["seeds"])]
# Where the two surface parameters (recurrent, input) sit in the torch module: (parameter, row); GRU rows r, z, n.
NAMES = {"elman": ("W_hh", "W_ih"), "gru": ("W_hn", "W_in")}
PLACES = {"elman": (("weight_hh_l0", 0), ("weight_ih_l0", 0)), "gru": (("weight_hh_l0", 2), ("weight_ih_l0", 2))}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return run_experiment(REHMER_KROLL, preset="quick", out=tmp_path_factory.mktemp("rehmer-kroll"))


def _rows(report: Report, part: str) -> list[dict[str, str]]:
    with (report.out / "results.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["part"] == part]


def _academic_parts() -> dict:
    config = QUICK["academic"]
    data = first_order_system(
        config["steps"], config["sequences"], config["data_seed"], a=config["a"], b=config["b"],
        noise_std=config["noise_std"], dtype=F64,
    ).split(config["fractions"])  # fmt: skip
    return data | {"train": data["train"].windows(config["window"])}


def _free_run_mse(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, washout: int) -> float:
    with torch.no_grad():
        return float(((model(inputs) - targets)[washout:] ** 2).mean())


def test_files_and_configuration(report: Report) -> None:
    names = {path.name for path in report.files}
    figures = {"loss_surface.png", "academic_local_gradients.png", "benchmark_training.png"}
    assert names == {"config.json", "results.csv", "results.md"} | figures
    for name in figures:
        assert (report.out / name).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((report.out / "config.json").read_text())
    assert config["experiment"] == "rehmer-kroll" and config["preset"] == "quick" and config["seeds"] == QUICK["seeds"]
    assert config["config"]["academic"] == QUICK["academic"] and config["config"]["benchmark"] == QUICK["benchmark"]
    text = (report.out / "results.md").read_text()
    assert "## academic" in text and "## loss surface" in text and "## benchmark" in text
    assert (report.out / "loss_surface.json").exists()
    for kind in KINDS:
        for seed in SEEDS:
            assert (report.out / "monitor" / f"{kind}-seed{seed}" / "monitor.csv").exists()


def test_a_row_for_every_kind_and_seed(report: Report) -> None:
    for part in ("academic", "benchmark"):
        rows = _rows(report, part)
        assert sorted((row["kind"], row["seed"]) for row in rows) == sorted((k, s) for k in KINDS for s in SEEDS)
    assert sorted(row["kind"] for row in _rows(report, "loss surface")) == sorted(KINDS)


def test_success_is_rmse_below_the_stated_threshold(report: Report) -> None:
    academic, benchmark = QUICK["academic"], QUICK["benchmark"]
    tests = {
        "academic": _academic_parts()["test"],
        "benchmark": wiener_hammerstein(
            benchmark["steps"], benchmark["sequences"], benchmark["data_seed"], noise_std=benchmark["noise_std"]
        ).split(benchmark["fractions"])["test"],
    }
    for part, config in (("academic", academic), ("benchmark", benchmark)):
        targets = tests[part].targets[config["washout"] :].double().numpy()
        threshold = config["success"] * np.std(targets, ddof=1)
        for row in _rows(report, part):
            assert float(row["threshold"]) == pytest.approx(threshold, rel=1e-9), row
            assert row["success"] == str(float(row["test_rmse"]) < threshold), row
            assert math.isfinite(float(row["test_rmse"])) and float(row["test_rmse"]) > 0, row
    text = report.outcome.summary
    for part in ("academic", "benchmark"):
        rows = _rows(report, part)
        counts = [sum(row["success"] == "True" for row in rows if row["kind"] == kind) for kind in KINDS]
        assert f"GRU {counts[0]}/{len(SEEDS)}, Elman RNN {counts[1]}/{len(SEEDS)}" in text


def test_initial_local_gradients_equal_autograd_on_the_torch_module(report: Report) -> None:
    """ℓ(k) = ‖∂h_k/∂θ‖ with h_{k−1} held fixed, by one backward pass per step (H = 1: h_k is a scalar)."""
    inputs = _academic_parts()["test"].inputs  # (T, N, 1)
    rows = {row["kind"]: row for row in _rows(report, "academic") if row["seed"] == "0"}
    for kind in KINDS:
        rnn = build_model(kind, 1, 1, 1, seed=0, dtype=F64).rnn  # built as the experiment builds seed 0
        with torch.no_grad():
            states = torch.cat([torch.zeros_like(inputs[:1]), rnn(inputs)[0]])  # h_0 .. h_T
        steps, sequences = inputs.shape[:2]
        previous = states[:-1].reshape(1, steps * sequences, 1)  # h_{k−1}, held fixed
        h = rnn(inputs.reshape(1, steps * sequences, 1), previous)[0].flatten()
        parameters = list(rnn.parameters())
        norms = []
        for value in h:
            grads = torch.autograd.grad(value, parameters, retain_graph=True)
            norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))
        norms = np.array(norms)
        row = rows[kind]
        assert float(row["local_init_median"]) == pytest.approx(np.median(norms), rel=1e-9)
        assert float(row["local_init_p95"]) == pytest.approx(np.quantile(norms, 0.95), rel=1e-9)
        assert float(row["local_init_max"]) == pytest.approx(norms.max(), rel=1e-9)
        assert float(row["local_trained_max"]) > 0


def test_loss_surface_grid_and_one_point_evaluated_independently(report: Report) -> None:
    config = QUICK["academic"]
    points, span, washout = config["surface_points"], config["surface_span"], config["washout"]
    surfaces = json.loads((report.out / "loss_surface.json").read_text())
    rows = {row["kind"]: row for row in _rows(report, "loss surface")}
    data = _academic_parts()
    for kind in KINDS:
        surface, row = surfaces[kind], rows[kind]
        loss = np.array(surface["loss"])
        assert loss.shape == (points, points) and np.isfinite(loss.min())
        assert float(row["loss_min"]) == pytest.approx(loss.min(), rel=1e-12)
        assert (surface["x_parameter"], surface["y_parameter"]) == NAMES[kind]
        model = build_model(kind, 1, 1, 1, dtype=F64)
        model.load_state_dict(
            {name: torch.tensor(value, dtype=F64) for name, value in surface["reference_state"].items()}
        )
        (x_parameter, x_row), (y_parameter, y_row) = PLACES[kind]
        x_ref = float(getattr(model.rnn, x_parameter).detach()[x_row, 0])
        y_ref = float(getattr(model.rnn, y_parameter).detach()[y_row, 0])
        assert float(row["x_reference"]) == pytest.approx(x_ref, rel=1e-12)
        assert float(row["y_reference"]) == pytest.approx(y_ref, rel=1e-12)
        assert surface["x"] == pytest.approx(list(x_ref + np.linspace(-span, span, points)), rel=1e-12)
        assert surface["y"] == pytest.approx(list(y_ref + np.linspace(-span, span, points)), rel=1e-12)
        # The reference is the trained model of its seed: its free-run test RMSE is that seed's row.
        seed_row = next(
            r for r in _rows(report, "academic") if r["kind"] == kind and r["seed"] == row["reference_seed"]
        )
        test = data["test"]
        rmse = math.sqrt(_free_run_mse(model, test.inputs, test.targets, washout))
        assert float(seed_row["test_rmse"]) == pytest.approx(rmse, rel=1e-9)
        assert float(row["loss_at_reference"]) == pytest.approx(loss[points // 2, points // 2], rel=1e-12)
        i, j = 1, points - 2
        with torch.no_grad():
            getattr(model.rnn, x_parameter)[x_row, 0] = surface["x"][i]
            getattr(model.rnn, y_parameter)[y_row, 0] = surface["y"][j]
        train = data["train"]
        assert loss[i, j] == pytest.approx(_free_run_mse(model, train.inputs, train.targets, washout), rel=1e-10)


def test_monitor_statistics_equal_the_monitor_files(report: Report) -> None:
    every = QUICK["benchmark"]["every"]
    for row in _rows(report, "benchmark"):
        with (report.out / "monitor" / f"{row['kind']}-seed{row['seed']}" / "monitor.csv").open() as file:
            records = list(csv.DictReader(file))
        steps = [int(record["step"]) for record in records]
        assert steps == list(range(0, int(row["steps"]), every)) and int(row["records"]) == len(records)
        norms = [float(record["gradient_norm"]) for record in records]
        local = [float(record["largest_local_gradient"]) for record in records]
        horizons = [int(record["horizon"]) for record in records]
        assert float(row["gradient_norm_median"]) == pytest.approx(np.median(norms), rel=1e-12)
        assert float(row["gradient_norm_max"]) == pytest.approx(max(norms), rel=1e-12)
        assert float(row["local_median"]) == pytest.approx(np.median(local), rel=1e-12)
        assert float(row["local_max"]) == pytest.approx(max(local), rel=1e-12)
        assert float(row["horizon_median"]) == pytest.approx(np.median(horizons), rel=1e-12)
        assert row["local_exploded"] == str(any(record["local_exploded"] == "True" for record in records))
        # no clipping: every recorded norm is one of the norms whose maximum the train history keeps
        assert float(row["gradient_norm_max_every_step"]) >= max(norms) * (1 - 1e-5)
