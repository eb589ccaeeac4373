"""Every cell's forward and derivatives against the reference step and torch autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev

import gatelens as gl
from tests.cell_configs import CELL_CASES, F64, CellCase, reference_step, relative_error

BATCH = 4
TOL = 1e-10


def _data(cell: gl.Cell, seed: int = 0, lead: tuple[int, ...] = (BATCH,)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cell.input_size, generator=generator, dtype=F64)
    s = torch.randn(*lead, cell.state_size, generator=generator, dtype=F64) * 0.8
    return x, s


def _per_element(function, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply a per-vector function to each row of (B, ·) tensors and stack."""
    return torch.stack([function(*(t[b] for t in tensors)) for b in range(tensors[0].shape[0])])


@pytest.fixture(params=CELL_CASES, ids=str)
def case(request: pytest.FixtureRequest) -> CellCase:
    return request.param


def test_forward_matches_reference(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    new, _ = cell.step(x, s)
    expected = _per_element(lambda xb, sb: reference_step(cell)(cell.weights, xb, sb), x, s)
    assert relative_error(new, expected) <= 1e-13


def test_paths_sum_to_jacobian_which_equals_autograd(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    _, cache = cell.step(x, s)
    paths = cell.jacobian_paths(cache)
    assert tuple(paths) == cell.path_names
    jacobian = cell.jacobian(cache)
    assert relative_error(sum(paths.values()), jacobian) <= 1e-14
    step = reference_step(cell)
    expected = _per_element(lambda xb, sb: jacrev(lambda h: step(cell.weights, xb, h))(sb), x, s)
    assert jacobian.shape == (BATCH, cell.state_size, cell.state_size)
    assert relative_error(jacobian, expected) <= TOL


def test_input_jacobian_equals_autograd(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    _, cache = cell.step(x, s)
    step = reference_step(cell)
    expected = _per_element(lambda xb, sb: jacrev(lambda xx: step(cell.weights, xx, sb))(xb), x, s)
    assert relative_error(cell.input_jacobian(cache), expected) <= TOL


def test_vjps_take_many_adjoints_at_once(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    _, cache = cell.step(x, s)
    v = torch.randn(3, 2, BATCH, cell.state_size, dtype=F64)  # two extra leading dims of adjoint chains
    expected_state = torch.einsum("cdbi,bij->cdbj", v, cell.jacobian(cache))
    expected_input = torch.einsum("cdbi,bij->cdbj", v, cell.input_jacobian(cache))
    assert relative_error(cell.state_vjp(cache, v), expected_state) <= TOL
    assert relative_error(cell.input_vjp(cache, v), expected_input) <= TOL


def test_param_vjp_equals_autograd_for_every_block(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    _, cache = cell.step(x, s)
    v = torch.randn(2, BATCH, cell.state_size, dtype=F64)
    got = cell.param_vjp(cache, v)
    assert set(got) == set(cell.weights)
    step = reference_step(cell)
    for chain in range(v.shape[0]):
        weights = {k: w.clone().requires_grad_(True) for k, w in cell.weights.items()}
        new = _per_element(lambda xb, sb: step(weights, xb, sb), x, s)
        grads = torch.autograd.grad((new * v[chain]).sum(), list(weights.values()), allow_unused=True)
        for (name, weight), grad in zip(weights.items(), grads):
            expected = torch.zeros_like(weight) if grad is None else grad
            assert got[name].shape == (2, *weight.shape), name
            assert relative_error(got[name][chain], expected) <= TOL, name


def test_derivatives_broadcast_over_time_and_batch(case: CellCase) -> None:
    """A cache stacked over T steps gives, in one call, what T per-step calls give."""
    cell = case.build()
    steps = 3
    x, s = _data(cell, seed=1, lead=(steps, BATCH))
    per_step = [cell.step(x[t], s[t])[1] for t in range(steps)]
    _, stacked = cell.step(x, s)
    v = torch.randn(steps, BATCH, cell.state_size, dtype=F64)
    batched_params = cell.param_vjp(stacked, v)
    for t, cache in enumerate(per_step):
        assert relative_error(cell.jacobian(stacked)[t], cell.jacobian(cache)) <= 1e-14
        for name, grad in cell.param_vjp(cache, v[t]).items():
            assert relative_error(batched_params[name][t], grad) <= 1e-13, name


def test_finite_difference_spot_check(case: CellCase) -> None:
    """Central differences on one state column and one entry of every weight block."""
    cell = case.build()
    x, s = _data(cell, seed=2, lead=(1,))
    _, cache = cell.step(x, s)
    eps = 1e-6
    column = cell.state_size - 1
    bump = torch.zeros_like(s)
    bump[0, column] = eps
    difference = (cell.step(x, s + bump)[0] - cell.step(x, s - bump)[0]) / (2 * eps)
    assert torch.allclose(cell.jacobian(cache)[0, :, column], difference[0], rtol=1e-6, atol=1e-8)

    v = torch.randn(1, cell.state_size, dtype=F64)
    grads = cell.param_vjp(cache, v)
    for name, weight in cell.weights.items():
        index = (0,) * weight.dim()
        loss = []
        for sign in (1, -1):
            shifted = dict(cell.weights)
            shifted[name] = weight.clone()
            shifted[name][index] += sign * eps
            moved = _rebuild(cell, shifted)
            loss.append((moved.step(x, s)[0] * v).sum())
        assert abs(grads[name][index].item() - (loss[0] - loss[1]).item() / (2 * eps)) <= 1e-6, name


def _rebuild(cell: gl.Cell, weights: dict[str, torch.Tensor]) -> gl.Cell:
    if isinstance(cell, gl.Stack):
        return gl.Stack(
            [
                _rebuild(layer, {k.split(".", 1)[1]: w for k, w in weights.items() if k.startswith(f"l{i}.")})
                for i, layer in enumerate(cell.cells)
            ]
        )
    options = {
        k: getattr(cell, k) for k in ("reset", "update", "gate", "candidate", "nonlinearity") if hasattr(cell, k)
    }
    return type(cell)(weights, **options)


def test_float32_agrees_with_float64(case: CellCase) -> None:
    cell = case.build()
    x, s = _data(cell)
    _, cache64 = cell.step(x, s)
    cell32 = cell.to(torch.float32)
    _, cache32 = cell32.step(x.float(), s.float())
    assert cell32.dtype == torch.float32
    assert relative_error(cell32.jacobian(cache32).double(), cell.jacobian(cache64)) <= 1e-5


@pytest.mark.parametrize(("dtype", "bias", "tol"), [(torch.float64, -25.0, 1e-12), (torch.float32, -19.0, 1e-4)])
def test_update_replace_keeps_z_times_n_when_z_is_below_eps(dtype: torch.dtype, bias: float, tol: float) -> None:
    """Regression: h' = (1 − z)h + z n was formed as (1 − c)n with c = 1 − z, so z n rounded away once z < eps (the
    long-memory regime of update "replace"): h_T and ∂L/∂W_in came out exactly 0 in float32."""
    weights = dict(gl.GRU.random(2, 3, update="replace", seed=0, dtype=F64).weights)
    weights |= {"W_iz": torch.zeros(3, 2, dtype=F64), "W_hz": torch.zeros(3, 3, dtype=F64)}
    weights |= {"b_iz": torch.full((3,), bias, dtype=F64), "b_hz": torch.zeros(3, dtype=F64)}  # z = σ(bias)
    x = torch.randn(300, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    cell = gl.GRU({k: w.to(dtype) for k, w in weights.items()}, update="replace")
    trace = gl.Model(cell).trace(x.to(dtype))
    step = reference_step(gl.GRU(weights, update="replace"))
    leaves = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    h = torch.zeros(3, dtype=F64)
    for t in range(300):
        h = step(leaves, x[t, 0], h)
    (expected_grad,) = torch.autograd.grad(h.sum(), [leaves["W_in"]])
    assert relative_error(trace.final_state[0, 0].double(), h.detach()) <= tol
    out_grads = torch.zeros_like(trace.output)
    out_grads[-1] = 1.0
    got = gl.credit(trace, out_grads).total["l0.W_in"].double()
    assert relative_error(got, expected_grad) <= tol * 10
    z = torch.sigmoid(torch.tensor(bias, dtype=F64))
    tau = gl.regimes(trace).timescale.double()
    assert relative_error(tau, torch.full((3,), float(1 / z), dtype=F64)) <= tol  # τ = 1/z̄, not 1/(1 − (1 − z̄))
