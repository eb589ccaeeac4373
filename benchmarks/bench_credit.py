"""Credit maps: gatelens vs an autograd oracle, core throughput vs GEMM, time vs T, and a long streamed run.

    python benchmarks/bench_credit.py oracle   [--steps 256] [--hidden 64] [--batch 4] [--repeats 3] [--functional-call]
    python benchmarks/bench_credit.py gflops   [--steps 1024] [--hidden 64] [--batch 4]
    python benchmarks/bench_credit.py scaling  [--hidden 64] [--batch 4] [--lengths 256 512 1024 2048 4096]
    python benchmarks/bench_credit.py stream   [--steps 16384] [--hidden 128] [--batch 8] [--loss last]

All runs use a one-layer ``nn.GRU`` (float32 unless ``--dtype float64``) with I = 8 inputs, random weights and inputs,
and a gradient at every output (many-to-many) unless stated; ``--device cuda`` runs on a GPU; ``--threads`` (default 2)
sets torch's intra-op threads.

- oracle: the all-pairs credit map (norms, by_lag, by_source, total; :meth:`gl.CreditMap.compute`) against the
  oracle a careful user writes with autograd (:func:`lean_oracle`): a hand-written GRU step, one copy of the parameters
  per step, one ``torch.autograd.grad`` per loss step t giving every contribution C(t, k), and their norms and sums
  formed in a few vectorised operations. ``--functional-call`` adds the earlier oracle (``torch.func.functional_call``
  of ``nn.GRUCell``, every block's norm and lag sum formed one by one). Every field is compared before timing; the
  sides are then timed alternately, ``--repeats`` rounds, best of each.
- gflops: the all-pairs sweep (lag sums and pair norms, one ``chain_sweep``; best of 3) against ``torch.matmul`` on
  2048 × 2048 matrices measured in the same run (best of 5, before and after the sweep), two ways. ``counted``: the
  matrix-product FLOPs the sweep performs, counted by ``torch.utils.flop_counter`` (elementwise work not counted),
  per second. That count depends on the algorithm: forming a step's Jacobian once for all its chains, or dropping a
  padded cell, lowers it while the sweep gets faster, so its share can fall as the time improves. ``pair`` (the
  measure to compare across versions): the FLOPs any algorithm needs for the same map, :func:`pair_flops` — every
  chain moved through each Jacobian and every pair's contribution contracted into every weight block, for the pairs
  whose contribution is not exactly 0 — per second of the sweep; it rises exactly as the time falls.
- scaling: time vs T for many-to-one (total, by_source, by_lag) and all pairs (by_lag, norms); prints the
  exponent p of a least-squares fit time ∝ T^p.
- stream: total, by_source and by_lag for one long sequence batch in a fresh process; prints the peak memory
  (resident set size, or CUDA's peak allocation) beside the size all Jacobians would take.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from typing import Any

import torch
from timing import timed
from torch.utils.flop_counter import FlopCounterMode

import gatelens as gl

INPUTS = 8
GATES = ("r", "z", "n")


def setup(steps: int, hidden: int, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A GRU, its trace on random inputs, and random output gradients at every step."""
    torch.manual_seed(seed)
    gru = torch.nn.GRU(INPUTS, hidden).to(device=device, dtype=dtype)
    x = torch.randn(steps, batch, INPUTS, device=device, dtype=dtype)
    trace = gl.load(gru).trace(x)
    out_grads = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    return gru, x, trace, out_grads


def full_map(trace: gl.Trace, out_grads: torch.Tensor) -> gl.CreditMap:
    """total, by_source, by_lag and norms, by_lag and norms from one sweep (:meth:`gl.CreditMap.compute`)."""
    return gl.credit(trace, out_grads).compute("total", "by_source", "by_lag", "norms")


def gru_step(x: torch.Tensor, h: torch.Tensor, w_ih, w_hh, b_ih, b_hh) -> torch.Tensor:
    """One step of ``nn.GRU`` from its packed weights (gate order r, z, n; reset applied after W_hn):
    r = σ(W_ir x + b_ir + W_hr h + b_hr), z = σ(…z…), n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),
    h' = (1 − z) ⊙ n + z ⊙ h."""
    i_r, i_z, i_n = torch.addmm(b_ih, x, w_ih.T).chunk(3, dim=1)
    h_r, h_z, h_n = torch.addmm(b_hh, h, w_hh.T).chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


