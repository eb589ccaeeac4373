"""The ``gatelens`` command line.

    gatelens experiment NAME [--preset quick|full] [--seeds N] [--out DIR] [--debug]

A problem with the input (an unknown name or preset, a bad seed count, an unwritable folder) prints one line
saying what is wrong and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from gatelens.experiments.catalog import EXPERIMENTS, experiment
from gatelens.experiments.runner import PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelens", description="Exact gradient flow through time in RNNs.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "experiment",
        help="run one of the experiments behind gatelens' claims and write its results folder",
        description="Run an experiment and write results.csv, results.md, config.json and figures into --out.",
        epilog="example: gatelens experiment seed-cases --preset quick --out results/seed-cases",
    )
    run.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}")
    run.add_argument("--preset", default="quick", help=f"{' or '.join(PRESETS)} (default: quick, a few minutes)")
    run.add_argument("--seeds", type=int, default=None, help="number of random seeds (default: the preset's)")
    run.add_argument("--out", default=None, help="results folder (default: gatelens-results/NAME)")
    run.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gatelens`` command; returns the exit status."""
    arguments = _parser().parse_args(argv)
    console = Console()
    try:
        out = arguments.out or f"gatelens-results/{arguments.name}"
        with console.status(f"running {arguments.name} ({arguments.preset})"):
            report = experiment(arguments.name, preset=arguments.preset, seeds=arguments.seeds, out=out)
    except (ValueError, TypeError) as error:
        if arguments.debug:
            raise
        print(f"gatelens: error: {error}", file=sys.stderr)
        return 2
    console.print(report.outcome.summary)
    console.print(f"results in {report.out}: " + ", ".join(path.name for path in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
