"""Experiments: toy tasks with known lags and simulated systems, generated reproducibly from a seed."""

from gatelens.experiments.tasks import (
    Dataset,
    adding_problem,
    aprbs,
    copy_task,
    duffing_oscillator,
    first_order_system,
    multi_timescale,
    wiener_hammerstein,
)

__all__ = [
    "Dataset",
    "adding_problem",
    "aprbs",
    "copy_task",
    "duffing_oscillator",
    "first_order_system",
    "multi_timescale",
    "wiener_hammerstein",
]
