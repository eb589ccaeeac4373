"""Row bounds of the Jacobians, blocking decided from them, one-pass backward steps and flushed subnormals.

* ``jacobian_row_bounds`` / ``input_jacobian_row_bounds`` of every cell configuration (tests/cell_configs.py), in
  float64 and float32, gates saturated or not: lower ≤ ‖J[i, :]‖ ≤ upper against the rows of the formed matrices;
  a stack's rows against its formed block-triangular J;
* blocking against a brute force that forms every J: the collapsed rows, the events' ‖J‖_F and their order, with tol
  set among the rows so that the bounds leave many rows open (hypothesis over models, padding and tol);
* ``Recurrence.backward`` equals ``param_factors`` and ``state_vjp`` taken apart, over padding, with few and many
  covectors (a GRU forms its step's J for many, an LSTM its cell-gate rows); a stack's ``product_vjp`` equals the
  formed product (hypothesis over layer kinds, sizes and lags);
* ``subnormals_flushed``: inside, subnormal results read 0; outside, the caller's setting is back; a float32 credit
  map whose chains pass through the subnormal range equals the unflushed one above the smallest normal number.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatelens as gl
from gatelens.analysis.norms import subnormals_flushed
from gatelens.cells.base import FORM_FROM
from gatelens.cells.lstm import FORM_CELL_ROWS_FROM
from tests.cell_configs import CELL_CASES, F64, CellCase, relative_error, scaled

norms_module = importlib.import_module("gatelens.analysis.norms")
BATCH = 4
SLACK = {torch.float64: 1e-12, torch.float32: 1e-5}  # relative: the formed matrix's own rounding


def _cache(cell: gl.Cell, seed: int, spread: float = 0.8) -> Any:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, BATCH, cell.input_size, generator=generator, dtype=F64).to(cell.dtype)
    s = spread * torch.randn(2, BATCH, cell.state_size, generator=generator, dtype=F64).to(cell.dtype)
    return cell.step(x, s)[1]


def _in_dtype(cell: gl.Cell, dtype: torch.dtype) -> gl.Cell:
    return cell.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("factor", [1.0, 4.0, 0.0])  # 4: saturated gates; 0: every weight zero
@pytest.mark.parametrize("case", CELL_CASES, ids=str)
def test_row_bounds_hold_for_every_cell(case: CellCase, factor: float, dtype: torch.dtype) -> None:
    built = case.build()
    layers = tuple(scaled(layer, factor) for layer in (built.cells if isinstance(built, gl.Stack) else (built,)))
    cell = _in_dtype(gl.Stack(layers) if isinstance(built, gl.Stack) else layers[0], dtype)
    cache = _cache(cell, seed=3)
    slack = SLACK[dtype]
    rows = torch.linalg.vector_norm(cell.jacobian(cache).double(), dim=-1)
    bounds = cell.jacobian_row_bounds(cache)
    assert bounds.lower.shape == bounds.upper.shape == rows.shape
    assert bool((bounds.lower.double() <= rows * (1 + slack) + 1e-30).all()), (case, bounds.lower, rows)
    assert bool((bounds.upper.double() >= rows * (1 - slack)).all()), (case, bounds.upper, rows)
    input_rows = torch.linalg.vector_norm(cell.input_jacobian(cache).double(), dim=-1)
    assert bool((cell.input_jacobian_row_bounds(cache).double() >= input_rows * (1 - slack)).all()), case


def test_a_single_cells_row_bounds_are_tight_where_its_rows_are_exact() -> None:
    """Elman and GRU (reset "after") give their rows in closed form: the bounds only widen them by rounding."""
    for cell in (gl.Elman.random(3, 6, dtype=F64, seed=1), gl.GRU.random(3, 6, dtype=F64, seed=2)):
        cache = _cache(cell, seed=4)
        rows = torch.linalg.vector_norm(cell.jacobian(cache), dim=-1)
        bounds = cell.jacobian_row_bounds(cache)
        assert relative_error(bounds.lower, rows) <= 1e-12
        assert relative_error(bounds.upper, rows) <= 1e-12


def test_padded_steps_have_unit_rows() -> None:
    trace = gl.load(nn.GRU(3, 4, num_layers=2).double()).trace(torch.randn(5, 3, 3, dtype=F64), lengths=[5, 2, 4])
    bounds = trace.recurrence().jacobian_row_bounds()
    padded = ~trace.recurrence().mask
    assert torch.equal(bounds.lower[padded], torch.ones_like(bounds.lower[padded]))
    assert torch.equal(bounds.upper[padded], torch.ones_like(bounds.upper[padded]))


# ---------------------------------------------------------------------------------------------------------------
# Blocking against forming every Jacobian


def _brute_force(trace: gl.Trace, tol: float) -> tuple[dict[str, Tensor], list[tuple[str, int, int, float]]]:
    """The collapsed-row counts (T, B) per recurrence and every event (recurrence, step, sequence, ‖J‖_F) in the
    documented order, from the formed Jacobians."""
    counts, events = {}, []
    for layer, direction in gl.analysis.pipeline.recurrence_parts(trace):
        rec = trace.recurrence(layer, direction)
        jacobians = rec.jacobians()
        below = torch.linalg.vector_norm(jacobians.double(), dim=-1) < tol
        if rec.mask is not None:
            below &= rec.mask[..., None]
        counts[rec.name] = below.sum(-1)
        norms = torch.linalg.matrix_norm(jacobians.double())
        for step, sequence in torch.nonzero(counts[rec.name]).tolist():
            count = int(counts[rec.name][step, sequence])
            events.append((rec.name, step, sequence, count, float(norms[step, sequence])))
    events.sort(key=lambda event: (-event[3], event[1] == 0, event[4]))
    return counts, [(name, step, sequence, norm) for name, step, sequence, _, norm in events]


MODELS = {
    "gru-stack": lambda: nn.GRU(3, 5, num_layers=2),
    "lstm-stack": lambda: nn.LSTM(3, 4, num_layers=2),
    "lstm-proj": lambda: nn.LSTM(3, 5, num_layers=2, proj_size=2),
    "rnn-relu": lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
    "gru-bidirectional": lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True),
}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(MODELS)),
    seed=st.integers(0, 10_000),
    gain=st.sampled_from([0.5, 1.0, 3.0]),
    quantile=st.floats(0.05, 0.95),
    padded=st.booleans(),
)
def test_blocking_decided_from_bounds_equals_forming_every_jacobian(
    name: str, seed: int, gain: float, quantile: float, padded: bool
) -> None:
    torch.manual_seed(seed)
    module = MODELS[name]().double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(gain)
    steps, batch = 7, 3
    x = torch.randn(steps, batch, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    trace = gl.load(module).trace(x, lengths=[7, 3, 5] if padded else None)
    rows = torch.cat([torch.linalg.vector_norm(rec.jacobians(), dim=-1).flatten() for rec in _recurrences(trace)])
    rows = rows[rows > 0]  # dead ReLU units have zero rows
    tol = float(torch.quantile(rows, quantile)) if len(rows) else 0.1  # among the rows: many are left open
    found = gl.blocking(trace, tol=tol, max_events=6)
    counts, events = _brute_force(trace, tol)
    assert set(found.collapsed) == set(counts)
    for rec_name, count in counts.items():
        assert torch.equal(found.collapsed[rec_name], count), rec_name
    assert found.total_events == len(events)
    got = [(event.recurrence, event.step, event.sequence) for event in found.events]
    expected = [(rec_name, step, sequence) for rec_name, step, sequence, _ in events[:6]]
    norms = {(rec_name, step, sequence): norm for rec_name, step, sequence, norm in events}
    assert [norms[key] for key in got] == pytest.approx([norm for *_, norm in events[:6]], rel=1e-12)
    for event in found.events:
        assert event.jacobian_norm == pytest.approx(norms[(event.recurrence, event.step, event.sequence)], rel=1e-12)
    ties = len({norm for *_, norm in events[:6]}) < len(events[:6])
    if not ties:
        assert got == expected


def _recurrences(trace: gl.Trace) -> list[Any]:
    return [trace.recurrence(layer, direction) for layer, direction in gl.analysis.pipeline.recurrence_parts(trace)]


# ---------------------------------------------------------------------------------------------------------------
# One pass of backpropagation


@pytest.mark.parametrize("covectors", [1, FORM_FROM + 1])
@pytest.mark.parametrize("name", ["gru-stack", "lstm-stack", "rnn-relu"])
def test_backward_equals_its_two_parts(name: str, covectors: int) -> None:
    torch.manual_seed(1)
    trace = gl.load(MODELS[name]().double()).trace(torch.randn(6, 3, 3, dtype=F64), lengths=[6, 2, 4])
    rec = trace.recurrence()
    v = torch.randn(covectors, 3, rec.cell.state_size, dtype=F64)
    for step in range(rec.steps):
        factors, vjp = rec.backward(v, steps=step)
        apart = rec.param_factors(v, steps=step)
        assert relative_error(vjp, rec.state_vjp(v, steps=step)) <= 1e-12
        one_by_one = torch.stack([rec.state_vjp(v[index], steps=step) for index in range(covectors)])
        assert relative_error(vjp, one_by_one) <= 1e-12
        assert set(factors) == set(apart)
        for block, factor in factors.items():
            assert relative_error(factor.contract(), apart[block].contract()) <= 1e-12


MANY_COVECTORS = {  # cells with a formed path for many covectors, and how many covectors reach it
    "gru-after": (lambda: gl.GRU.random(3, 6, dtype=F64, seed=5), FORM_FROM),
    "gru-before": (lambda: gl.GRU.random(3, 6, reset="before", dtype=F64, seed=5), FORM_FROM),
    "lstm": (lambda: gl.LSTM.random(3, 5, dtype=F64, seed=5), FORM_CELL_ROWS_FROM),
    "lstm-proj": (lambda: gl.LSTM.random(3, 5, projection=2, dtype=F64, seed=5), FORM_CELL_ROWS_FROM),
}


@pytest.mark.parametrize("name", list(MANY_COVECTORS))
def test_a_cell_gives_the_same_products_for_many_covectors(name: str) -> None:
    """With many covectors per sequence a GRU (reset "after") multiplies them by its formed J, an LSTM by its formed
    cell-gate rows; the result is the matrix-free product's, and the formed Jacobian's."""
    build, many = MANY_COVECTORS[name]
    cell = scaled(build(), 2.0)
    cache = _cache(cell, seed=6)
    v = torch.randn(many + 3, 2, BATCH, cell.state_size, dtype=F64)
    state = torch.stack([cell.state_vjp(cache, row) for row in v])
    inputs = torch.stack([cell.input_vjp(cache, row) for row in v])
    assert relative_error(cell.state_vjp(cache, v), state) <= 1e-12
    assert relative_error(cell.input_vjp(cache, v), inputs) <= 1e-12
    formed = torch.einsum("cabs,abso->cabo", v, cell.jacobian(cache))
    assert relative_error(formed, state) <= 1e-12
    formed_inputs = torch.einsum("cabs,abso->cabo", v, cell.input_jacobian(cache))
    assert relative_error(formed_inputs, inputs) <= 1e-12


@settings(max_examples=15, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["gru", "lstm", "elman"]), min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    lags=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_product_vjp_of_a_stack_equals_the_formed_product(
    kinds: list[str], sizes: list[int], lags: int, seed: int
) -> None:
    """P · J for P a product of a stack's Jacobians: its rows of a lower layer skip the layers above (zero there),
    and the result equals P @ J formed, on padded steps too (J = I)."""
    build = {"gru": gl.GRU.random, "lstm": gl.LSTM.random, "elman": gl.Elman.random}
    inputs = [3, *sizes]
    layers = [
        build[kind](inputs[index], sizes[index], dtype=F64, seed=seed + index) for index, kind in enumerate(kinds)
    ]
    trace = gl.Model(layers).trace(torch.randn(5, 3, 3, dtype=F64), lengths=[5, 2, 4])
    rec = trace.recurrence()
    jacobians = rec.jacobians()
    product = torch.eye(rec.cell.state_size, dtype=F64).expand(3, -1, -1)
    for step in range(4, 4 - lags, -1):
        product = product @ jacobians[step]
    step = 4 - lags
    rows = product.transpose(0, 1)  # (S rows, B, S)
    got = rec.product_vjp(rows, steps=step).transpose(0, 1)
    assert relative_error(got, product @ jacobians[step]) <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Subnormals


def _subnormal_doubled() -> float:
    return float(torch.full((1,), torch.finfo(torch.float32).tiny / 4) * 2)


def test_subnormals_are_flushed_inside_and_the_setting_restored() -> None:
    assert _subnormal_doubled() > 0
    with subnormals_flushed():
        assert _subnormal_doubled() == 0
        with subnormals_flushed():
            assert _subnormal_doubled() == 0
        assert _subnormal_doubled() == 0
    assert _subnormal_doubled() > 0
    torch.set_flush_denormal(True)
    try:
        with subnormals_flushed():
            pass
        assert _subnormal_doubled() == 0  # the caller's setting, not the default
    finally:
        torch.set_flush_denormal(False)


def test_a_vanishing_float32_credit_map_is_unchanged_above_the_smallest_normal_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chains of a contracting GRU pass 1e-38 within the trace: flushed, the pair norms and lag profile equal the
    unflushed ones wherever those are normal numbers, and read 0 only where those are below the smallest normal."""
    torch.manual_seed(0)
    module = nn.GRU(3, 8, num_layers=2)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(0.3)
    trace = gl.load(module).trace(torch.randn(200, 2, 3))
    flushed = gl.probe_credits(trace)["many-to-many"]
    flushed_norms, flushed_lags = flushed.norms, flushed.by_lag
    monkeypatch.setattr(norms_module, "_flushing", lambda: True)  # the guard then leaves arithmetic as it is
    plain = gl.probe_credits(trace)["many-to-many"]
    tiny = torch.finfo(torch.float32).tiny
    for results, exact in ((flushed_norms, plain.norms), (flushed_lags, plain.by_lag)):
        for block, values in results.items():
            reference = exact[block]
            assert bool((reference < tiny).any()) or block.endswith("b_hn"), "the chains should pass 1e-38"
            normal = reference >= 1e3 * tiny  # far enough above the band that rounding of flushed parts is moot
            assert relative_error(values[normal], reference[normal]) <= 1e-4, block
            assert bool((values[~normal] <= 1e4 * tiny).all()), block
