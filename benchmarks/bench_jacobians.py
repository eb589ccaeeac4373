"""Per-step Jacobians ∂h_t/∂h_{t-1}: gatelens vs torch.func.jacrev over the cell, timed side by side.

    python benchmarks/bench_jacobians.py [--steps 1000] [--hidden 128] [--batch 1] [--device cpu] [--repeats 3]

The alternative is what a user would write: jacrev of one torch.nn.GRUCell step with respect to h, once per step
(a loop), and the same vectorised over all steps with torch.func.vmap. Every result is checked against gatelens
before it is timed. Prints the best-of-N times and the ratios.
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time
from torch.func import jacrev, vmap

import gatelens as gl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    cell = torch.nn.GRUCell(args.inputs, args.hidden).to(device)
    gru = torch.nn.GRU(args.inputs, args.hidden).to(device)
    gru.load_state_dict({f"{name}_l0": value for name, value in cell.state_dict().items()})
    x = torch.randn(args.steps, args.batch, args.inputs, device=device)

    trace_time, _ = best_time(lambda: gl.load(gru).trace(x).output, args.repeats, device)
    recorded = gl.load(gru).trace(x)
    ours_time, ours = best_time(lambda: recorded.jacobians(), args.repeats, device)
    states = recorded.states["l0"][:-1]  # h_0 .. h_{T-1}, the state each step starts from

    def one_step(x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return cell(x_t, h)

    def loop() -> torch.Tensor:
        return torch.stack(
            [
                torch.stack([jacrev(one_step, argnums=1)(x[t, b], states[t, b]) for b in range(args.batch)])
                for t in range(args.steps)
            ]
        )

    def vectorised() -> torch.Tensor:
        flat = vmap(jacrev(one_step, argnums=1))(x.reshape(-1, args.inputs), states.reshape(-1, args.hidden))
        return flat.reshape(args.steps, args.batch, args.hidden, args.hidden)

    loop_time, loop_result = best_time(loop, args.repeats, device)
    vmap_time, vmap_result = best_time(vectorised, args.repeats, device)
    for name, result in (("jacrev loop", loop_result), ("vmap(jacrev)", vmap_result)):
        error = ((result - ours).abs().max() / ours.abs().max()).item()
        if error > 1e-4:
            raise SystemExit(f"{name} disagrees with gatelens: relative error {error:.1e}")

    print(
        f"per-step Jacobians, GRU, T={args.steps}, B={args.batch}, H={args.hidden}, I={args.inputs}, "
        f"{device.type}, float32, best of {args.repeats}"
    )
    print(f"  gatelens trace (forward, once)     {trace_time * 1e3:9.1f} ms")
    print(f"  gatelens trace.jacobians()         {ours_time * 1e3:9.1f} ms")
    print(f"  torch.func.jacrev, loop over steps {loop_time * 1e3:9.1f} ms   ratio {loop_time / ours_time:7.1f}x")
    print(f"  torch.func.vmap(jacrev)            {vmap_time * 1e3:9.1f} ms   ratio {vmap_time / ours_time:7.1f}x")


if __name__ == "__main__":
    main()
