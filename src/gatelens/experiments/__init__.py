"""Experiments: tasks with known lags, simulated systems, the training monitor and the experiments themselves."""

from gatelens.experiments.monitor import Monitor, MonitorWarning
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
    "Monitor",
    "MonitorWarning",
    "adding_problem",
    "aprbs",
    "copy_task",
    "duffing_oscillator",
    "first_order_system",
    "multi_timescale",
    "wiener_hammerstein",
]
