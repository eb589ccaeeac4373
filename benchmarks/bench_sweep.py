"""gl.sweep on a local Dask cluster against a serial loop over the same grid, timed side by side.

    python benchmarks/bench_sweep.py [--workers 2] [--architectures gru lstm] [--lengths 20 30] [--seeds 2]
                                     [--epochs 30] [--threads 1 2] [--repeats 2]

The grid is long-range's adding problem (preset "quick"), architectures × lengths × seeds, with patience = epochs
so that every point trains for all its epochs (about 1 s each). The alternative is the obvious loop: the
experiment's per-point function (``long_range.point``, what each sweep task calls) called in this process for every
point, one after the other; once per ``--threads`` value (default: on 1 torch thread, as in a sweep's task, and on
torch's own number). The sweep runs on a ``LocalCluster`` of ``--workers`` single-threaded processes, started as
``gl.sweep`` starts one but here, so that its start-up is timed apart from the run; each repeat starts a fresh
cluster and runs the sweep twice on it: "cold" (the workers' first tasks, which pay the process's one-time costs)
and "warm" (the same grid again into another folder). Every point's metrics, from every loop and every sweep, must
equal the first loop's exactly, or the script stops with the points that differ. Last, it prints how much CPU other
processes on the machine used meanwhile (from /proc/stat): the figures depend on it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import gatelens as gl
from gatelens.sweep import read_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes (one thread each)")
    parser.add_argument("--architectures", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[20, 30], help="adding-problem lengths T")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per architecture and length")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per point (patience is set to the same)")
    parser.add_argument("--threads", nargs="+", type=int, help="torch threads of the serial loop, one loop each "
                        "(default: 1, as in a sweep's task, and torch's own)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for name in ("workers", "seeds", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    default_threads = torch.get_num_threads()
    threads = list(dict.fromkeys(args.threads or [1, default_threads]))
    spec = read_spec(
        {
            "experiment": "long-range",
            "name": "bench",
            "settings": {"task": "adding", "epochs": args.epochs, "patience": args.epochs},
            "grid": {"architecture": args.architectures, "length": args.lengths, "seed": list(range(args.seeds))},
        }
    )
    points, function, metrics = spec.points, spec.point.run, spec.point.metrics
    n, w = len(points), args.workers

    def serial() -> list[dict[str, Any]]:
        return [function(dict(point.config)) for point in points]

    serial_times: dict[int, list[float]] = {count: [] for count in threads}
    cold, warm, starts, closes = [], [], [], []
    begin, busy_before, own_before = time.perf_counter(), machine_busy(), own_cpu()
    expected: list[dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        for repeat in range(args.repeats):
            for count in threads:
                torch.set_num_threads(count)
                seconds, found = timed(serial)
                serial_times[count].append(seconds)
                expected = check(expected, found, points, f"serial loop on {count} thread(s), repeat {repeat + 1}")
            torch.set_num_threads(default_threads)
            seconds, (cluster, client) = timed(lambda: start_cluster(w))
            starts.append(seconds)
            try:
                for label, runs in (("cold", cold), ("warm", warm)):
                    out = Path(scratch) / f"{repeat}-{label}"
                    called, cpu = time.time(), own_cpu()
                    seconds, result = timed(lambda: gl.sweep(spec, client, out=out))
                    returned, cpu = time.time(), own_cpu() - cpu
                    if not result.complete or result.failed or result.lost:
                        raise SystemExit(f"sweep ({label}, repeat {repeat + 1}) did not finish every point: "
                                         f"{result.text}")  # fmt: skip
                    rows = {row["point"]: row for row in result.rows}
                    found = [{metric: rows[point.key][metric] for metric in metrics} for point in points]
                    check(expected, found, points, f"sweep ({label}), repeat {repeat + 1}")
                    runs.append(profile(seconds, result.rows, called, returned) | {"cpu": cpu})
            finally:
                seconds, _ = timed(lambda: stop_cluster(cluster, client))
                closes.append(seconds)
    others = (machine_busy() - busy_before - own_cpu() + own_before) / (time.perf_counter() - begin)

    best = {count: min(times) for count, times in serial_times.items()}
    one = best.get(1, min(best.values()))  # the loop under the tasks' conditions (one thread) where it ran
    start, close = min(starts), min(closes)
    shape = " × ".join(map(str, (len(args.architectures), len(args.lengths), args.seeds)))
    print(
        f"long-range sweep, adding problem, {n} points ({shape}: {', '.join(args.architectures)}; "
        f"T ∈ {{{', '.join(map(str, args.lengths))}}}; seeds 0..{args.seeds - 1}), {args.epochs} epochs each; "
        f"best of {args.repeats}; sweep on a local cluster of {w} worker process(es) × 1 thread; every point's metrics "
        "identical in every run"
    )
    for count in threads:
        print(
            f"  serial loop, {count} torch thread(s)      {best[count]:7.2f} s   {best[count] / n:.2f} s per point   "
            f"(first run in this process {serial_times[count][0]:.2f} s)"
        )
    print(f"  sweep: cluster start-up             {start:7.2f} s")

    def ratios(seconds: float) -> str:
        return "   ".join(f"{best[count] / seconds:5.2f}x ({count} t)" for count in threads)

    for label, runs in (("cold (fresh workers)", cold), ("warm (same workers)", warm)):
        run = min(runs, key=lambda run: run["wall"])
        outside = (w * run["wall"] - run["in_tasks"]) / n
        print(f"  sweep: run, {label:23s} {run['wall']:7.2f} s   ratio {ratios(run['wall'])}   "
              f"(ideal {one / w:.2f} s = 1-thread serial / {w})")  # fmt: skip
        print(
            f"      per point: {run['in_tasks'] / n:.2f} s in its task (1-thread serial {one / n:.2f} s), "
            f"{outside:.2f} worker-s outside tasks; call → first task started {run['head']:.2f} s, last task "
            f"finished → return {run['tail']:.2f} s; this process (scheduler, client, summary) used "
            f"{run['cpu']:.2f} CPU-s"
        )
    print(f"  sweep: cluster shutdown             {close:7.2f} s")
    total = start + min(run["wall"] for run in cold) + close
    print(f"  sweep end to end (start-up + cold run + shutdown, as `gatelens sweep` does) {total:.2f} s: "
          f"ratio {ratios(total)}")  # fmt: skip
    if not math.isnan(others):
        print(f"  other processes on this machine used {others:.2f} of its {os.cpu_count()} CPUs on average during "
              "the run")  # fmt: skip


def timed(function: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat; NaN where there is none)."""
    try:
        with open("/proc/stat") as file:
            ticks = [int(value) for value in file.readline().split()[1:]]
    except OSError:
        return math.nan
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user time


