"""`gl.analyze` (every stage of `gatelens analyze`) on a ladder of model sizes, as multiples of one training step.

    python benchmarks/bench_analyze.py [--ladder headline|quick|full] [--threads 2] [--baseline PATH]

For each configuration (a cell, H units, L layers, T steps, B sequences, I = 16, float32, random weights), a fresh
process builds the torch module and input, times one training step of the module (forward, MSE on the last output,
backward; best of 3, before the analysis and again after it, the quicker of the two counting), as it runs by default
and with subnormal numbers flushed to zero on every thread as gatelens computes (a random deep model's vanishing
gradients pass through subnormals, which can slow the default step several times; the quicker step is the unit of
the ratios, so that they do not flatter the analysis), then the trace and
every stage of ``gl.analyze`` (``Analysis.seconds``), and reports each as seconds and training steps, with the
process's peak resident memory.
After the ladder, the growth exponents p of the total time (time ∝ size^p) are fitted in T and in H over the
configurations that differ in that alone.

``--baseline PATH`` also runs the previous pipeline (``gatelens.report.analyses.run_analyses`` of a checkout whose
``src`` folder is PATH) on the same configuration in its own process, stopped after 10 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from typing import Any

LADDERS = {
    "headline": [("gru", 256, 2, 1000, 16), ("lstm", 256, 2, 1000, 16)],
    "quick": [
        (cell, hidden, 2, steps, 8) for cell, hidden, steps in itertools.product(("gru", "lstm"), (64, 128), (100, 500))
    ],
    "full": [
        (cell, hidden, layers, steps, batch)
        for cell, hidden, layers, steps, batch in itertools.product(
            ("gru", "lstm"), (64, 128, 256, 512), (1, 2), (100, 500, 1000, 2000), (8, 16)
        )
    ],
}
BASELINE_LIMIT = 600  # seconds


def _module(cell: str, hidden: int, layers: int) -> Any:
    import torch

    torch.manual_seed(0)
    return {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](16, hidden, num_layers=layers)


def _training_step(module: Any, x: Any) -> tuple[float, float]:
    """Best-of-3 seconds of one training step, as it runs by default and with subnormals flushed."""
    from gatelens.analysis.norms import subnormals_flushed

    with subnormals_flushed():
        flushed = _best_step(module, x)
    return _best_step(module, x), flushed


def _best_step(module: Any, x: Any) -> float:
    import torch

    best = math.inf
    for _ in range(4):  # one warm-up, then best of 3
        start = time.perf_counter()
        module.zero_grad()
        output, _ = module(x)
        torch.nn.functional.mse_loss(output[-1], torch.zeros_like(output[-1])).backward()
        best = min(best, time.perf_counter() - start)
    return best


def _run(config: tuple[str, int, int, int, int], threads: int, queue: multiprocessing.Queue) -> None:
    """One configuration in this process: the training step, the trace and each stage of gl.analyze."""
    import torch

    import gatelens as gl

    torch.set_num_threads(threads)
    cell, hidden, layers, steps, batch = config
    module = _module(cell, hidden, layers)
    x = torch.randn(steps, batch, 16, generator=torch.Generator().manual_seed(1))
    step = _training_step(module, x)
    start = time.perf_counter()
    trace = gl.load(module).trace(x)
    times = {"trace": time.perf_counter() - start}
    analysis = gl.analyze(trace)
    times |= analysis.seconds
    findings = time.perf_counter()
    analysis.explanation  # noqa: B018 - the findings, read from the results
    times["findings"] = time.perf_counter() - findings
    times["total"] = time.perf_counter() - start
    steps = [min(before, after) for before, after in zip(step, _training_step(module, x))]  # the quieter of the two
    queue.put((steps, times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def _baseline(config: tuple[str, int, int, int, int], threads: int, source: str) -> float | None:
    """Seconds the previous pipeline took on the configuration (trace included), or None past the limit."""
    cell, hidden, layers, steps, batch = config
    script = (
        "import time, torch, gatelens as gl\n"
        "from gatelens.report.analyses import run_analyses\n"
        f"torch.set_num_threads({threads}); torch.manual_seed(0)\n"
        f"m = {{'gru': torch.nn.GRU, 'lstm': torch.nn.LSTM}}['{cell}'](16, {hidden}, num_layers={layers})\n"
        f"x = torch.randn({steps}, {batch}, 16, generator=torch.Generator().manual_seed(1))\n"
        "s = time.perf_counter(); run_analyses(gl.load(m).trace(x), name='m'); print(time.perf_counter() - s)\n"
    )
    environment = os.environ | {"PYTHONPATH": source}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=BASELINE_LIMIT
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"the baseline failed on {config}: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _in_process(config: tuple[str, int, int, int, int], threads: int) -> tuple[list[float], dict[str, float], float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(config, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _exponent(pairs: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) against log(size)."""
    xs, ys = [math.log(size) for size, _ in pairs], [math.log(seconds) for _, seconds in pairs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ladder", choices=tuple(LADDERS), default="headline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", help="the src folder of the previous release, to time its pipeline too")
    args = parser.parse_args()
    totals: dict[tuple[str, int, int, int, int], float] = {}
    for config in LADDERS[args.ladder]:
        (default, step), times, peak = _in_process(config, args.threads)
        step = min(default, step)
        totals[config] = times["total"]
        cell, hidden, layers, steps, batch = config
        print(
            f"{cell} H={hidden} L={layers} T={steps} B={batch}: training step {default:.3f} s by default, {step:.3f} s "
            f"with subnormals flushed; total "
            f"{times['total']:.1f} s = {times['total'] / step:.1f} steps; peak {peak:.2f} GiB",
            flush=True,
        )
        for stage, seconds in times.items():
            if stage != "total":
                print(f"    {stage:12s} {seconds:8.2f} s {seconds / step:7.1f} steps", flush=True)
        if args.baseline:
            old = _baseline(config, args.threads, args.baseline)
            shown = f"{old:.1f} s = {old / step:.1f} steps" if old is not None else f"over {BASELINE_LIMIT} s"
            print(f"    previous pipeline: {shown}", flush=True)
    for axis, name in ((3, "T"), (1, "H")):
        groups: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
        for config, seconds in totals.items():
            groups.setdefault(config[:axis] + config[axis + 1 :], []).append((config[axis], seconds))
        fits = [_exponent(pairs) for pairs in groups.values() if len(pairs) > 1]
        if fits:
            print(f"growth in {name}: time ∝ {name}^p, p = " + ", ".join(f"{p:.2f}" for p in fits))


if __name__ == "__main__":
    main()
