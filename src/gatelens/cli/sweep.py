"""``gatelens sweep SPEC.toml [--scheduler tcp://HOST:8786] [--workers N] [--out DIR] [--resume]``: run an
experiment over a grid on a local or remote Dask cluster (see gatelens.sweep and docs/sweeps.md).

Progress goes to stderr; the summary, the aggregate table and the list of files to stdout. Exit status 0 when every
point has a row and none failed, 1 when some failed or were lost, 2 on bad input (nothing run), 130 on Ctrl-C
(the rows written so far stay; --resume completes the sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from gatelens.cli.common import add_common_options
from gatelens.sweep import SweepResult, read_spec, sweep
from gatelens.sweep.driver import default_folder
from gatelens.sweep.table import RESULTS


def register(commands: Any) -> None:
    command = commands.add_parser(
        "sweep",
        help="run an experiment over a grid (architectures × lengths × seeds …) on a local or remote Dask cluster",
        description="Run an experiment's per-point function for every point of the grid in SPEC, on a local cluster "
        "of worker processes or on a running Dask scheduler, writing each point's row to DIR/results.csv as soon as "
        "it finishes; then summary.csv, summary.md and figures.",
        epilog="example: gatelens sweep adding.toml --workers 4 --out results/adding    (docs/sweeps.md: the spec, "
        "and the same sweep on a cluster of several machines)",
    )
    command.add_argument("spec", metavar="SPEC.toml", help="experiment, preset, [settings] and [grid] (docs/sweeps.md)")
    command.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a running Dask scheduler, e.g. tcp://HOST:8786 (default: a local cluster)",
    )
    command.add_argument(
        "--workers", type=int, metavar="N", help="local worker processes (default: one per CPU, at most one per point)"
    )
    command.add_argument("--out", metavar="DIR", help="results folder (default: gatelens-results/sweep-NAME)")
    command.add_argument("--resume", action="store_true", help="run only the points that have no row in DIR yet")
    command.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the scheduler's answer (10)"
    )
    add_common_options(command)
    command.set_defaults(handler=run)


def run(arguments: argparse.Namespace, console: Console) -> int:
    errors = Console(stderr=True)
    try:
        with quiet_dask():
            result = sweep(
                arguments.spec, out=arguments.out, scheduler=arguments.scheduler, workers=arguments.workers,
                resume=arguments.resume, timeout=arguments.timeout, progress=True, console=errors,
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"gatelens: interrupted; {_written(arguments)} run the same command with --resume to complete it",
              file=sys.stderr)  # fmt: skip
        return 130
    _report(result, console)
    return 0 if result.complete and not result.failed else 1


def _report(result: SweepResult, console: Console) -> None:
    console.print(result.text)
    if result.summary:
        point = result.spec.point
        keep = [key for key in result.summary[0] if key in result.spec.grid or key in ("points", "ok", "failed")]
        keep += [f"{metric}_{kind}" for metric in point.figures for kind in ("rate", "median")]
        columns = [key for key in keep if key in result.summary[0]]
        table = Table(title="summary (all columns in summary.csv)", title_justify="left")
        for column in columns:
            table.add_column(column, justify="left" if column in result.spec.grid else "right", overflow="fold")
        for row in result.summary:
            table.add_row(*(_cell(row[column]) for column in columns))
        console.print(table)
    console.print(f"results in {result.out}: " + ", ".join(path.name for path in result.files))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _written(arguments: argparse.Namespace) -> str:
    """How many rows the interrupted sweep's table holds, as a clause."""
    try:
        folder = arguments.out or default_folder(read_spec(arguments.spec))
        with open(f"{folder}/{RESULTS}", encoding="utf-8") as file:
            rows = max(sum(1 for _ in file) - 1, 0)
    except (OSError, ValueError, TypeError):
        return "the rows written so far stay;"
    return f"{rows} row{'s' if rows != 1 else ''} in {folder}/{RESULTS};"


@contextlib.contextmanager
def quiet_dask() -> Iterator[None]:
    """Dask's own log lines (workers starting, a worker lost) below CRITICAL stay out of the terminal: the progress
    line and the summary say what happened."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
