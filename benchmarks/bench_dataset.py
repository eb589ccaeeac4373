"""gl.analyze_dataset on a data set: serial batches against a local Dask cluster, and against one batch holding every
sequence (time and peak memory), timed side by side.

    python benchmarks/bench_dataset.py [--sequences 1024] [--steps 100] [--hidden 64] [--batch-size 64]
                                       [--workers 2] [--repeats 2]

The model is a one-layer GRU (input size 8, PyTorch's initialisation, seed 0) in float32, the input N(0, 1). Each
measurement runs in a fresh Python process, so that its peak resident memory (ru_maxrss) is its own:

    one batch      gl.analyze(model, x, only=regimes, propagation, local, lyapunov): every sequence at once
    serial         gl.analyze_dataset(model, x, batch_size=…): batch after batch in this process, on torch's own
                   number of threads, and again on 1 thread (as a Dask worker's task runs)
    dask           the same on a LocalCluster of --workers single-threaded processes, started as gatelens starts
                   one but by the script, so that its start-up is timed apart; "cold" is the first run on fresh
                   workers, "warm" a second run on the same workers

The pooled statistics of every run must equal the serial run's (to 1e-5 relative in float32; the one-batch run's
census and timescales likewise), or the script stops. Last, it prints how much CPU other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

import gatelens as gl
from gatelens.analysis.dataset import DATASET_STAGES

MODES = ("one-batch", "serial", "serial-1", "dask")


def _model_and_input(args: argparse.Namespace) -> tuple[gl.Model, torch.Tensor]:
    torch.manual_seed(0)
    model = gl.load(torch.nn.GRU(8, args.hidden))
    x = torch.randn(args.steps, args.sequences, 8, generator=torch.Generator().manual_seed(1))
    return model, x


def _numbers(dataset: gl.DatasetAnalysis) -> dict[str, Any]:
    (part,) = dataset.recurrences
    return {
        "census": part.regimes.census.tolist(),
        "timescale": part.regimes.timescale.tolist(),
        "horizons": part.horizons.per_sequence.tolist(),
        "local": part.local.summary()["all"],
        "lyapunov": part.lyapunov.mean.tolist(),
    }


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    model, x = _model_and_input(args)
    result: dict[str, Any] = {"mode": mode}
    if mode == "one-batch":
        start = time.perf_counter()
        analysis = gl.analyze(model, x, only=DATASET_STAGES)
        result["seconds"] = time.perf_counter() - start
        part = analysis.recurrences[0]
        result["numbers"] = {"census": part.regimes.census.tolist(), "timescale": part.regimes.timescale.tolist()}
    elif mode in ("serial", "serial-1"):
        if mode == "serial-1":
            torch.set_num_threads(1)
        start = time.perf_counter()
        dataset = gl.analyze_dataset(model, x, batch_size=args.batch_size)
        result["seconds"] = time.perf_counter() - start
        result["numbers"], result["stages"] = _numbers(dataset), dataset.seconds
    else:
        from distributed import Client, LocalCluster

        start = time.perf_counter()
        cluster = LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.ERROR,
        )  # fmt: skip
        with cluster, Client(cluster, set_as_default=False) as client:
            result["startup"] = time.perf_counter() - start
            for run in ("cold", "warm"):
                start = time.perf_counter()
                dataset = gl.analyze_dataset(model, x, batch_size=args.batch_size, client=client)
                result[run] = time.perf_counter() - start
                result["numbers"], result[f"{run}_stages"] = _numbers(dataset), dataset.seconds
            start = time.perf_counter()
        result["shutdown"] = time.perf_counter() - start
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _same(found: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        for key in expected:
            _same(found[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        np.testing.assert_allclose(np.array(found, dtype=float), np.array(expected, dtype=float), rtol=1e-5,
                                   err_msg=where)  # fmt: skip
    else:
        np.testing.assert_allclose(found, expected, rtol=1e-5, err_msg=where)


def _busy() -> float:
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    return values[0] + values[1] + values[2] + values[5] + values[6] + values[7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
               ("sequences", "steps", "hidden", "batch_size", "workers")]  # fmt: skip
    print(f"1×{args.hidden} GRU, N = {args.sequences} sequences of T = {args.steps}, batch {args.batch_size}, "
          f"float32, torch {torch.__version__}, {torch.get_num_threads()} torch threads here")  # fmt: skip
    ticks, clock = _busy(), time.monotonic()
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            command = [sys.executable, __file__, *options, f"--measure={mode}"]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            key = "warm" if mode == "dask" else "seconds"
            if mode not in best or result[key] < best[mode][key]:
                best[mode] = result
    serial = best["serial"]["numbers"]
    _same(best["dask"]["numbers"], serial, "dask")
    _same(best["serial-1"]["numbers"], serial, "serial on 1 thread")
    _same(best["one-batch"]["numbers"], {key: serial[key] for key in ("census", "timescale")}, "one batch")
    print(f"best of {args.repeats}; every run's pooled statistics equal the serial run's")
    one = best["one-batch"]
    print(f"one batch of {args.sequences}: {one['seconds']:.2f} s, peak {one['peak_mib']:.0f} MiB")
    print(f"serial batches: {best['serial']['seconds']:.2f} s, peak {best['serial']['peak_mib']:.0f} MiB; stages "
          + ", ".join(f"{k} {v:.2f} s" for k, v in best["serial"]["stages"].items()))  # fmt: skip
    print(f"serial batches, 1 torch thread: {best['serial-1']['seconds']:.2f} s")
    dask = best["dask"]
    print(f"dask, {args.workers} workers: start-up {dask['startup']:.2f} s, cold {dask['cold']:.2f} s, warm "
          f"{dask['warm']:.2f} s ({best['serial']['seconds'] / dask['warm']:.2f}× serial), shutdown "
          f"{dask['shutdown']:.2f} s; worker-seconds per stage (warm) "
          + ", ".join(f"{k} {v:.2f}" for k, v in dask["warm_stages"].items()))  # fmt: skip
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (used.ru_utime + used.ru_stime) - (own.ru_utime + own.ru_stime)
    elapsed = time.monotonic() - clock
    others = max(0.0, (_busy() - ticks) / 100 / elapsed - children / elapsed)
    print(f"other processes used about {others:.2f} CPU meanwhile")


if __name__ == "__main__":
    main()
