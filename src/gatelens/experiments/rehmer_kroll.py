"""`rehmer-kroll`: does a GRU avoid vanishing gradients, or large *local* gradients? (Rehmer & Kroll, 2020.)

GRU and Elman RNN (tanh), each with a linear head ŷ_t = W h_t + b, are trained in simulation mode (free run: the
model reads the input u alone) on simulated systems, from ``seeds`` random initialisations each (seed s builds the
model and shuffles the mini-batches; the data are the same for every seed). Each system's record is split along
time (``fractions``); the training part is cut into windows of ``window`` steps, validation and test stay whole, and
the first ``washout`` steps of every sequence are left out of loss and metrics. A run *succeeds* when its free-run
test RMSE is below ``success`` × std(y_test), the standard deviation of the test targets over the counted steps.
The local gradient of step k is ℓ(k) = ‖∂⁺h_k/∂θ‖_F over all weight blocks together, h_{k−1} held fixed
(gl.local_gradients, "all").

Academic example ("academic", "loss surface"). One-state models (H = 1, float64) fitted to the first-order system
y_t = a·y_{t−1} + b·tanh(u_t). Per kind and seed: the median, p95 and max of ℓ over the test inputs at
initialisation and after training, the free-run test RMSE and success. Loss surface: the free-run training loss
(MSE after the washout) on a grid over two parameters of the same role in both kinds, the recurrent and the input
weight of the state's nonlinearity,

    elman   h' = tanh(W_ih u + b_ih + W_hh h + b_hh)                     (W_hh, W_ih)
    gru     n  = tanh(W_in u + b_in + r·(W_hn h + b_hn)),  h' = z h + (1 − z) n      (W_hn, W_in)

each axis ±``surface_span`` around the reference model's value, every other parameter held at the reference: the
trained model with the lowest validation loss among the kind's seeds. Summary numbers: the loss range and the
finite-difference slope ‖∇L‖ (central differences on the grid), its median and its max (a cliff shows as a max far
above the median).

Benchmark-like system ("benchmark"). Models with ``hidden`` units (float32; a GRU has three times the Elman RNN's
weights per unit) fitted to the Wiener–Hammerstein system, with gl.Monitor (every ``every`` optimiser steps, on the
first ``probe`` sequences of the validation split) as a callback. Per kind and seed: the free-run test RMSE and
success, and during training the median and max of the recorded gradient norm ‖∇L‖₂ (no clipping, unless the preset
sets ``clip``: then after it), the largest gradient norm of any step (before clipping, from the train history), the
median and max of the largest local gradient, and the median of the monitor's gradient horizon (the lag ℓ at which
‖∂h_T/∂h_{T−ℓ}‖₂ first falls below 1e-3, upper median over the probe sequences: the shorter, the faster the gradient
vanishes).

Besides the runner's files the run writes loss_surface.json (per kind: the two parameters, the axes, the loss
grid, loss[i][j] at (x[i], y[j]), and the reference model's state_dict) and monitor/<kind>-seed<seed>/monitor.csv
and monitor.json (the monitor's records).
"""

from __future__ import annotations

import copy
import json
import statistics
import warnings
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

import gatelens as gl
from gatelens.experiments.monitor import Monitor, MonitorWarning
from gatelens.experiments.runner import Experiment, Outcome, Settings
from gatelens.experiments.tasks import Dataset, first_order_system, wiener_hammerstein
from gatelens.experiments.train import SequenceModel, build_model, evaluate, train

KINDS = ("gru", "elman")
F64 = torch.float64
# The two loss-surface parameters (recurrent, input) of a one-state model: (name, torch parameter, row).
SURFACE = {
    "elman": (("W_hh", "weight_hh_l0", 0), ("W_ih", "weight_ih_l0", 0)),
    "gru": (("W_hn", "weight_hh_l0", 2), ("W_in", "weight_ih_l0", 2)),  # PyTorch's gate rows are r, z, n
}
COLOURS = {"gru": "tab:blue", "elman": "tab:red"}