def own_cpu() -> float:
    """CPU seconds of this process (with the local cluster's scheduler) and of its finished children (the Dask
    workers, once their cluster is closed)."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def start_cluster(workers: int) -> tuple[Any, Any]:
    """A local cluster as ``gl.sweep`` starts one (single-threaded worker processes, no dashboard), and a client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    )
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(workers)
    return cluster, client


def stop_cluster(cluster: Any, client: Any) -> None:
    client.close()
    cluster.close()


def profile(wall: float, rows: list[dict[str, Any]], called: float, returned: float) -> dict[str, float]:
    """The sweep's wall time, the seconds spent inside its tasks, and the time before the first task started and
    after the last one finished (from the rows' UTC timestamps, to the millisecond)."""
    started = min(datetime.fromisoformat(row["started"]).timestamp() for row in rows)
    finished = max(datetime.fromisoformat(row["finished"]).timestamp() for row in rows)
    return {
        "wall": wall,
        "in_tasks": sum(row["seconds"] for row in rows),
        "head": started - called,
        "tail": returned - finished,
    }


def check(expected: list[dict[str, Any]] | None, found: list[dict[str, Any]], points: Any, where: str) -> Any:
    """``found`` if it equals ``expected`` exactly, point by point and metric by metric (NaN equals NaN)."""
    if expected is None:
        return found
    different = [
        f"{point.values}: {metric} {want[metric]!r} != {got.get(metric)!r}"
        for point, want, got in zip(points, expected, found)
        for metric in want
        if not same(want[metric], got.get(metric))
    ]
    if different:
        raise SystemExit(f"{where}: metrics differ from the serial loop's at {len(different)} place(s):\n  "
                         + "\n  ".join(different))  # fmt: skip
    return expected


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


if __name__ == "__main__":
    main()
