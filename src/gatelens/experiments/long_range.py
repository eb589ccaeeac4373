"""`long-range`: GRU, Elman RNN, LSTM and GRU with chrono initialisation on the adding and copy tasks over a range of
sequence lengths: how often each learns the task, and its gradient horizon before and after training.

Runs. For each task, length, architecture and seed s, the data set is generated with seed s (N = ``sequences``
sequences, cut by :meth:`Dataset.split` into train, validation and test at ``split``), the model is
``build_model(kind, I, hidden, O, seed=s)`` and is fitted by ``train(..., seed=s)`` with the preset's ``epochs``,
``batch_size``, ``lr``, ``clip`` and ``patience``; so each seed changes both the data and the initialisation.

    architectures   "gru", "elman" (tanh), "lstm", and "gru-chrono": the GRU with chrono initialisation
                    (Tallec & Ollivier 2018), T_max = T, the sequence's number of steps (the longest lag there is)
    adding problem  T = length ∈ ``adding_steps``; success: test MSE < 0.1 × the MSE of always predicting the mean
                    training target (≈ Var y = 1/6), i.e. the model explains more than 90 % of the target variance
    copy task       delay D = length ∈ ``copy_delays``, ``copy_length`` = L symbols out of K = ``copy_symbols``, so
                    T = D + 2L; success: accuracy over the L recall steps of the test sequences ≥ 0.9 (chance: 1/K;
                    the blank steps, which any model gets right by always predicting blank, are not counted)

Gradient horizon. On a probe batch (the first ``probe`` test sequences), the gradient horizon is the first lag ℓ
at which ‖∂h_T/∂h_{T−ℓ}‖₂ < ``eps`` (``gl.propagation(gl.load(model.rnn).trace(x)).horizon(eps)[0]``; for the LSTM
h is the full state (h, c)), a sequence where it never falls below eps within the T lags counting as T; the run's
horizon is the upper median over the probe sequences (as ``gl.explain`` and ``gl.Monitor`` report it), at
initialisation and after training (the best validation weights). So every horizon is an integer in 1..T.

Tables. One row per run ("part": "run"): the test metric and its baseline and threshold, success, epochs run, the
horizons and the share of probe sequences whose norm did fall below eps. One row per task, length and architecture
("part": "summary"): the success rate over seeds, and the upper medians over seeds of the test metric and horizons.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from matplotlib.figure import Figure

import gatelens as gl
from gatelens.experiments.runner import Axis, Experiment, Outcome, Point, Settings
from gatelens.experiments.tasks import Dataset, adding_problem, copy_task
from gatelens.experiments.train import SequenceModel, build_model, train

ARCHITECTURES = {"gru": "gru", "elman": "elman", "lstm": "lstm", "gru-chrono": "gru"}  # name → build_model kind
TASKS = ("adding", "copy")
SYMBOL = {"adding": "T", "copy": "D"}  # what the length is: the adding problem's steps, the copy task's delay
LENGTHS = {"adding": "adding_steps", "copy": "copy_delays"}  # the preset's key for each task's lengths
ADDING_FACTOR = 0.1  # success: test MSE < ADDING_FACTOR × the mean predictor's MSE
COPY_ACCURACY = 0.9  # success: recall accuracy ≥ COPY_ACCURACY
MARKERS = {"gru": ("o", 9), "elman": ("s", 7), "lstm": ("^", 6), "gru-chrono": ("D", 4)}  # overlaps stay visible


def run(settings: Settings) -> Outcome:
    config = settings.config
    rows = [
        _run(task, length, architecture, seed, config)
        for task in TASKS
        for length in config[LENGTHS[task]]
        for architecture in ARCHITECTURES
        for seed in settings.seeds
    ]
    rows += _aggregate(rows)
    summary = [row for row in rows if row["part"] == "summary"]
    return Outcome(
        summary=_summary(summary, config, len(settings.seeds)),
        rows=rows,
        figures={"success_rate": _success_figure(summary), "horizon": _horizon_figure(summary)},
    )


def dataset(task: str, length: int, seed: int, config: dict) -> Dataset:
    """The whole data set of one run (before the split): the adding problem with T = length, or the copy task with
    delay D = length."""
    if task == "adding":
        return adding_problem(length, config["sequences"], seed)
    return copy_task(length, config["sequences"], seed, symbols=config["copy_symbols"], length=config["copy_length"])


def model(architecture: str, data: Dataset, seed: int, hidden: int) -> SequenceModel:
    """The untrained model of one run, built as the experiment builds it (chrono: T_max = the data's steps)."""
    chrono = float(data.steps) if architecture == "gru-chrono" else None
    return build_model(ARCHITECTURES[architecture], data.input_size, hidden, data.output_size, chrono=chrono, seed=seed)


def horizon(network: SequenceModel, probe: torch.Tensor, eps: float) -> tuple[int, float]:
    """The upper median over the probe sequences of the lag at which ‖∂h_T/∂h_{T−ℓ}‖₂ first falls below eps ("never"
    counts as T), and the share of sequences where it does fall below eps."""
    with torch.no_grad():
        lags = gl.propagation(gl.load(network.rnn).trace(probe)).horizon(eps)[0]
    reached = lags >= 0
    lags = torch.where(reached, lags, probe.shape[0])
    return int(lags.sort().values[len(lags) // 2]), float(reached.double().mean())


def point(config: Mapping[str, Any]) -> dict[str, Any]:
    """One run alone (what ``gatelens sweep`` runs per grid point): ``config`` holds the preset's keys (without
    "seeds", "adding_steps" and "copy_delays") and the run's "task", "length", "architecture" and "seed". Returns
    the measurements of its "run" row (:data:`POINT_METRICS`), the same numbers the experiment computes."""
    row = _run(config["task"], config["length"], config["architecture"], config["seed"], dict(config))
    return {key: row[key] for key in POINT_METRICS}


def _run(task: str, length: int, architecture: str, seed: int, config: dict) -> dict:
    splits = dataset(task, length, seed, config).split(config["split"])
    network = model(architecture, splits["train"], seed, config["hidden"])
    probe = splits["test"].inputs[:, : config["probe"]]
    horizon_init, reached_init = horizon(network, probe, config["eps"])
    result = train(
        network, splits, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
        clip=config["clip"], patience=config["patience"], seed=seed,
    )  # fmt: skip
    horizon_trained, reached_trained = horizon(network, probe, config["eps"])
    metric, value, baseline, threshold, success = _score(task, network, splits, config)
    return {
        "part": "run",
        "task": task,
        "length": length,
        "steps": splits["train"].steps,
        "architecture": architecture,
        "seed": seed,
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "threshold": threshold,
        "success": success,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "horizon_init": horizon_init,
        "horizon_trained": horizon_trained,
        "reached_init": reached_init,
        "reached_trained": reached_trained,
    }


def _score(task: str, network: SequenceModel, splits: dict[str, Dataset], config: dict) -> tuple:
    """(metric name, test value, baseline, threshold, success) of a trained model."""
    test = splits["test"]
    with torch.no_grad():
        predicted = network(test.inputs)
    if task == "adding":
        mse = float(((predicted[-1] - test.targets) ** 2).mean())
        baseline = float(((test.targets - splits["train"].targets.mean()) ** 2).mean())
        return "test MSE", mse, baseline, ADDING_FACTOR * baseline, mse < ADDING_FACTOR * baseline
    recall = config["copy_length"]
    accuracy = float((predicted[-recall:].argmax(-1) == test.targets[-recall:]).double().mean())
    return "recall accuracy", accuracy, 1.0 / config["copy_symbols"], COPY_ACCURACY, accuracy >= COPY_ACCURACY


def _aggregate(rows: list[dict]) -> list[dict]:
    """One "summary" row per task, length and architecture, over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["length"], row["architecture"]), []).append(row)
    return [
        {
            "part": "summary",
            "task": task,
            "length": length,
            "steps": runs[0]["steps"],
            "architecture": architecture,
            "runs": len(runs),
            "success_rate": sum(run["success"] for run in runs) / len(runs),
            "value_median": _upper_median([run["value"] for run in runs]),
            "horizon_init": _upper_median([run["horizon_init"] for run in runs]),
            "horizon_trained": _upper_median([run["horizon_trained"] for run in runs]),
        }
        for (task, length, architecture), runs in groups.items()
    ]


def _upper_median(values: list) -> float | int:
    return sorted(values)[len(values) // 2]


def _summary(summary: list[dict], config: dict, seeds: int) -> str:
    criteria = {
        "adding": f"test MSE < {ADDING_FACTOR:g} × the MSE of predicting the mean target",
        "copy": f"recall accuracy ≥ {COPY_ACCURACY:g}; chance is 1/{config['copy_symbols']}",
    }
    sentences = [f"{seeds} seed{'s' if seeds > 1 else ''} per task, length and architecture."]
    for task in TASKS:
        rows = [row for row in summary if row["task"] == task]
        lengths, symbol = sorted({row["length"] for row in rows}), SYMBOL[task]
        reached = []
        for architecture in ARCHITECTURES:
            own = [row for row in rows if row["architecture"] == architecture]
            passed = [row["length"] for row in own if row["success_rate"] >= 0.5]
            reached.append(f"{architecture} {f'{symbol} = {max(passed)}' if passed else 'none'}")
        longest = {row["architecture"]: row for row in rows if row["length"] == lengths[-1]}
        horizons = ", ".join(
            f"{name} {longest[name]['horizon_init']} → {longest[name]['horizon_trained']}" for name in ARCHITECTURES
        )
        name = "Adding problem" if task == "adding" else f"Copy task with L = {config['copy_length']} symbols"
        sentences.append(
            f"{name} ({criteria[task]}), {symbol} ∈ {{{', '.join(map(str, lengths))}}}: the longest length at which "
            f"each architecture succeeds in at least half the seeds is {', '.join(reached)}. The gradient horizon at "
            f"{symbol} = {lengths[-1]} (eps = {config['eps']:g}; at most T = {longest['gru']['steps']}, meaning never "
            f"below eps), at initialisation → after training: {horizons}."
        )
    return " ".join(sentences)


def _panels(summary: list[dict], title: str, ylabel: str, draw: Callable) -> Figure:
    """One panel per task, lengths on a log axis, each architecture drawn by ``draw(axes, rows, label, style)``."""
    figure = Figure(figsize=(10, 3.8))
    for axes, task in zip(figure.subplots(1, len(TASKS), squeeze=False)[0], TASKS):
        rows = sorted((row for row in summary if row["task"] == task), key=lambda row: row["length"])
        lengths = sorted({row["length"] for row in rows})
        for index, architecture in enumerate(ARCHITECTURES):
            marker, size = MARKERS[architecture]
            style = {"color": f"C{index}", "marker": marker, "markersize": size}
            draw(axes, [row for row in rows if row["architecture"] == architecture], architecture, style)
        axes.set_xscale("log")
        axes.set_xticks(lengths, labels=[str(length) for length in lengths])
        axes.set_xticks([], minor=True)
        axes.set_xlabel("sequence length T" if task == "adding" else "delay D")
        axes.set_ylabel(ylabel)
        axes.set_title(f"{'adding problem' if task == 'adding' else 'copy task'}: {title}")
        axes.legend(fontsize="small")
    return figure


def _success_figure(summary: list[dict]) -> Figure:
    def draw(axes, rows: list[dict], architecture: str, style: dict) -> None:
        axes.plot([row["length"] for row in rows], [row["success_rate"] for row in rows], label=architecture, **style)
        axes.set_ylim(-0.05, 1.05)

    return _panels(summary, "success rate", "success rate over seeds", draw)


def _horizon_figure(summary: list[dict]) -> Figure:
    def draw(axes, rows: list[dict], architecture: str, style: dict) -> None:
        lengths = [row["length"] for row in rows]
        if architecture == next(iter(ARCHITECTURES)):  # the ceiling first: a horizon never exceeds T
            axes.plot(lengths, [row["steps"] for row in rows], color="grey", linestyle=":", label="T (never below eps)")
        axes.plot(lengths, [row["horizon_init"] for row in rows], linestyle="--", fillstyle="none", **style)
        axes.plot(lengths, [row["horizon_trained"] for row in rows], label=architecture, **style)

    return _panels(summary, "horizon (dashed: init, solid: trained)", "gradient horizon (steps)", draw)


POINT_METRICS = (
    "steps", "metric", "value", "baseline", "threshold", "success", "epochs_run", "best_epoch", "horizon_init",
    "horizon_trained", "reached_init", "reached_trained",
)  # fmt: skip
POINT_SETTINGS = (
    "copy_length",
    "copy_symbols",
    "sequences",
    "split",
    "hidden",
    "epochs",
    "batch_size",
    "lr",
    "clip",
    "patience",
    "eps",
    "probe",
)  # fmt: skip  (the preset's keys a run reads; "seeds", "adding_steps" and "copy_delays" are the experiment's loops)
POINT = Point(
    run=point,
    axes={  # a point's one task, length, architecture and seed, instead of the preset's loops over them
        "task": Axis("adding (T = length) or copy (delay D = length)", choices=TASKS, default="adding"),
        "length": Axis("the adding problem's steps T or the copy task's delay D", minimum=1),
        "architecture": Axis("gru, elman (tanh), lstm or gru-chrono", choices=tuple(ARCHITECTURES)),
        "seed": Axis("seeds the data, the initialisation and the mini-batch order", default=0),
    },
    settings=POINT_SETTINGS,
    metrics=POINT_METRICS,
    figures=("success", "horizon_init", "horizon_trained"),
    x="length",
    lines="architecture",
    panels="task",
)

LONG_RANGE = Experiment(
    name="long-range",
    description="GRU vs Elman vs LSTM (and GRU with chrono init) on the adding and copy tasks over sequence lengths: "
    "success rate and gradient horizon at initialisation and after training",
    presets={
        "quick": {
            "seeds": 2,
            "adding_steps": [10, 30],
            "copy_delays": [5, 10],
            "copy_length": 2,
            "copy_symbols": 3,
            "sequences": 600,
            "split": [0.7, 0.15, 0.15],
            "hidden": 16,
            "epochs": 30,
            "batch_size": 32,
            "lr": 1e-2,
            "clip": 1.0,
            "patience": 5,
            "eps": 1e-2,  # sequences of at most 30 steps: at 1e-3 most horizons would read "never"
            "probe": 16,
        },
        "full": {
            "seeds": 3,
            "adding_steps": [25, 50, 100, 200],
            "copy_delays": [10, 25, 50, 100],
            "copy_length": 3,
            "copy_symbols": 4,
            "sequences": 1000,
            "split": [0.7, 0.15, 0.15],
            "hidden": 32,
            "epochs": 50,
            "batch_size": 32,
            "lr": 1e-2,
            "clip": 1.0,
            "patience": 10,
            "eps": 1e-3,
            "probe": 32,
        },
    },
    run=run,
    point=POINT,
)
