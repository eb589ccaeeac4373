"""Every cell's forward and derivatives against the reference step and torch autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
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


def _long_memory_gru_oracle(weights: dict[str, Tensor], x: Tensor, update: str) -> tuple[Tensor, Tensor]:
    """h_T and ∂(Σ h_T)/∂W_in of a reset-"after" GRU in float64, written from the formula with 1 − z = σ(−a_z)."""
    leaves = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    w = leaves
    h = torch.zeros(3, dtype=F64)
    for t in range(x.shape[0]):
        a_z = w["W_iz"] @ x[t] + w["b_iz"] + w["W_hz"] @ h + w["b_hz"]
        r = torch.sigmoid(w["W_ir"] @ x[t] + w["b_ir"] + w["W_hr"] @ h + w["b_hr"])
        n = torch.tanh(w["W_in"] @ x[t] + w["b_in"] + r * (w["W_hn"] @ h + w["b_hn"]))
        z, z_complement = torch.sigmoid(a_z), torch.sigmoid(-a_z)
        h = z * h + z_complement * n if update == "keep" else z_complement * h + z * n
    (gradient,) = torch.autograd.grad(h.sum(), [leaves["W_in"]])
    return h.detach(), gradient


@pytest.mark.parametrize("update", ["replace", "keep"])
@pytest.mark.parametrize(("dtype", "bias", "tol"), [(torch.float64, 25.0, 1e-12), (torch.float32, 19.0, 1e-4)])
def test_a_share_below_eps_is_kept_in_both_update_conventions(
    update: str, dtype: torch.dtype, bias: float, tol: float
) -> None:
    """Regression: the state keeps all but a share below eps (z → 0 under "replace", z → 1 under "keep"). That share
    was formed as 1 − (1 − z), or as 1 − σ(a) with σ(a) rounded to 1, so it rounded away: h_T and ∂L/∂W_in came
    out exactly 0 in float32 (torch's own GRU rounds it away too) and τ infinite."""
    weights = dict(gl.GRU.random(2, 3, seed=0, dtype=F64).weights)
    weights |= {"W_iz": torch.zeros(3, 2, dtype=F64), "W_hz": torch.zeros(3, 3, dtype=F64)}
    kept = bias if update == "keep" else -bias  # z = σ(kept): the share renewed per step is σ(−bias)
    weights |= {"b_iz": torch.full((3,), kept, dtype=F64), "b_hz": torch.zeros(3, dtype=F64)}
    x = torch.randn(300, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    trace = gl.Model(gl.GRU({k: w.to(dtype) for k, w in weights.items()}, update=update)).trace(x.to(dtype))
    expected_state, expected_grad = _long_memory_gru_oracle(weights, x[:, 0], update)
    assert relative_error(trace.final_state[0, 0].double(), expected_state) <= tol
    out_grads = torch.zeros_like(trace.output)
    out_grads[-1] = 1.0
    got = gl.credit(trace, out_grads).total["l0.W_in"].double()
    assert relative_error(got, expected_grad) <= tol * 10
    renewed = torch.sigmoid(torch.tensor(-bias, dtype=F64))
    tau = gl.regimes(trace).timescale.double()
    assert relative_error(tau, torch.full((3,), float(1 / renewed), dtype=F64)) <= tol  # τ = 1/(1 − c̄), c̄ → 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_lstm_forget_gate_within_eps_of_one_has_a_finite_timescale(dtype: torch.dtype) -> None:
    """1 − f is σ(−a_f): with b_if = 25, f is 1 in float32 and 1 − 1.4e-11 in float64, τ = 1/σ(−25) = 7.2e10."""
    weights = dict(gl.LSTM.random(2, 3, seed=0, dtype=dtype).weights)
    weights |= {"W_if": torch.zeros(3, 2, dtype=dtype), "W_hf": torch.zeros(3, 3, dtype=dtype)}
    weights |= {"b_if": torch.full((3,), 25.0, dtype=dtype), "b_hf": torch.zeros(3, dtype=dtype)}
    trace = gl.Model(gl.LSTM(weights)).trace(torch.randn(20, 2, 2, dtype=dtype))
    expected = 1 / torch.sigmoid(torch.tensor(-25.0, dtype=F64))
    assert relative_error(gl.regimes(trace).timescale.double(), expected.expand(3)) <= 1e-6