def run(settings: Settings) -> Outcome:
    config = settings.config
    academic, surfaces = _academic(settings.seeds, config["academic"])
    benchmark, records = _benchmark(settings, config["benchmark"])
    (settings.out / "loss_surface.json").write_text(json.dumps(surfaces, indent=1), encoding="utf-8")
    rows = academic + [_surface_row(kind, surface) for kind, surface in surfaces.items()] + benchmark
    return Outcome(
        summary=_summary(rows, config),
        rows=rows,
        figures={
            "loss_surface": _surface_figure(surfaces),
            "academic_local_gradients": _local_figure(academic),
            "benchmark_training": _training_figure(records),
        },
    )


def simulation_data(config: dict, dtype: torch.dtype) -> dict[str, Dataset]:
    """The splits of one part's system: train cut into windows of ``window`` steps, validation and test whole."""
    if config["system"] == "first_order_system":
        data = first_order_system(
            config["steps"], config["sequences"], config["data_seed"], a=config["a"], b=config["b"],
            noise_std=config["noise_std"], dtype=dtype,
        )  # fmt: skip
    else:
        data = wiener_hammerstein(
            config["steps"], config["sequences"], config["data_seed"], noise_std=config["noise_std"], dtype=dtype
        )
    parts = data.split(config["fractions"])
    return parts | {"train": parts["train"].windows(config["window"])}


def success_threshold(test: Dataset, washout: int, ratio: float) -> float:
    """``ratio`` × the standard deviation of the test targets over the counted steps (t > washout)."""
    return ratio * float(test.targets[washout:].double().std())


def local_statistics(model: SequenceModel, inputs: Tensor) -> dict[str, float]:
    """Median, p95 and max of ‖∂⁺h_k/∂θ‖_F (all blocks) over the steps and sequences of ``inputs`` (T, N, I)."""
    summary = gl.local_gradients(gl.load(model.rnn).trace(inputs)).summary()["all"]
    return {name: summary[name] for name in ("median", "p95", "max")}


def set_surface_parameters(model: SequenceModel, values: tuple[float, float]) -> None:
    """Set the kind's two loss-surface parameters (recurrent, input; see :data:`SURFACE`) of a one-state model."""
    with torch.no_grad():
        for (_, parameter, row), value in zip(SURFACE[model.kind], values):
            getattr(model.rnn, parameter)[row, 0] = value


def _surface_values(model: SequenceModel) -> tuple[float, float]:
    return tuple(float(getattr(model.rnn, parameter).detach()[row, 0]) for _, parameter, row in SURFACE[model.kind])


# ---------------------------------------------------------------------------------------------------------------
# academic example


def _academic(seeds: tuple[int, ...], config: dict) -> tuple[list[dict], dict[str, dict]]:
    """One-state GRU and Elman models on the first-order system: a row per kind and seed, and the loss surfaces."""
    data = simulation_data(config, F64)
    washout = config["washout"]
    threshold = success_threshold(data["test"], washout, config["success"])
    probe = data["test"].inputs
    rows, surfaces = [], {}
    for kind in KINDS:
        models = {}
        for seed in seeds:
            model = build_model(kind, 1, 1, 1, seed=seed, dtype=F64)
            initial = local_statistics(model, probe)
            result = train(
                model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                patience=config["patience"], washout=washout, seed=seed,
            )  # fmt: skip
            models[seed] = (model, result.best_validation_loss)
            trained = local_statistics(model, probe)
            rmse = result.metrics["test"]["rmse"]
            recurrent, input_weight = _surface_values(model)
            rows.append(
                {
                    "part": "academic",
                    "kind": kind,
                    "seed": seed,
                    "epochs": len(result.history),
                    "best_epoch": result.best_epoch,
                    "test_rmse": rmse,
                    "threshold": threshold,
                    "success": rmse < threshold,
                    **{f"local_init_{name}": value for name, value in initial.items()},
                    **{f"local_trained_{name}": value for name, value in trained.items()},
                    "recurrent_weight": recurrent,
                    "input_weight": input_weight,
                }
            )
        reference = min(models, key=lambda seed: models[seed][1])  # the lowest validation loss; ties: first seed
        surfaces[kind] = _surface(models[reference][0], data["train"], config) | {"reference_seed": reference}
    return rows, surfaces


