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
from gatelens.experiments.train import SequenceModel, TrainResult, build_model, evaluate, predict, train

__all__ = [
    "Dataset",
    "Monitor",
    "MonitorWarning",
    "SequenceModel",
    "TrainResult",
    "adding_problem",
    "aprbs",
    "build_model",
    "copy_task",
    "duffing_oscillator",
    "evaluate",
    "first_order_system",
    "multi_timescale",
    "predict",
    "train",
    "wiener_hammerstein",
]
