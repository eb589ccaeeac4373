"""``gatelens demo [--out DIR]``: a GRU and an Elman RNN of the same size, trained briefly on the adding problem,
then every analysis of both, their findings side by side, and a report folder.

The adding problem (T steps; inputs (value, marker); the target is the sum of the two marked values, one marker in
each half) needs memory across up to T − 1 steps. With the defaults (T = 100, 16 units, 30 epochs of Adam) the GRU
solves it and the Elman RNN stays at the mean predictor: the analyses show why (its gradient horizon, its
regimes, its Lyapunov exponents). The credit maps are of the task's own loss: the squared error of the linear
head at the last step. The trained models are saved as state_dicts (``gru.pt``, ``elman.pt``) beside the
analysed inputs (``inputs.npy``), which ``gatelens analyze`` and ``explain`` read.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console

from gatelens import __version__
from gatelens.analysis import Analysis, Settings, credit
from gatelens.cli.analyze import analyze_with_progress
from gatelens.cli.common import add_common_options, print_json
from gatelens.experiments.folders import writable_folder
from gatelens.experiments.tasks import adding_problem
from gatelens.experiments.train import build_model, evaluate, train
from gatelens.io import load
from gatelens.report.findings import findings_table
from gatelens.report.folder import write_report_folder

MODELS = {"GRU": "gru", "Elman": "elman"}  # the name shown → build_model's kind
SEQUENCES = 1000
SPLIT = (0.7, 0.15, 0.15)
PROBE = 8  # test sequences the analyses run on
INPUTS = "inputs.npy"  # those sequences, saved for gatelens analyze / explain
SUCCESS = 0.1  # solved: test MSE < SUCCESS × the MSE of predicting the mean training target


def register(commands: Any) -> None:
    command = commands.add_parser(
        "demo",
        help="train a GRU and an Elman RNN on the adding problem, analyse both, write gatelens-demo/",
        description="Train a GRU and an Elman RNN of the same size briefly on the adding problem, run every "
        "analysis on both, print their findings side by side and write report.html, results.json and the figures.",
        epilog="example: gatelens demo --out gatelens-demo && open gatelens-demo/report.html",
    )
    command.add_argument("--out", default="gatelens-demo", help="results folder (default: gatelens-demo)")
    command.add_argument("--steps", type=int, default=100, help="sequence length T of the adding problem (100)")
    command.add_argument("--hidden", type=int, default=16, help="units of each model (16)")
    command.add_argument("--epochs", type=int, default=30, help="training epochs at most (30)")
    command.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batches")
    command.add_argument("--json", action="store_true", help="print results.json on stdout (messages on stderr)")
    add_common_options(command)
    command.set_defaults(handler=run)


def run(arguments: argparse.Namespace, console: Console) -> int:
    for name, low in (("steps", 2), ("hidden", 1), ("epochs", 1), ("seed", 0)):
        if getattr(arguments, name) < low:
            raise ValueError(f"--{name} must be at least {low}, got {getattr(arguments, name)}")
    out = writable_folder(arguments.out)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: a second thread only adds overhead
    try:
        splits = adding_problem(arguments.steps, SEQUENCES, arguments.seed).split(list(SPLIT))
        np.save(out / INPUTS, splits["test"].inputs[:, :PROBE].double().numpy())  # (T, PROBE, 2), what is analysed
        baseline = float(((splits["test"].targets - splits["train"].targets.mean()) ** 2).mean())
        analyses: list[Analysis] = []
        training: dict[str, dict[str, Any]] = {}
        for name, kind in MODELS.items():
            network = build_model(kind, 2, arguments.hidden, 1, seed=arguments.seed)
            console.print(
                f"training the {name} ({arguments.hidden} units) on the adding problem, T = {arguments.steps}"
            )
            result = train(
                network, splits, epochs=arguments.epochs, batch_size=32, lr=1e-2, clip=1.0, patience=5,
                seed=arguments.seed, progress=console,
            )  # fmt: skip
            mse = evaluate(network, splits["test"])["loss"]
            weights = out / f"{name.lower()}.pt"  # the whole model (rnn.*, head.*): gatelens analyze reads it
            torch.save(network.state_dict(), weights)
            training[name] = {
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "test_mse": mse,
                "solved": mse < SUCCESS * baseline,
                "weights": weights.name,
            }
            analyses.append(_analyse(name, network, splits["test"], arguments.seed, console))
    finally:
        torch.set_num_threads(threads)
    task = {
        "name": "adding problem",
        "steps": arguments.steps,
        "sequences": SEQUENCES,
        "split": list(SPLIT),
        "mean_predictor_mse": baseline,
        "success": f"test MSE < {SUCCESS} × the mean predictor's",
    }
    results = {
        "gatelens": __version__,
        "task": task,
        "training": training,
        "models": {item.name: item.to_dict() for item in analyses},
    }
    summary = [("task", f"adding problem, T = {arguments.steps}, {SEQUENCES} sequences, seed {arguments.seed}")]
    summary += [
        (name, f"{'solved' if run['solved'] else 'not solved'}: test MSE {run['test_mse']:.4f} vs {baseline:.4f} "
         f"for the mean predictor, {run['epochs_run']} epochs")
        for name, run in training.items()
    ]  # fmt: skip
    files = write_report_folder(
        out,
        analyses,
        title="gatelens demo: GRU vs Elman RNN on the adding problem",
        summary=summary,
        notes=[
            f"the analyses run on {PROBE} test sequences; credit maps are of the task's loss (MSE at the last step)"
        ],
        results=results,
    )
    if arguments.json:
        print_json(results)
    else:
        for label, text in summary:
            console.print(f"[bold]{label}[/bold]: {text}")
        console.print(findings_table({item.name: item.explanation for item in analyses}))
    elapsed = time.perf_counter() - started
    figures = sum(path.suffix == ".png" for path in files)
    console.print(f"done in {elapsed:.0f} s; open {out / 'report.html'} (results.json and {figures} figures)")
    console.print(
        f"the trained models and the analysed inputs are in {out}; analyse them again: "
        f"gatelens explain {out / 'gru.pt'} --input {out / INPUTS} --dtype float64",
        soft_wrap=True,
    )
    return 0


def _analyse(name: str, network: Any, test: Any, seed: int, console: Console) -> Analysis:
    """Every analysis of the trained network on the first PROBE test sequences, with the task's loss."""
    inputs, targets = test.inputs[:, :PROBE].double(), test.targets[:PROBE].double()
    network = network.double()
    trace = load(network.rnn).trace(inputs)
    loss_map = credit(trace, loss="last", head=network.head, targets=targets)
    return analyze_with_progress(trace, name, console, credit_map=loss_map, settings=Settings(seed=seed))
