"""The experiments ``gatelens experiment NAME`` runs, by name."""

from __future__ import annotations

import os

from gatelens.experiments.long_range import LONG_RANGE
from gatelens.experiments.rehmer_kroll import REHMER_KROLL
from gatelens.experiments.runner import Experiment, Report, run_experiment
from gatelens.experiments.seed_cases import SEED_CASES
from gatelens.experiments.timescales import TIMESCALES

EXPERIMENTS: dict[str, Experiment] = {
    experiment.name: experiment for experiment in (SEED_CASES, LONG_RANGE, REHMER_KROLL, TIMESCALES)
}


def experiment(name: str, *, preset: str = "quick", seeds: int | None = None, out: str | os.PathLike[str]) -> Report:
    """Run the experiment called ``name`` (see :data:`EXPERIMENTS`) and write its results folder ``out``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    return run_experiment(EXPERIMENTS[name], preset=preset, seeds=seeds, out=out)
