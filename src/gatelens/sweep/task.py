"""What a Dask worker runs for one grid point: the experiment's per-point function, made deterministic and safe.

The same configuration gives the same metrics in any process: the point runs on one torch thread (a reduction split
over threads adds in another order), under a process-wide lock (several points in the threads of one worker would
otherwise draw from torch's global RNG together: ``build_model`` seeds it), and with torch's global RNG seeded from
the point's "seed" (0 without one) inside a fork, so the worker's own state is left as it was. What the point raises
is caught and returned as the row's error: a point that fails does not stop the sweep, and is not retried.
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from gatelens.sweep.table import now

_ONE_AT_A_TIME = threading.Lock()


def run_point(function: Callable[[Mapping[str, Any]], dict[str, Any]], config: dict[str, Any],
              metrics: tuple[str, ...], expected: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``function(config)`` and return {"status", "metrics", "error", "seconds", "worker", "started",
    "finished"}: status "ok" with the metrics (plain Python values), or "error" with "Type: message" of what was
    raised (or of metrics that are not exactly ``metrics``, or of a worker whose versions differ from ``expected``,
    e.g. one that joined the cluster after the sweep checked it) and no metrics. Never raises."""
    with _ONE_AT_A_TIME:
        started, clock = now(), time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            check_versions(expected or {})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.get("seed", 0))
                values = function(copy.deepcopy(config))  # the function cannot change the configuration sent
            found = _plain(values, "the point's result")
            if not isinstance(found, dict) or sorted(found) != sorted(metrics):
                names = sorted(found) if isinstance(found, dict) else type(values).__name__
                raise TypeError(f"the point returned {names}; expected a dict with the keys {sorted(metrics)}")
            status, error = "ok", None
        except Exception as exception:  # noqa: BLE001 - a failing point is a result, recorded with its error
            status, found, error = "error", {}, _one_line(exception)
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - clock
    return {
        "status": status,
        "metrics": found,
        "error": error,
        "seconds": seconds,
        "worker": _worker(),
        "started": started,
        "finished": now(),
    }


def check_versions(expected: Mapping[str, str]) -> None:
    """Raise if this process runs other versions of the packages in ``expected`` (its numbers would differ)."""
    found = worker_versions()
    differ = [f"{name} {found.get(name)} (the sweep runs {version})" for name, version in expected.items()
              if found.get(name) != version]  # fmt: skip
    if differ:
        raise RuntimeError(f"this worker runs {', '.join(differ)}; install the same versions on every worker")


def worker_versions() -> dict[str, str]:
    """The versions on the process that runs this (a Dask worker, through ``client.run``)."""
    from gatelens.sweep.table import versions

    return versions()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain Python values (numpy and torch values as scalars or lists, tuples as lists), or TypeError."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool before int; numpy.float64 is a float, returned as a float
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _plain(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    raise TypeError(f"{where} holds a {type(value).__name__}; expected numbers, bools, strings or lists of them")


def _one_line(exception: BaseException) -> str:
    text = " ".join(str(exception).split())
    name = type(exception).__name__
    if not text:
        where = traceback.extract_tb(exception.__traceback__)[-1:]  # no message: say where it was raised
        text = f"raised at {where[0].filename}:{where[0].lineno}" if where else "(no message)"
    return f"{name}: {text}"


def _worker() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # called outside a Dask worker
        return "local"
