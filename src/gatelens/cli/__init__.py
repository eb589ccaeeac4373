"""The ``gatelens`` command line: one module per command, one dispatcher here.

    gatelens demo        train a GRU and an Elman RNN briefly, run every analysis, write an HTML report
    gatelens analyze     every analysis of a saved model on an input; results.json, figures and report.html
    gatelens explain     the findings only
    gatelens jacobians   the per-step Jacobians and their paths, streamed to a .npz
    gatelens credit      a credit map, streamed to a .npz
    gatelens experiment  one of the experiments behind gatelens' claims
    gatelens sweep       an experiment over a grid, on a local or remote Dask cluster

Each command module has ``register(commands)``, which adds its parser and sets ``handler`` to a function
``(arguments, console) -> int``. A problem with the input prints one line, ``gatelens: error: …``, and exits with
status 2; ``--debug`` shows the traceback instead. A warning (such as an input layout that looks swapped) prints
one line, ``gatelens: warning: …``, on stderr.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from gatelens import __version__
from gatelens.cli import analyze, arrays, demo, experiment, sweep

COMMANDS = (demo, analyze, arrays, experiment, sweep)


def parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command's sub-parser."""
    top = argparse.ArgumentParser(
        prog="gatelens",
        description="Exact gradient flow through time in GRUs, Elman RNNs and LSTMs.",
        epilog="example: gatelens demo    (then open gatelens-demo/report.html)",
    )
    top.add_argument("--version", action="version", version=f"gatelens {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gatelens`` command; returns the exit status."""
    arguments = parser().parse_args(argv)
    console = Console(stderr=bool(getattr(arguments, "json", False)))  # --json keeps stdout for the JSON alone
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line
            return arguments.handler(arguments, console)
    except KeyboardInterrupt:
        print("gatelens: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line unless --debug
        if arguments.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"gatelens: error: {message}", file=sys.stderr)
        return 2


def _one_line(message: Warning | str, category: type[Warning], *details: Any, **options: Any) -> None:
    """Show a warning as one line on stderr, without the source line Python's default format adds."""
    print(f"gatelens: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