def _surface(reference: SequenceModel, train_split: Dataset, config: dict) -> dict[str, Any]:
    """The free-run training loss on a (points × points) grid around the reference's two surface parameters."""
    model = copy.deepcopy(reference)
    centre = _surface_values(reference)
    offsets = np.linspace(-config["surface_span"], config["surface_span"], config["surface_points"])
    xs, ys = (centre[0] + offsets).tolist(), (centre[1] + offsets).tolist()
    loss = []
    for x in xs:
        line = []
        for y in ys:
            set_surface_parameters(model, (x, y))
            line.append(evaluate(model, train_split, washout=config["washout"])["loss"])
        loss.append(line)
    (x_name, _, _), (y_name, _, _) = SURFACE[reference.kind]
    return {
        "x_parameter": x_name,
        "y_parameter": y_name,
        "x": xs,
        "y": ys,
        "loss": loss,
        "reference": {"x": centre[0], "y": centre[1]},
        "reference_state": {name: value.tolist() for name, value in reference.state_dict().items()},
    }


def _surface_row(kind: str, surface: dict) -> dict[str, Any]:
    """Summary numbers of one loss surface: range, where its minimum lies, and the finite-difference slopes."""
    loss, xs, ys = np.array(surface["loss"]), np.array(surface["x"]), np.array(surface["y"])
    slope = np.hypot(*np.gradient(loss, xs, ys))
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    middle = len(xs) // 2
    return {
        "part": "loss surface",
        "kind": kind,
        "x_parameter": surface["x_parameter"],
        "y_parameter": surface["y_parameter"],
        "reference_seed": surface["reference_seed"],
        "x_reference": surface["reference"]["x"],
        "y_reference": surface["reference"]["y"],
        "grid": f"{len(xs)}×{len(ys)}",
        "loss_at_reference": float(loss[middle, middle]),
        "loss_min": float(loss.min()),
        "x_at_min": float(xs[i]),
        "y_at_min": float(ys[j]),
        "loss_median": float(np.median(loss)),
        "loss_max": float(loss.max()),
        "slope_median": float(np.median(slope)),
        "slope_max": float(slope.max()),
    }


# ---------------------------------------------------------------------------------------------------------------
# benchmark-like system


def _benchmark(settings: Settings, config: dict) -> tuple[list[dict], dict[str, list[list[dict]]]]:
    """GRU and Elman on the Wiener–Hammerstein system, watched by gl.Monitor: a row per kind and seed."""
    data = simulation_data(config, torch.float32)
    washout = config["washout"]
    threshold = success_threshold(data["test"], washout, config["success"])
    probe = data["validation"].inputs[:, : config["probe"]]
    rows, records = [], {kind: [] for kind in KINDS}
    for kind in KINDS:
        for seed in settings.seeds:
            model = build_model(kind, 1, config["hidden"], 1, seed=seed)
            out = settings.out / "monitor" / f"{kind}-seed{seed}"
            monitor = Monitor(probe, every=config["every"], out=out, tensorboard=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MonitorWarning)  # the flags in the records say the same
                result = train(
                    model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                    clip=config["clip"], patience=config["patience"], washout=washout, seed=seed,
                    callbacks=(monitor,),
                )  # fmt: skip
            records[kind].append(monitor.records)
            norms = [row["gradient_norm"] for row in monitor.records]
            local = [row["largest_local_gradient"] for row in monitor.records]
            rmse = result.metrics["test"]["rmse"]
            rows.append(
                {
                    "part": "benchmark",
                    "kind": kind,
                    "seed": seed,
                    "hidden": config["hidden"],
                    "epochs": len(result.history),
                    "best_epoch": result.best_epoch,
                    "steps": result.steps,
                    "test_rmse": rmse,
                    "threshold": threshold,
                    "success": rmse < threshold,
                    "records": len(monitor.records),
                    "gradient_norm_median": statistics.median(norms),
                    "gradient_norm_max": max(norms),
                    "gradient_norm_max_every_step": max(epoch.gradient_norm_max for epoch in result.history),
                    "local_median": statistics.median(local),
                    "local_max": max(local),
                    "horizon_median": statistics.median(row["horizon"] for row in monitor.records),
                    "local_exploded": any(row["local_exploded"] for row in monitor.records),
                }
            )
    return rows, records


