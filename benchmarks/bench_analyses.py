"""Gate analyses against torch.func, timed side by side: local gradients and Lyapunov exponents.

    python benchmarks/bench_analyses.py [--steps 500] [--hidden 64] [--batch 4] [--device cpu] [--repeats 3]

Local gradients ‖∂⁺h_k/∂θ‖_F: the alternative is vmap(jacrev) of one torch.nn.GRUCell step with respect to its
parameters (h_{k−1} held fixed) over every (step, sequence), then the norms. Lyapunov exponents (all S): the
alternative forms every Jacobian with vmap(jacrev) with respect to h and runs the same QR recursion. Every result
is checked against gatelens before it is timed; both sides start from a recorded trace (its cost is printed).
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time
from torch.func import functional_call, jacrev, vmap

import gatelens as gl

BLOCK_OF = {"weight_ih": "W_i", "weight_hh": "W_h", "bias_ih": "b_i", "bias_hh": "b_h"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(args.inputs, args.hidden).to(device)
    gru = torch.nn.GRU(args.inputs, args.hidden).to(device)
    gru.load_state_dict({f"{name}_l0": value for name, value in cell.state_dict().items()})
    x = torch.randn(args.steps, args.batch, args.inputs, device=device)
    trace_time, trace = best_time(lambda: gl.load(gru).trace(x), args.repeats, device)
    flat_x = x.reshape(-1, args.inputs)
    flat_h = trace.states["l0"][:-1].reshape(-1, args.hidden)  # the state each step starts from
    params = dict(cell.named_parameters())

    def step(p: dict[str, torch.Tensor], x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return functional_call(cell, p, (x_t, h))

    def local_alternative() -> torch.Tensor:
        jacobians = vmap(jacrev(step), in_dims=(None, 0, 0))(params, flat_x, flat_h)  # {name: (T·B, H, *shape)}
        squares = sum(j.flatten(1).square().sum(1) for j in jacobians.values())
        return squares.sqrt().reshape(args.steps, args.batch)

    def lyapunov_alternative() -> torch.Tensor:
        jacobians = vmap(jacrev(step, argnums=2), in_dims=(None, 0, 0))(params, flat_x, flat_h)
        jacobians = jacobians.reshape(args.steps, args.batch, args.hidden, args.hidden)
        directions = torch.eye(args.hidden, device=device).expand(args.batch, -1, -1)
        total = torch.zeros(args.batch, args.hidden, device=device)
        for jacobian in jacobians:
            directions, r = torch.linalg.qr(jacobian @ directions)
            total += r.diagonal(dim1=-2, dim2=-1).abs().log()
        return total / args.steps

    rows = []
    for name, ours, alternative in (
        ("local gradients", lambda: gl.local_gradients(trace).total, local_alternative),
        ("Lyapunov spectrum", lambda: gl.lyapunov(trace, k=None).exponents, lyapunov_alternative),
    ):
        ours_time, ours_result = best_time(ours, args.repeats, device)
        other_time, other_result = best_time(alternative, args.repeats, device)
        error = ((other_result - ours_result).abs().max() / ours_result.abs().max()).item()
        if error > 1e-3:
            raise SystemExit(f"{name}: torch.func disagrees with gatelens, relative error {error:.1e}")
        rows.append((name, ours_time, other_time))

    print(
        f"gate analyses, GRU, T={args.steps}, B={args.batch}, H={args.hidden}, I={args.inputs}, {device.type}, "
        f"float32, best of {args.repeats}; the trace (forward, once) took {trace_time * 1e3:.1f} ms"
    )
    for name, ours_time, other_time in rows:
        print(
            f"  {name:18s} gatelens {ours_time * 1e3:9.1f} ms   torch.func {other_time * 1e3:9.1f} ms   "
            f"ratio {other_time / ours_time:6.1f}x"
        )


if __name__ == "__main__":
    main()
