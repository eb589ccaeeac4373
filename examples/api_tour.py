"""A tour of the Python API: load a PyTorch GRU, trace it, and show which Jacobian paths carry the gradient.

Run with `python examples/api_tour.py` (after `make demo` has installed gatelens). The path share of path p at one step is ‖P_p‖_F / Σ_q ‖P_q‖_F (Frobenius norms of the
named terms of J = ∂h_t/∂h_{t-1}), averaged over steps and sequences. The demo also answers the blocking
question (does ∂L/∂W_iz vanish when z ≈ r ≈ 0 at one step?) with a credit map (where ∂L/∂W_iz comes from when z ≈ r ≈ 0 at one step), prints the traced GRU's
gradient horizon (propagation), compares a GRU and an Elman RNN of the same size (local gradients, horizon, top
Lyapunov exponent), and ends with `gl.explain`'s findings for the GRU with its update and reset gates clamped to 0
at one step (what-if).
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import gatelens as gl


def path_shares(paths: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over steps and sequences of each path's share of the summed Frobenius norms."""
    norms = {name: term.flatten(-2).norm(dim=-1) for name, term in paths.items()}  # (T, B) each
    total = sum(norms.values())
    return {name: (norm / total).mean().item() for name, norm in norms.items()}


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    gru = torch.nn.GRU(input_size=3, hidden_size=16, num_layers=2)
    x = torch.randn(50, 4, 3)  # (T, B, I)

    model = gl.load(gru)
    trace = model.trace(x)
    console.print(f"[bold]gatelens[/bold] {gl.__version__} — {model}")
    console.print(f"forward matches torch: max |Δoutput| = {(trace.output - gru(x)[0]).abs().max():.1e}")

    table = Table(title="Jacobian path shares ∂h_t/∂h_{t-1} (PyTorch GRU: reset after, update keep)")
    table.add_column("layer")
    for name in ("carry", "update", "candidate", "reset"):
        table.add_column(name, justify="right")
    table.add_column("mean ‖J‖₂", justify="right")
    for layer in range(model.num_layers):
        shares = path_shares(trace.jacobian_paths(layer=layer))
        spectral = torch.linalg.matrix_norm(trace.jacobians(layer=layer), ord=2).mean().item()
        table.add_row(
            str(layer), *(f"{shares[p]:.1%}" for p in ("carry", "update", "candidate", "reset")), f"{spectral:.3f}"
        )
    console.print(table)

    stacked = trace.jacobians()  # the two layers as one recurrence: (T, B, 32, 32)
    console.print(
        f"stack Jacobian: {tuple(stacked.shape)}; layer 1 reads layer 0 at the same step, so its "
        f"lower-left block is non-zero: {stacked[..., 16:, :16].abs().max():.3f}"
    )

    # Self-check in float64: the stack's Jacobian against autograd through torch.nn.GRU's own step.
    gru64, x64 = gru.double(), x.double()
    stack64 = model.to(torch.float64).trace(x64).recurrence()  # state [h⁰, h¹], 32 wide
    jacobians64, worst = stack64.jacobians(), 0.0
    for step in range(5):
        for b in range(4):

            def one_step(h: torch.Tensor, step: int = step, b: int = b) -> torch.Tensor:
                return gru64(x64[step : step + 1, b], h.view(2, 16))[1].reshape(-1)

            expected = torch.func.jacrev(one_step)(stack64.states[step, b])
            worst = max(worst, (jacobians64[step, b] - expected).abs().max().item())
    console.print(f"float64 check vs autograd through torch.nn.GRU: max |ΔJ| = {worst:.1e}")
    if worst > 1e-10:
        raise SystemExit(f"self-check failed: the Jacobians differ from autograd by {worst:.1e}")

    # The three gate cases (z ≈ 1 carries; z ≈ r ≈ 0 blocks; z ≈ 0, r ≈ 1 is Elman-like), reset before, update keep.
    cell = gl.GRU.random(3, 8, reset="before", update="keep", seed=0, dtype=torch.float64)
    cases = {"z → 1": (40.0, 0.0), "z → 0, r → 0": (-40.0, -40.0), "z → 0, r → 1": (-40.0, 40.0)}
    seed_table = Table(title="The gate cases: ‖J‖ with saturated gate biases (reset before)")
    for column in ("case", "‖J − I‖", "‖J‖", "‖J − diag(1−n²) W_hn‖"):
        seed_table.add_column(column, justify="right")
    for case, (z_bias, r_bias) in cases.items():
        weights = dict(
            cell.weights,
            b_iz=torch.full((8,), z_bias, dtype=torch.float64),
            b_ir=torch.full((8,), r_bias, dtype=torch.float64),
        )
        seed_trace = gl.load(gl.GRU(weights, reset="before")).trace(x[:5].double())
        jacobian = seed_trace.jacobians()
        elman = (1 - seed_trace.recurrence().cache.n ** 2).unsqueeze(-1) * weights["W_hn"]
        eye = torch.eye(8, dtype=torch.float64)
        seed_table.add_row(
            case, *(f"{torch.linalg.matrix_norm(m).max():.2e}" for m in (jacobian - eye, jacobian, jacobian - elman))
        )
    console.print(seed_table)
    blocking_credit(console)

    horizon = gl.propagation(trace).horizon(eps=1e-2)  # the stack, from the last step back
    console.print(f"gradient horizon of the 2-layer GRU (‖∂h_T/∂h_(T−ℓ)‖₂ < 1e-2) per sequence: {horizon[0].tolist()}")
    gru_versus_elman(console, x)

    blocked = gl.what_if(trace, clamp={"z": 0.0, "r": 0.0}, steps=[24])  # both layers, every unit, step 25
    console.print("[bold]gl.explain[/bold] of the GRU with z = r = 0 clamped at step 25 (what-if):")
    console.print(gl.explain(blocked).render(), markup=False)