# ---------------------------------------------------------------------------------------------------------------
# summary and figures


def _summary(rows: list[dict], config: dict) -> str:
    academic = [row for row in rows if row["part"] == "academic"]
    surfaces = {row["kind"]: row for row in rows if row["part"] == "loss surface"}
    benchmark = [row for row in rows if row["part"] == "benchmark"]
    init, trained = _medians(academic, "local_init_max"), _medians(academic, "local_trained_max")
    slopes = {kind: surfaces[kind]["slope_max"] for kind in KINDS}
    local, horizon = _medians(benchmark, "local_median"), _medians(benchmark, "horizon_median")
    first, second = config["academic"], config["benchmark"]
    return (
        f"Academic example (one-state models on the first-order system; success: free-run test RMSE < "
        f"{first['success']:g} × std(y_test)): success {_rates(academic)}. After training the local gradients are "
        f"larger in {_larger(trained)} (median over seeds of the largest ‖∂⁺h_k/∂θ‖_F on the test inputs: "
        f"{_pair(trained)}; at initialisation {_pair(init)}). Loss surfaces ±{first['surface_span']:g} around each "
        f"kind's best model, over ({surfaces['elman']['x_parameter']}, {surfaces['elman']['y_parameter']}) of the "
        f"Elman RNN and ({surfaces['gru']['x_parameter']}, {surfaces['gru']['y_parameter']}) of the GRU: the "
        f"steepest finite-difference slope is larger in {_larger(slopes)} ({_pair(slopes)}; median slope "
        f"{_pair({kind: surfaces[kind]['slope_median'] for kind in KINDS})}). Benchmark (Wiener–Hammerstein, "
        f"{second['hidden']} hidden units; success: test RMSE < {second['success']:g} × std(y_test)): success "
        f"{_rates(benchmark)}, median test RMSE {_pair(_medians(benchmark, 'test_rmse'))}. During training the "
        f"largest local gradient is larger in {_larger(local)} (median over seeds of its median: {_pair(local)}); "
        f"median gradient norm {_pair(_medians(benchmark, 'gradient_norm_median'))}; the gradient horizon (lags "
        f"until ‖∂h_T/∂h_(T−ℓ)‖₂ < 1e-3) is longer in {_larger(horizon)} (median {_pair(horizon, '.0f')} steps), "
        "whose gradient vanishes more slowly."
    )


def _medians(rows: list[dict], column: str) -> dict[str, float]:
    return {kind: statistics.median(row[column] for row in rows if row["kind"] == kind) for kind in KINDS}


def _rates(rows: list[dict]) -> str:
    parts = []
    for kind in KINDS:
        runs = [row["success"] for row in rows if row["kind"] == kind]
        parts.append(f"{_name(kind)} {sum(runs)}/{len(runs)}")
    return ", ".join(parts)


def _pair(values: dict[str, float], spec: str = ".3g") -> str:
    return " vs ".join(f"{_name(kind)} {values[kind]:{spec}}" for kind in KINDS)


def _larger(values: dict[str, float]) -> str:
    """The kind whose value is the larger ("the GRU", "the Elman RNN"), or "neither kind (equal)"."""
    if values["gru"] == values["elman"]:
        return "neither kind (equal)"
    return f"the {_name(max(KINDS, key=lambda kind: values[kind]))}"


def _name(kind: str) -> str:
    return {"gru": "GRU", "elman": "Elman RNN"}[kind]


def _surface_figure(surfaces: dict[str, dict]) -> Figure:
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    axes = figure.subplots(1, len(surfaces))
    every = np.concatenate([np.ravel(surface["loss"]) for surface in surfaces.values()])
    norm = LogNorm(vmin=max(every.min(), 1e-12), vmax=max(every.max(), 1e-12))
    mesh = None
    for ax, (kind, surface) in zip(axes, surfaces.items()):
        loss = np.clip(np.array(surface["loss"]), norm.vmin, None)
        mesh = ax.pcolormesh(surface["x"], surface["y"], loss.T, norm=norm, shading="nearest", cmap="viridis")
        ax.plot(surface["reference"]["x"], surface["reference"]["y"], "w*", markersize=12, label="reference")
        ax.set_xlabel(surface["x_parameter"])
        ax.set_ylabel(surface["y_parameter"])
        ax.set_title(f"{_name(kind)} (reference: seed {surface['reference_seed']})")
        ax.legend(loc="upper right")
    figure.colorbar(mesh, ax=axes, label="free-run training loss (MSE)")
    figure.suptitle("Loss surface of one-state models over two parameters of the state's nonlinearity")
    return figure