PACKED = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def lean_oracle(gru: torch.nn.GRU, x: torch.Tensor, out_grads: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """C(t, k) for every pair as a careful user computes it with autograd: a hand-written step (:func:`gru_step`),
    one copy of the four packed parameters per step, one ``torch.autograd.grad`` per loss step t over the copies of
    steps k ≤ t; the norms and lag sums of each loss step's gradients are formed in a few vectorised operations."""
    base = [getattr(gru, f"{name}_l0").detach() for name in PACKED]
    steps, hidden = x.shape[0], gru.hidden_size
    copies = [[value.clone().requires_grad_() for value in base] for _ in range(steps)]
    h = x.new_zeros(x.shape[1], hidden)
    states = []
    for step in range(steps):
        h = gru_step(x[step], h, *copies[step])
        states.append(h)
    norms = {name: x.new_zeros(steps, steps, len(GATES)) for name in PACKED}
    lag_sums = {name: x.new_zeros(steps, *value.shape) for name, value in zip(PACKED, base)}
    by_source = {name: x.new_zeros(steps, *value.shape) for name, value in zip(PACKED, base)}
    for t in range(steps):
        wanted = [value for k in range(t + 1) for value in copies[k]]
        grads = torch.autograd.grad(states[t], wanted, grad_outputs=out_grads[t], retain_graph=t < steps - 1)
        lags = torch.arange(t, -1, -1, device=x.device)  # t − k for k = 0..t
        for index, name in enumerate(PACKED):
            per_step = torch.stack(grads[index :: len(PACKED)])  # (t + 1, 3H, …): C(t, k) for k = 0..t
            norms[name][t, : t + 1] = torch.linalg.vector_norm(per_step.reshape(t + 1, len(GATES), -1), dim=-1)
            lag_sums[name].index_add_(0, lags, per_step)
            by_source[name][: t + 1] += per_step
    return _by_block(norms, lag_sums, by_source, hidden)


def _by_block(norms: dict, lag_sums: dict, by_source: dict, hidden: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per packed parameter (T, T, gates) norms and (T, 3H, …) lag and source sums ↦ per gatelens block (W_ir, …,
    b_hn): norms, by_lag, by_source and total."""
    result: dict[str, dict[str, torch.Tensor]] = {"norms": {}, "by_lag": {}, "by_source": {}, "total": {}}
    for name in PACKED:
        stem = ("W_" if name.startswith("weight") else "b_") + name[-2]
        for index, gate in enumerate(GATES):
            rows = slice(index * hidden, (index + 1) * hidden)
            result["norms"][stem + gate] = norms[name][..., index]
            result["by_lag"][stem + gate] = lag_sums[name][:, rows].flatten(1).norm(dim=1)
            result["by_source"][stem + gate] = by_source[name][:, rows]
            result["total"][stem + gate] = by_source[name][:, rows].sum(0)
    return result


def functional_call_oracle(
    gru: torch.nn.GRU, x: torch.Tensor, out_grads: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """The same pairs through ``torch.func.functional_call`` of an ``nn.GRUCell`` (the oracle of earlier figures):
    per-step parameter copies, one backward pass per loss step, every block's norm and lag sum formed one by one."""
    cell = torch.nn.GRUCell(gru.input_size, gru.hidden_size).to(device=x.device, dtype=x.dtype)
    base = {name: getattr(gru, f"{name}_l0").detach() for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    steps, hidden = x.shape[0], gru.hidden_size
    copies = [{name: value.clone().requires_grad_() for name, value in base.items()} for _ in range(steps)]
    h = x.new_zeros(x.shape[1], hidden)
    states = []
    for step in range(steps):
        h = torch.func.functional_call(cell, copies[step], (x[step], h))
        states.append(h)
    blocks = [f"{kind}_{side}{gate}" for kind in ("W", "b") for side in "ih" for gate in GATES]
    norms = {name: x.new_zeros(steps, steps) for name in blocks}
    lag_sums: dict[str, torch.Tensor] = {}
    for t in range(steps):
        wanted = [copies[k][name] for k in range(t + 1) for name in base]
        grads = torch.autograd.grad((states[t] * out_grads[t]).sum(), wanted, retain_graph=True)
        for k in range(t + 1):
            per_block = dict(zip(base, grads[4 * k : 4 * k + 4]))
            for index, gate in enumerate(GATES):
                rows = slice(index * hidden, (index + 1) * hidden)
                for kind, side, tensor in (
                    ("W", "i", per_block["weight_ih"]),
                    ("W", "h", per_block["weight_hh"]),
                    ("b", "i", per_block["bias_ih"]),
                    ("b", "h", per_block["bias_hh"]),
                ):
                    name = f"{kind}_{side}{gate}"
                    part = tensor[rows]
                    norms[name][t, k] = part.norm()
                    lag_sums.setdefault(name, x.new_zeros(steps, *part.shape))[t - k] += part
    return {"norms": norms, "by_lag": {name: s.flatten(1).norm(dim=1) for name, s in lag_sums.items()}}


def worst_difference(cm: gl.CreditMap, oracle: dict[str, dict[str, torch.Tensor]]) -> float:
    """The largest difference between gatelens and an oracle over every field and block, relative to the field's
    largest value in that block."""
    worst = 0.0
    for field, blocks in oracle.items():
        for name, expected in blocks.items():
            got = getattr(cm, field)[f"l0.{name}"]
            worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    return worst


def run_oracle(args: argparse.Namespace) -> dict[str, Any]:
    """Both sides compared first, then timed alternately (``--repeats`` rounds; the best time of each)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gru, x, trace, out_grads = setup(args.steps, args.hidden, args.batch, dtype, device)
    oracles = {"lean": lean_oracle} | ({"functional_call": functional_call_oracle} if args.functional_call else {})
    tolerance = 1e-3 if dtype == torch.float32 else 1e-10
    differences = {}
    for label, oracle in oracles.items():
        differences[label] = worst_difference(full_map(trace, out_grads), oracle(gru, x, out_grads))
        if differences[label] > tolerance:
            raise SystemExit(f"gatelens and the {label} oracle disagree: relative error {differences[label]:.1e}")
    best = dict.fromkeys(["gatelens", *oracles], float("inf"))
    for _ in range(args.repeats):
        best["gatelens"] = min(best["gatelens"], timed(lambda: full_map(trace, out_grads), device)[0])
        for label, oracle in oracles.items():
            best[label] = min(best[label], timed(lambda oracle=oracle: oracle(gru, x, out_grads), device)[0])
    return {
        "threads": torch.get_num_threads(),
        "seconds": best,
        "speedup": {label: best[label] / best["gatelens"] for label in oracles},
        "max_relative_difference": differences,
    }


def gemm_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timed(lambda: a @ b, device)
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def addmm_in_place_flops(bias_shape: Any, left_shape: Any, right_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``out.addmm_(left, right)``, which the flop counter does not know by itself."""
    return 2 * left_shape[0] * left_shape[1] * right_shape[1]


def pair_flops(rec: Any, sweep: Any) -> int:
    """The matrix-product FLOPs the all-pairs sweep needs whatever the algorithm: each pair (t, k ≤ t) whose
    contribution is not exactly 0 (in ``sweep.pair_norms``) is one contraction of its adjoints with the step's inputs
    into every weight block, C(t, k) = Σ_b δ_bᵀ ⊗ u_b (B·|θ| multiply-adds), and, for k < t, one move of its chain
    through a Jacobian, a_{t,k} = a_{t,k+1} J_{k+1} (B·S²); 2 FLOPs per multiply-add. Forming Jacobians, projections
    for the norms, empty cells of a layout and pairs that are exactly 0 (a vanished gradient) are not counted."""
    nonzero = torch.stack(list(sweep.pair_norms.values())).amax(0) > 0  # (loss steps, T)
    pairs = int(nonzero.sum())
    moves = pairs - int(nonzero[torch.arange(len(sweep.loss_steps)), sweep.loss_steps].sum())  # k = t: no move
    batch, size = rec.states.shape[1:]
    parameters = sum(weight.numel() for weight in rec.cell.weights.values())
    return 2 * batch * (moves * size * size + pairs * parameters)


def run_gflops(args: argparse.Namespace) -> dict[str, Any]:
    from gatelens.analysis.credit import chain_sweep

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _, _, trace, out_grads = setup(args.steps, args.hidden, args.batch, dtype, device)
    rec, g = gl.credit(trace, out_grads).streams[0]

    def sweep() -> Any:
        return chain_sweep(rec, g, lag_sums=True, pair_norms=True)

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_in_place_flops})
    with counter:
        done = sweep()
    counted, needed = counter.get_total_flops(), pair_flops(rec, done)
    gemm_before = gemm_gflops(device, dtype)
    seconds = min(timed(sweep, device)[0] for _ in range(3))
    gemm = max(gemm_before, gemm_gflops(device, dtype))  # the machine's best, measured around the sweep
    return {
        "threads": torch.get_num_threads(),
        "sweep_s": seconds,
        "gemm_gflops": gemm,
        "counted_flops": counted,
        "counted_gflops": counted / seconds / 1e9,
        "counted_share": counted / seconds / 1e9 / gemm,
        "pairs": int((torch.stack(list(done.pair_norms.values())).amax(0) > 0).sum()),
        "pair_flops": needed,
        "pair_gflops": needed / seconds / 1e9,
        "pair_share": needed / seconds / 1e9 / gemm,
    }


def fitted_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(time) against log(T) by least squares."""
    xs, ys = [math.log(n) for n in lengths], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for steps in args.lengths:
        _, _, trace, out_grads = setup(steps, args.hidden, args.batch, dtype, device)
        last = torch.zeros_like(out_grads)
        last[-1] = out_grads[-1]

        def many_to_one() -> None:
            gl.credit(trace, last).compute("total", "by_source", "by_lag")

        def all_pairs() -> None:
            gl.credit(trace, out_grads).compute("by_lag", "norms")

        rows.append(
            {"T": steps, "many_to_one_s": timed(many_to_one, device)[0], "all_pairs_s": timed(all_pairs, device)[0]}
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "rows": rows,
        "many_to_one_exponent": fitted_exponent(args.lengths, [r["many_to_one_s"] for r in rows]),
        "all_pairs_exponent": fitted_exponent(args.lengths, [r["all_pairs_s"] for r in rows]),
    }


def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Run the long case in a fresh process so that its peak memory is its own."""
    command = [sys.executable, __file__, "_stream_child", *sys.argv[2:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def stream_child(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _, _, trace, out_grads = setup(args.steps, args.hidden, args.batch, dtype, device)
    if args.loss == "last":
        out_grads[:-1] = 0
    seconds = {}
    cm = gl.credit(trace, out_grads)
    for field in ("total", "by_source", "by_lag"):
        seconds[field] = timed(lambda field=field: getattr(cm, field), device)[0]
    element = torch.finfo(dtype).bits // 8
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "T": args.steps,
        "H": args.hidden,
        "B": args.batch,
        "loss": args.loss,
        "seconds": seconds,
        "peak_memory_GiB": peak / 2**30,
        "all_jacobians_would_take_GiB": args.steps * args.batch * args.hidden**2 * element / 2**30,
        "by_source_and_by_lag_results_GiB": 2 * sum(v.numel() for v in cm.by_source.values()) * element / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["oracle", "gflops", "scaling", "stream", "_stream_child"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--loss", choices=["last", "all"], default="last")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="oracle: rounds of timing, the best of each side")
    parser.add_argument("--functional-call", action="store_true", help="oracle: also time the functional_call one")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = {
        "oracle": (256, 64, 4),
        "gflops": (1024, 64, 4),
        "scaling": (0, 64, 4),
        "stream": (16384, 128, 8),
        "_stream_child": (16384, 128, 8),
    }[args.what]
    for name, value in zip(("steps", "hidden", "batch"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    runner = {
        "oracle": run_oracle,
        "gflops": run_gflops,
        "scaling": run_scaling,
        "stream": run_stream,
        "_stream_child": stream_child,
    }[args.what]
    print(json.dumps(runner(args), indent=None if args.what == "_stream_child" else 2))


if __name__ == "__main__":
    main()
