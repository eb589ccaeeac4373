"""The analyses that stream over time, at the size users train, as multiples of one training step.

    python benchmarks/bench_streamed.py [--steps 1000] [--hidden 256] [--layers 2] [--batch 16] [--max-lag 20]

Each stage runs in a fresh process (so its peak resident memory is its own) on the same saved 2-layer nn.GRU and
input: the trace (the forward pass, recorded once), the credit map's ∂L/∂θ for a many-to-one loss (one BPTT
sweep), propagation and input influence over the first ``--max-lag`` lags (the log-scaled products), and Lyapunov
exponents (k = 1, the default k = 8, and k = 32). The unit is one training step of the torch module on the same
batch: forward, MSE loss on the last output, backward. Stages after the trace include the trace's time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
from pathlib import Path

import torch
from timing import best_time

import gatelens as gl

STAGES = {
    "trace": lambda trace, lag: None,
    "credit total (many-to-one)": lambda trace, lag: gl.credit(trace, _last_only(trace)).total,
    "propagation": lambda trace, lag: gl.propagation(trace, max_lag=lag),
    "input influence": lambda trace, lag: gl.input_influence(trace, max_lag=lag),
    "Lyapunov, k = 1": lambda trace, lag: gl.lyapunov(trace, k=1),
    "Lyapunov, k = 8 (default)": lambda trace, lag: gl.lyapunov(trace),
    "Lyapunov, k = 32": lambda trace, lag: gl.lyapunov(trace, k=32),
}


def _last_only(trace: gl.Trace) -> torch.Tensor:
    """A loss gradient at the last step only: ∂L/∂y for L = Σ_b ⟨1, y_T⟩."""
    out_grads = torch.zeros_like(trace.output)
    out_grads[-1] = 1.0
    return out_grads


def _load(folder: str, threads: int) -> tuple[torch.nn.GRU, torch.Tensor]:
    """The saved module and input, in a process that computes with ``threads`` threads."""
    torch.set_num_threads(threads)
    return torch.load(Path(folder) / "gru.pt", weights_only=False), torch.load(Path(folder) / "x.pt")


def _stage(name: str, folder: str, max_lag: int, threads: int, queue: multiprocessing.Queue) -> None:
    module, x = _load(folder, threads)

    def run() -> None:
        STAGES[name](gl.load(module).trace(x), max_lag)

    seconds, _ = best_time(run, 1, torch.device("cpu"))
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def _training_step(folder: str, threads: int, queue: multiprocessing.Queue) -> None:
    module, x = _load(folder, threads)
    target = torch.zeros(x.shape[1], module.hidden_size)

    def step() -> None:
        module.zero_grad()
        output, _ = module(x)
        torch.nn.functional.mse_loss(output[-1], target).backward()

    seconds, _ = best_time(step, 3, torch.device("cpu"))
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def _in_process(target, *args) -> tuple[float, float]:  # noqa: ANN001 - a stage function and its arguments
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-lag", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(torch.nn.GRU(args.inputs, args.hidden, num_layers=args.layers), Path(folder) / "gru.pt")
        torch.save(torch.randn(args.steps, args.batch, args.inputs), Path(folder) / "x.pt")
        step_time, step_memory = _in_process(_training_step, folder, args.threads)
        print(
            f"streamed analyses, {args.layers}-layer GRU, H={args.hidden}, T={args.steps}, B={args.batch}, "
            f"I={args.inputs}, float32, cpu, {args.threads} threads, max_lag={args.max_lag}; one training step "
            f"{step_time:.2f} s, peak {step_memory:.2f} GiB"
        )
        for name in STAGES:
            seconds, memory = _in_process(_stage, name, folder, args.max_lag, args.threads)
            print(f"  {name:28s} {seconds:8.2f} s  {seconds / step_time:7.1f} steps   peak {memory:5.2f} GiB")


if __name__ == "__main__":
    main()