def _local_figure(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(7, 3.8))
    ax = figure.subplots()
    labels = []
    for kind in KINDS:
        for stage in ("init", "trained"):
            values = [row[f"local_{stage}_max"] for row in rows if row["kind"] == kind]
            marker = "x" if stage == "init" else "o"
            ax.scatter([len(labels)] * len(values), values, color=COLOURS[kind], alpha=0.6, marker=marker)
            labels.append(f"{_name(kind)}\n{'at initialisation' if stage == 'init' else 'trained'}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_yscale("log")
    ax.set_ylabel("largest local gradient ‖∂⁺h_k/∂θ‖")
    ax.set_title("One-state models on the test inputs, one point per seed")
    return figure


def _training_figure(records: dict[str, list[list[dict]]]) -> Figure:
    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, column, title in zip(
        axes, ("gradient_norm", "largest_local_gradient"), ("gradient norm ‖∇L‖₂", "largest local gradient")
    ):
        for kind, runs in records.items():
            for index, run_records in enumerate(runs):
                steps = [row["step"] for row in run_records]
                values = [max(row[column], 1e-300) for row in run_records]
                label = None if index else _name(kind)
                ax.plot(steps, values, color=COLOURS[kind], alpha=0.35, linewidth=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(title)
        ax.legend()
    figure.suptitle("Wiener–Hammerstein: during training, one line per seed")
    return figure


REHMER_KROLL = Experiment(
    name="rehmer-kroll",
    description="GRU vs Elman (Rehmer & Kroll 2020): loss surfaces, local gradients and success over initialisations",
    presets={
        "quick": {
            "seeds": 3,
            "academic": {
                "system": "first_order_system",
                "data_seed": 0,
                "steps": 1000,
                "sequences": 4,
                "a": 0.9,
                "b": 0.1,
                "noise_std": 0.0,
                "fractions": [0.7, 0.15, 0.15],
                "window": 50,
                "washout": 10,
                "epochs": 25,
                "batch_size": 8,
                "lr": 0.02,
                "patience": 10,
                "success": 0.1,
                "surface_points": 15,
                "surface_span": 3.0,
            },
            "benchmark": {
                "system": "wiener_hammerstein",
                "data_seed": 0,
                "steps": 1500,
                "sequences": 4,
                "noise_std": 0.01,
                "fractions": [0.7, 0.15, 0.15],
                "window": 100,
                "washout": 40,
                "hidden": 4,
                "epochs": 6,
                "batch_size": 8,
                "lr": 0.01,
                "clip": None,
                "patience": 10,
                "every": 5,
                "probe": 2,
                "success": 0.1,
            },
        },
        "full": {
            "seeds": 20,
            "academic": {
                "system": "first_order_system",
                "data_seed": 0,
                "steps": 2000,
                "sequences": 4,
                "a": 0.9,
                "b": 0.1,
                "noise_std": 0.0,
                "fractions": [0.7, 0.15, 0.15],
                "window": 100,
                "washout": 20,
                "epochs": 150,
                "batch_size": 8,
                "lr": 0.02,
                "patience": 20,
                "success": 0.1,
                "surface_points": 41,
                "surface_span": 3.0,
            },
            "benchmark": {
                "system": "wiener_hammerstein",
                "data_seed": 0,
                "steps": 3000,
                "sequences": 4,
                "noise_std": 0.01,
                "fractions": [0.7, 0.15, 0.15],
                "window": 150,
                "washout": 50,
                "hidden": 8,
                "epochs": 60,
                "batch_size": 8,
                "lr": 0.01,
                "clip": None,
                "patience": 15,
                "every": 10,
                "probe": 4,
                "success": 0.1,
            },
        },
    },
    run=run,
)
