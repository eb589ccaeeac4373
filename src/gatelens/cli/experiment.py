"""``gatelens experiment NAME [--preset quick|full] [--seeds N] [--out DIR]``: run one experiment."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from gatelens.cli.common import add_common_options, print_json
from gatelens.experiments.catalog import EXPERIMENTS, experiment
from gatelens.experiments.runner import PRESETS


def register(commands: Any) -> None:
    command = commands.add_parser(
        "experiment",
        help="run one of the experiments behind gatelens' claims and write its results folder",
        description="Run an experiment and write results.csv, results.md, config.json and figures into --out.",
        epilog="example: gatelens experiment seed-cases --preset quick --out results/seed-cases",
    )
    command.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}")
    command.add_argument("--preset", default="quick", help=f"{' or '.join(PRESETS)} (default: quick, a few minutes)")
    command.add_argument("--seeds", type=int, default=None, help="number of random seeds (default: the preset's)")
    command.add_argument("--out", default=None, help="results folder (default: gatelens-results/NAME)")
    command.add_argument("--json", action="store_true", help="print the summary and rows as JSON on stdout")
    add_common_options(command)
    command.set_defaults(handler=run)


def run(arguments: argparse.Namespace, console: Console) -> int:
    out = arguments.out or f"gatelens-results/{arguments.name}"
    with console.status(f"running {arguments.name} ({arguments.preset})"):
        report = experiment(arguments.name, preset=arguments.preset, seeds=arguments.seeds, out=out)
    files = [str(path) for path in report.files]
    if arguments.json:
        print_json(
            {"summary": report.outcome.summary, "out": str(report.out), "files": files, "rows": report.outcome.rows}
        )
    else:
        console.print(report.outcome.summary)
    console.print(f"results in {report.out}: " + ", ".join(path.name for path in report.files))
    return 0