def gru_versus_elman(console: Console, x: torch.Tensor) -> None:
    """Rehmer & Kroll's comparison at initialisation: local gradients, gradient horizon and top Lyapunov exponent."""
    models = {
        "GRU": gl.load(torch.nn.GRU(input_size=3, hidden_size=16)),
        "Elman": gl.load(torch.nn.RNN(input_size=3, hidden_size=16)),
    }
    table = Table(title="GRU vs Elman RNN, 16 units, PyTorch's initialisation, same inputs")
    for column in ("model", "local gradient median", "p95", "max", "horizon (median)", "λ₁ per step"):
        table.add_column(column, justify="right")
    for name, model in models.items():
        trace = model.trace(x)
        local = gl.local_gradients(trace).summary()["all"]
        horizon = gl.propagation(trace).horizon(eps=1e-2)[0].float().median().item()
        top = gl.lyapunov(trace, k=1, warmup=10).largest.mean().item()
        table.add_row(name, *(f"{local[key]:.3f}" for key in ("median", "p95", "max")), f"{horizon:.0f}", f"{top:.3f}")
    console.print(table)


def blocking_credit(console: Console, steps: int = 20, blocked: int = 10) -> None:
    """The blocking question: a step with z ≈ r ≈ 0 on every unit; where does ∂L/∂W_iz still come from?"""
    cell = gl.GRU.random(4, 8, seed=1, dtype=torch.float64)
    weights = {name: w.clone() for name, w in cell.weights.items()}
    weights["W_iz"][:, 0] = weights["W_ir"][:, 0] = -60.0  # input feature 0 drives z and r to 0 …
    x = torch.randn(steps, 4, 4, dtype=torch.float64)
    x[:, :, 0] = 0.0
    x[blocked, :, 0] = 1.0  # … at one step only
    trace = gl.load(gl.GRU(weights)).trace(x)
    table = Table(title=f"Credit for ∂L/∂W_iz with z ≈ r ≈ 0 at step {blocked + 1} of {steps}")
    for column in ("loss", "‖∂L/∂W_iz‖", f"share from source steps ≤ {blocked}"):
        table.add_column(column, justify="right")
    for loss, targets in (("last", torch.zeros(4, 8)), ("all", torch.zeros(steps, 4, 8))):
        cm = gl.credit(trace, loss=loss, targets=targets.double())
        per_source = cm.by_source["l0.W_iz"].flatten(1).norm(dim=1)
        share = (per_source[:blocked].sum() / per_source.sum()).item()
        table.add_row(loss, f"{cm.total['l0.W_iz'].norm():.3e}", f"{share:.1%}")
    console.print(table)


if __name__ == "__main__":
    main()
