"""Running an experiment: one command, a seed count and a preset in; a results folder out.

Every experiment is a function of its :class:`Settings` (the preset's configuration, the seeds, where to write)
that returns an :class:`Outcome`: the rows of its results table and its figures. :func:`run_experiment` checks
everything before any work starts, then writes into the output folder

    config.json    the exact configuration: experiment, preset, seeds, every parameter, package versions
    results.csv    one row per measurement
    results.md     a one-paragraph summary, then the rows as Markdown tables (one per value of a "part" column)
    *.png          the figures

so that a run is reproducible from its folder alone. Experiments run on one CPU thread (restored afterwards):
their models are small enough that a second thread only adds overhead.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from gatelens.experiments.folders import writable_folder

PRESETS = ("quick", "full")


@dataclass(frozen=True)
class Settings:
    """What one run is given: the preset's name and configuration, the seeds to use, and the output folder."""

    preset: str
    config: Mapping[str, Any]
    seeds: tuple[int, ...]
    out: Path


@dataclass(frozen=True)
class Outcome:
    """What one run found: a summary paragraph, the rows of its results table, its figures by file stem."""

    summary: str
    rows: list[dict[str, Any]]
    figures: dict[str, Figure] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    """A key that picks one run of an experiment (a task, a length, an architecture, a seed), for sweeps.

    ``choices``: the values it may take (strings); None: any int ≥ ``minimum``. ``default``: its value when a sweep
    gives none; None: a sweep must give it.
    """

    help: str
    choices: tuple[str, ...] | None = None
    minimum: int = 0
    default: Any = None


@dataclass(frozen=True)
class Point:
    """One run of an experiment as a function of its configuration, for ``gatelens sweep``: ``run(config) → metrics``.

    ``config`` holds a value for every key in ``axes`` and, for every key in ``settings``, the preset's value or a
    sweep's override of it. ``run`` returns a dict with exactly the keys ``metrics`` (numbers, bools, strings or
    lists of them) and is deterministic: every random draw comes from a generator seeded from ``config``, so the same
    configuration gives the same metrics in any process. The experiment's own ``run`` computes the same rows.
    Figures of a sweep plot the ``figures`` metrics against ``x``, one line per value of ``lines`` and one panel per
    value of ``panels`` (each used only when the sweep's grid varies it).
    """

    run: Callable[[Mapping[str, Any]], dict[str, Any]]
    axes: Mapping[str, Axis]
    settings: tuple[str, ...]
    metrics: tuple[str, ...]
    figures: tuple[str, ...] = ()
    x: str | None = None
    lines: str | None = None
    panels: str | None = None


@dataclass(frozen=True)
class Experiment:
    """A named experiment with its presets (each a configuration) and the function that runs it; ``point``, when
    set, runs one of its runs alone, so that ``gatelens sweep`` can run it over a grid."""

    name: str
    description: str
    presets: Mapping[str, Mapping[str, Any]]
    run: Callable[[Settings], Outcome]
    point: Point | None = None


@dataclass(frozen=True)
class Report:
    """Where a run wrote its results, and the outcome itself."""

    out: Path
    files: list[Path]
    outcome: Outcome


def run_experiment(
    experiment: Experiment, *, preset: str = "quick", seeds: int | None = None, out: str | os.PathLike[str]
) -> Report:
    """Run ``experiment`` with a preset (``seeds`` overrides the preset's seed count) and write its folder."""
    if preset not in experiment.presets:
        raise ValueError(f"unknown preset {preset!r} for {experiment.name}; expected one of {list(experiment.presets)}")
    config = dict(experiment.presets[preset])
    count = config.pop("seeds") if seeds is None else seeds
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"seeds must be an int ≥ 1 (the number of random seeds), got {count!r}")
    folder = writable_folder(out)
    settings = Settings(preset=preset, config=config, seeds=tuple(range(count)), out=folder)
    record = {"experiment": experiment.name, "preset": preset, "seeds": count, "config": config} | _versions()
    files = [_write(folder / "config.json", json.dumps(record, indent=2, default=str))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the experiments' models are tiny: a second thread only adds overhead
    try:
        outcome = experiment.run(settings)
    finally:
        torch.set_num_threads(threads)
    files.append(_write_csv(folder / "results.csv", outcome.rows))
    parts = list(dict.fromkeys(row.get("part") for row in outcome.rows))
    tables = [
        (f"## {part}\n\n" if part else "") + markdown_table([row for row in outcome.rows if row.get("part") == part])
        for part in parts
    ]
    text = f"# {experiment.name} ({preset})\n\n{outcome.summary}\n\n" + "\n\n".join(tables) + "\n"
    files.append(_write(folder / "results.md", text))
    for stem, figure in outcome.figures.items():
        path = folder / f"{stem}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        files.append(path)
    return Report(out=folder, files=files, outcome=outcome)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (the columns of every row; a "part" column is left out); floats to 4 digits."""
    if not rows:
        return "(no rows)"
    columns = [key for key in dict.fromkeys(key for row in rows for key in row) if key != "part"]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _versions() -> dict[str, str]:
    from gatelens import __version__

    return {"gatelens": __version__, "torch": torch.__version__, "python": platform.python_version()}
