"""Property tests over random sizes, conventions, activations, dtypes and seeds."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev

import gatelens as gl
from tests.cell_configs import reference_step, relative_error

sizes = st.integers(min_value=1, max_value=6)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@st.composite
def cells(draw: st.DrawFn, inputs: int | None = None, dtype: torch.dtype = torch.float64) -> gl.Cell:
    """A random cell of any kind and convention; ``inputs`` fixes its input size."""
    kind = draw(st.sampled_from(["GRU", "Elman", "LSTM"]))
    inputs = inputs or draw(sizes)
    hidden, seed, bias = draw(sizes), draw(seeds), draw(st.booleans())
    if kind == "GRU":
        return gl.GRU.random(
            inputs,
            hidden,
            seed=seed,
            bias=bias,
            dtype=dtype,
            reset=draw(st.sampled_from(["after", "before"])),
            update=draw(st.sampled_from(["keep", "replace"])),
            gate=draw(st.sampled_from(["sigmoid", "hard_sigmoid_keras2", "hard_sigmoid_keras3"])),
        )
    if kind == "Elman":
        return gl.Elman.random(
            inputs, hidden, seed=seed, bias=bias, dtype=dtype, nonlinearity=draw(st.sampled_from(["tanh", "relu"]))
        )
    projection = draw(st.one_of(st.none(), st.integers(1, hidden)))
    return gl.LSTM.random(inputs, hidden, projection=projection, seed=seed, bias=bias, dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(cell=cells(), batch=st.integers(1, 3), seed=seeds)
def test_jacobian_and_param_vjp_match_autograd(cell: gl.Cell, batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cell.input_size, generator=generator, dtype=torch.float64)
    s = torch.randn(batch, cell.state_size, generator=generator, dtype=torch.float64)
    _, cache = cell.step(x, s)
    step = reference_step(cell)
    expected = torch.stack([jacrev(lambda h: step(cell.weights, x[b], h))(s[b]) for b in range(batch)])
    paths = cell.jacobian_paths(cache)
    assert relative_error(sum(paths.values()), expected) <= 1e-10

    v = torch.randn(batch, cell.state_size, generator=generator, dtype=torch.float64)
    weights = {k: w.clone().requires_grad_(True) for k, w in cell.weights.items()}
    new = torch.stack([step(weights, x[b], s[b]) for b in range(batch)])
    grads = torch.autograd.grad((new * v).sum(), list(weights.values()), allow_unused=True)
    got = cell.param_vjp(cache, v)
    for (name, weight), grad in zip(weights.items(), grads):
        assert relative_error(got[name], torch.zeros_like(weight) if grad is None else grad) <= 1e-10, name


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    depth=st.integers(1, 3),
    steps=st.integers(1, 5),
    batch=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_stacked_trace_jacobians_chain_to_the_end_to_end_derivative(
    data: st.DataObject, depth: int, steps: int, batch: int, dtype: torch.dtype, seed: int
) -> None:
    """Π_i J_i over a whole trace equals autograd's ∂h_T/∂h_0 through the cells' own steps, in both dtypes."""
    layers = [data.draw(cells())]
    for _ in range(depth - 1):
        layers.append(data.draw(cells(inputs=layers[-1].output_size)))
    model = gl.load(layers).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, model.input_size, generator=generator, dtype=dtype)
    rec = model.trace(x).recurrence()
    product = torch.eye(rec.cell.state_size, dtype=dtype).expand(batch, -1, -1)
    for jacobian in rec.jacobians():
        product = jacobian @ product

    def run(h0: torch.Tensor) -> torch.Tensor:
        state = h0
        for step in range(steps):
            state, _ = rec.cell.step(x[step, :1], state)
        return state[0]

    expected = jacrev(run)(rec.states[0, :1])[:, 0]
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert relative_error(product[0], expected) <= tolerance


@settings(max_examples=30, deadline=None)
@given(cell=cells(), steps=st.integers(1, 6), batch=st.integers(1, 3), seed=seeds, data=st.data())
def test_gate_analyses_hold_their_identities(
    cell: gl.Cell, steps: int, batch: int, seed: int, data: st.DataObject
) -> None:
    """Over random cells: the Lyapunov sum equals the log-volume growth Σ_i log|det J_i| per counted step; clamping
    a gate to the value it already has changes nothing but its slope; the regime census sums to one."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, cell.input_size, generator=generator, dtype=torch.float64)
    trace = gl.Model(cell).trace(x)
    jacobians = trace.jacobians()
    log_volume = torch.linalg.slogdet(jacobians).logabsdet.sum(0) / steps  # (B,)
    exponents = gl.lyapunov(trace, k=None).exponents.sum(-1)  # all S of them
    finite = torch.isfinite(log_volume)
    assert torch.allclose(exponents[finite], log_volume[finite], rtol=1e-8, atol=1e-8)
    # where a Jacobian is exactly singular (a dead ReLU unit), the exponents beyond the numerical rank are −inf
    assert bool((exponents[~finite] == -torch.inf).all())

    census = gl.regimes(trace, data.draw(st.floats(0.01, 0.49))).census
    assert abs(float(census.sum()) - 1) <= 1e-12

    if cell.gate_names:
        gate = data.draw(st.sampled_from(cell.gate_names))
        step = data.draw(st.integers(0, steps - 1))
        value = getattr(trace.recurrence().cache, gate)[step, 0]  # sequence 0's own gate values at that step
        clamped = gl.what_if(trace, {gate: value.unsqueeze(0).expand(batch, -1)}, steps=step)
        assert relative_error(clamped.output[step, 0], trace.output[step, 0]) <= 1e-12
