"""What the commands share: the options every command has."""

from __future__ import annotations

import argparse


def add_common_options(command: argparse.ArgumentParser) -> None:
    """Options every command has."""
    command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
