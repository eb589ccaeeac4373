"""Wall-clock timing shared by the benchmark scripts (a GPU is synchronised around each run)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of one run and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def best_time(function: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Best wall time of ``repeats`` runs (after one warm-up run), and the last result."""
    result = function()
    best = float("inf")
    for _ in range(repeats):
        seconds, result = timed(function, device)
        best = min(best, seconds)
    return best, result
