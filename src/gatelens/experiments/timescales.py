"""`timescales`: does a unit's mean update gate say how long inputs influence it? Measured.

A GRU (PyTorch's convention: h' = z ⊙ h + (1 − z) ⊙ n, so z is the share kept) is trained on the multi-timescale
task: one ±1 input channel and one target per delay d_j, y_{t,j} = x_{t−d_j}. After training, on test sequences:

    gate timescale       z̄_j (the unit's mean update gate) and τ_gate = 1 / (1 − z̄_j)      (gl.regimes)
    influence timescale  τ_infl = Σ_ℓ ℓ I_j(ℓ) / Σ_ℓ I_j(ℓ),  I_j(ℓ) = mean ‖∂h_t[j]/∂x_{t−ℓ}‖  (gl.input_influence)

over anchors t in the second half of each sequence. For a unit that only carried its value, τ_infl = τ_gate − 1
exactly; the recurrent paths (update, candidate, reset) make the two differ. The table gives both per unit, the
Spearman rank correlation between z̄ and τ_infl per seed, and the test RMSE per delay (how well each delay was
learned; predicting 0 gives RMSE 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

import gatelens as gl
from gatelens.experiments.runner import Axis, Experiment, Outcome, Point, Settings
from gatelens.experiments.tasks import multi_timescale
from gatelens.experiments.train import build_model, predict, train


def run(settings: Settings) -> Outcome:
    config = settings.config
    results = [_one_seed(seed, config) for seed in settings.seeds]
    runs = [run_row for run_row, _, _ in results]
    units = [row for _, unit_rows, _ in results for row in unit_rows]
    return Outcome(
        summary=_summary(runs, units, config),
        rows=runs + units,
        figures={"gate_vs_influence": _scatter(units), "influence_profiles": _profiles(results[0][2])},
    )


def point(config: Mapping[str, Any]) -> dict[str, Any]:
    """One seed's run alone (what ``gatelens sweep`` runs per grid point): ``config`` holds the preset's keys (without
    "seeds") and the run's "seed". Returns its "runs" row's numbers (:data:`POINT_METRICS`; "epochs_run" is the row's
    "epochs", the number of epochs trained), with the test RMSE per delay as one list in the order of ``delays``,
    and their mean, "rmse_mean"."""
    row, _, _ = _one_seed(config["seed"], dict(config))
    errors = [row[f"rmse_delay_{delay}"] for delay in config["delays"]]
    return {
        "epochs_run": row["epochs"],
        "rmse_by_delay": errors,
        "rmse_mean": sum(errors) / len(errors),
        **{key: row[key] for key in ("spearman_gate_influence", "long_term_units", "short_term_units")},
    }


def _one_seed(seed: int, config: dict) -> tuple[dict, list[dict], gl.InputInfluence]:
    """Train one GRU and measure both timescales of each of its units."""
    delays = tuple(config["delays"])
    data = multi_timescale(config["steps"], config["sequences"], seed, delays=delays).split()
    model = build_model("gru", 1, config["hidden"], len(delays), seed=seed)
    result = train(model, data, epochs=config["epochs"], lr=config["lr"], batch_size=32, patience=10, seed=seed)
    test = data["test"]
    with torch.no_grad():
        errors = (predict(model, test.inputs) - test.targets).square().mean((0, 1)).sqrt()
    probe = test.inputs[:, : config["probe"]]
    trace = gl.load(model.rnn).trace(probe)
    regime = gl.regimes(trace)
    steps = probe.shape[0]
    influence = gl.input_influence(trace, anchors=list(range(steps // 2, steps)), max_lag=steps // 2)
    spearman = _spearman(regime.mean_carry, influence.timescale)
    run_row = {
        "part": "runs",
        "seed": seed,
        "epochs": len(result.history),
        **{f"rmse_delay_{d}": float(e) for d, e in zip(delays, errors)},
        "spearman_gate_influence": spearman,
        "long_term_units": len(regime.units("long-term")),
        "short_term_units": len(regime.units("short-term")),
    }
    unit_rows = [
        {
            "part": "units",
            "seed": seed,
            "unit": label,
            "mean_update_gate": float(z),
            "mean_reset_gate": float(r),
            "tau_gate": float(tau),
            "tau_influence": float(measured),
            "kind": kind,
        }
        for label, z, r, tau, measured, kind in zip(
            regime.unit_labels,
            regime.mean_carry,
            regime.mean_gate,
            regime.timescale,
            influence.timescale,
            regime.unit_kind,
        )
    ]
    return run_row, unit_rows, influence


def _spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two (U,) vectors (Pearson's on their ranks; ties broken by order)."""
    ranks = [values.argsort().argsort().double() for values in (a, b)]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def _summary(runs: list[dict], units: list[dict], config: dict) -> str:
    rho = sorted(row["spearman_gate_influence"] for row in runs)
    long_term = sorted(row["tau_influence"] for row in units if row["kind"] == "long-term")
    short_term = sorted(row["tau_influence"] for row in units if row["kind"] == "short-term")

    def median(values: list[float]) -> str:
        return f"{values[len(values) // 2]:.1f} steps" if values else "none"

    return (
        f"GRUs with {config['hidden']} units trained on delays {tuple(config['delays'])} over {len(runs)} seeds. "
        f"The rank correlation between a unit's mean update gate and how long inputs influence it is ρ = "
        f"{rho[len(rho) // 2]:.2f} (median; range {rho[0]:.2f} to {rho[-1]:.2f}). Units labelled long-term by their "
        f"gate (τ_gate ≥ 10) have a median influence timescale of {median(long_term)} ({len(long_term)} units); "
        f"short-term units (τ_gate ≤ 2) {median(short_term)} ({len(short_term)} units)."
    )


def _scatter(units: list[dict]) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for seed in sorted({row["seed"] for row in units}):
        rows = [row for row in units if row["seed"] == seed]
        axes.scatter(
            [row["mean_update_gate"] for row in rows],
            [row["tau_influence"] for row in rows],
            s=14,
            label=f"seed {seed}",
        )
    gates = torch.linspace(0.01, 0.99, 99)
    axes.plot(gates, gates / (1 - gates), color="grey", linestyle="--", label="carry only: z̄ / (1 − z̄)")
    axes.set_yscale("log")
    axes.set_xlabel("mean update gate z̄ of the unit")
    axes.set_ylabel("influence timescale τ_infl (steps)")
    axes.set_title("Update gate vs measured input influence, per unit")
    axes.legend(fontsize="small")
    return figure


def _profiles(influence: gl.InputInfluence) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    order = influence.timescale.argsort()
    for index in (int(order[0]), int(order[len(order) // 2]), int(order[-1])):
        profile = influence.profile[:, index]
        label = f"{influence.state_labels[index]} (τ_infl = {float(influence.timescale[index]):.1f})"
        axes.semilogy(range(len(profile)), profile.clamp_min(1e-300).tolist(), label=label)
    axes.set_xlabel("lag ℓ (steps)")
    axes.set_ylabel("mean ‖∂h_t[j]/∂x_(t−ℓ)‖")
    axes.set_title("Input influence by lag: shortest, median and longest unit (seed 0)")
    axes.legend(fontsize="small")
    return figure


POINT_METRICS = (
    "epochs_run", "rmse_by_delay", "rmse_mean", "spearman_gate_influence", "long_term_units", "short_term_units",
)  # fmt: skip
POINT = Point(
    run=point,
    axes={"seed": Axis("seeds the data, the initialisation and the mini-batch order", default=0)},
    settings=("steps", "sequences", "delays", "hidden", "epochs", "lr", "probe"),
    metrics=POINT_METRICS,
    figures=("spearman_gate_influence", "rmse_mean"),
    x="hidden",
)

TIMESCALES = Experiment(
    name="timescales",
    description="a GRU trained on inputs with known delays: each unit's mean update gate vs its measured influence",
    presets={
        "quick": {
            "seeds": 2,
            "steps": 40,
            "sequences": 256,
            "delays": [1, 3, 6],
            "hidden": 16,
            "epochs": 60,
            "lr": 1e-2,
            "probe": 32,
        },
        "full": {
            "seeds": 5,
            "steps": 100,
            "sequences": 2048,
            "delays": [1, 5, 10, 20],
            "hidden": 64,
            "epochs": 200,
            "lr": 5e-3,
            "probe": 64,
        },
    },
    run=run,
    point=POINT,
)
