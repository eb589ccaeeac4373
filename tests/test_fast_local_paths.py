"""Local gradients and path shares from the cells' closed forms (``param_energies``, ``input_energies``, ``path_vjps``).

Oracles, all in float64:

* the formulas these replace, written here: every one-hot covector e_j on h_k sent through ``param_factors``
  (ℓ_θ² = Σ_j ‖δ_j‖² ‖u‖²) and every path formed by ``jacobian_paths`` (‖ā P_p‖ / Σ_q ‖ā P_q‖);
* torch.func.jacrev of the reference step (tests/cell_configs.py): Σ_j ‖w_j · ∂s'/∂θ‖_F² over the one-hots and the
  rows of covectors given on the output, the squared column norms of ∂s'/∂x, and Σ_p v · P_p = v · ∂s'/∂s;
* the Cell protocol's own defaults (one adjoint per covector, paths formed), which a cell without closed forms keeps.

Cells: every convention of CELL_CASES and stacks of two to four mixed layers (rows are formed for three layers or
more, and for a GRU with reset "before" or an LSTM with a projection under another layer). Models: hypothesis draws
them as tests/test_flow_properties.py does: stacks of mixed layers read forward, backwards or both ways, padded
batches, saturated gates (gate biases pushed by up to ±40, weights × 3).

Tolerance: RTOL = 1e-10 relative. The sums of squares do not cancel (each is a sum of non-negative terms; the signed
cross terms of a feed's column energies are added to the one-hots' 1), so they are compared entry by entry: a tiny
local gradient at a saturated gate must be exact too. Path products, which do cancel, as max |error| over a step's
batch and state relative to the largest entry there.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacrev, vmap

import gatelens as gl
from gatelens.analysis.credit import path_shares
from gatelens.cells import Covectors, FactorEnergy
from tests import test_flow_properties as flow
from tests.cell_configs import CELL_CASES, F64, CellCase, reference_step, scaled

RTOL = 1e-10
B, I, ROWS = 3, 3, 4  # batch, input features, covectors given on a cell's output

EXTRA_CASES = [
    CellCase(
        "stack-gru-before-under-lstm",  # the layer below needs the rows of K (δ_r mixes units)
        lambda: gl.Stack(
            [
                scaled(gl.GRU.random(I, 4, reset="before", dtype=F64, seed=21), 2.0),
                scaled(gl.LSTM.random(4, 3, dtype=F64, seed=22), 2.0),
            ]
        ),
    ),
    CellCase(
        "stack-lstm-proj-under-gru",  # the layer below reads the rows through W_proj
        lambda: gl.Stack(
            [
                scaled(gl.LSTM.random(I, 4, projection=3, dtype=F64, seed=23), 2.0),
                scaled(gl.GRU.random(3, 3, update="replace", dtype=F64, seed=24), 2.0),
            ]
        ),
    ),
    CellCase(
        "stack-4-layers",  # products K^l ⋯ K^{m+1} over three feeds
        lambda: gl.Stack(
            [
                scaled(gl.LSTM.random(I, 3, dtype=F64, seed=25), 2.0),
                scaled(gl.GRU.random(3, 4, dtype=F64, seed=26), 2.0),
                scaled(gl.Elman.random(4, 3, nonlinearity="relu", dtype=F64, seed=27), 2.0),
                scaled(gl.GRU.random(3, 2, reset="before", update="replace", dtype=F64, seed=28), 2.0),
            ]
        ),
    ),
]
CASES = CELL_CASES + EXTRA_CASES


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def covectors(rows: Tensor) -> Covectors:
    """Covectors given by their rows (..., J, O), with their column energies."""
    return Covectors(rows.square().sum(-2), rows)


def block_energies(energies: dict[str, FactorEnergy]) -> dict[str, Tensor]:
    """Σ_j ‖w_j · ∂⁺s'/∂θ‖_F² per block from param_energies: adjoint · ‖u‖² (a bias: adjoint)."""
    return {
        name: e.adjoint if e.inputs is None else e.adjoint * e.inputs.square().sum(-1) for name, e in energies.items()
    }


def assert_entrywise(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    """|actual − expected| ≤ rtol · |expected| entry by entry (NaN where expected is NaN)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN at {actual.isnan()}, expected {expected}"
    valid = ~expected.isnan()
    error = (actual[valid] - expected[valid]).abs()
    bad = error > rtol * expected[valid].abs()
    assert not bool(bad.any()), f"{what}: {actual[valid][bad].tolist()} != {expected[valid][bad].tolist()}"


def assert_per_step(actual: Tensor, expected: Tensor, what: str, group_dims: int) -> None:
    """max |actual − expected| ≤ RTOL · max |expected| over each slice of the leading ``group_dims`` dimensions."""
    flow.assert_close(actual, expected, what, group_dims=group_dims, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# The formulas that the closed forms replace.


def one_hot_local_norms(rec: gl.Recurrence) -> dict[str, Tensor]:
    """ℓ_θ(k, b) = (Σ_j ‖δ_j‖²)^½ ‖u‖ with every one-hot e_j on h_k through ``param_factors``; NaN on padded steps."""
    steps, batch = rec.input_index.shape
    size = rec.cell.state_size
    one_hots = torch.eye(size, dtype=F64)[:, None, None, :].expand(size, steps, batch, size)
    norms = {}
    for name, (adjoint, inputs) in rec.param_factors(one_hots).items():
        norm = adjoint.square().sum((0, -1)).sqrt()
        norms[name] = norm if inputs is None else norm * inputs.norm(dim=-1)
    return norms if rec.mask is None else {name: torch.where(rec.mask, n, math.nan) for name, n in norms.items()}


def formed_path_products(rec: gl.Recurrence, adjoints: Tensor) -> dict[str, Tensor]:
    """ā_{i+1} P_p[i] with every path formed by ``jacobian_paths`` (padding included)."""
    return {name: (adjoints.unsqueeze(-2) @ path).squeeze(-2) for name, path in rec.jacobian_paths().items()}


def formed_path_shares(rec: gl.Recurrence, adjoints: Tensor) -> dict[str, Tensor]:
    """‖ā_{i+1} P_p[i]‖_F / Σ_q ‖ā_{i+1} P_q[i]‖_F, 0 where no adjoint arrives, keyed as the credit map keys them."""
    norms = {name: product.flatten(1).norm(dim=1) for name, product in formed_path_products(rec, adjoints).items()}
    total = sum(norms.values())
    shares = {
        name: torch.where(total > 0, norm / torch.where(total > 0, total, 1.0), 0.0) for name, norm in norms.items()
    }
    return rec.qualify(shares)


# ---------------------------------------------------------------------------------------------------------------
# One step of a cell against autograd.


def _step_at_random_state(cell: gl.Cell, seed: int) -> tuple[Tensor, Tensor, object]:
    """x (B, I), s (B, S) and the cache of cell.step at them."""
    x = _randn(B, cell.input_size, seed=seed)
    state = 0.8 * _randn(B, cell.state_size, seed=seed + 1)
    return x, state, cell.step(x, state)[1]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_param_energies_equal_jacrev_of_the_reference_step(case: CellCase) -> None:
    """Σ_j ‖w_j · ∂s'/∂θ‖_F² by jacrev, over the one-hots alone and with ROWS covectors R on the output:
    ‖∂s'/∂θ‖_F² + ‖R_pad ∂s'/∂θ‖_F², R_pad = R on the output entries, 0 on the rest of the state."""
    cell = case.build()
    x, state, cache = _step_at_random_state(cell, seed=1)
    jacobians = vmap(jacrev(reference_step(cell)), in_dims=(None, 0, 0))(dict(cell.weights), x, state)
    rows = _randn(B, ROWS, cell.output_size, seed=3)
    padded = cell.output_vjp(rows)  # (B, J, S)
    alone = block_energies(cell.param_energies(cache))
    given = block_energies(cell.param_energies(cache, covectors(rows)))
    assert set(alone) == set(given) == set(cell.weights)
    for name, jacobian in jacobians.items():
        flat = jacobian.flatten(2)  # (B, S, |θ|)
        expected = flat.square().sum((1, 2))
        assert_entrywise(alone[name], expected, f"{name}, one-hots")
        assert_entrywise(given[name], expected + (padded @ flat).square().sum((1, 2)), f"{name}, one-hots and rows")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_input_energies_equal_jacrev_of_the_reference_step(case: CellCase) -> None:
    """Σ_j (∂s'_j/∂x_i)² by jacrev."""
    cell = case.build()
    x, state, cache = _step_at_random_state(cell, seed=4)
    jacobian = vmap(jacrev(reference_step(cell), argnums=1), in_dims=(None, 0, 0))(dict(cell.weights), x, state)
    assert_entrywise(cell.input_energies(cache), jacobian.square().sum(-2), "input energies")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_path_vjps_equal_the_formed_paths_and_sum_to_jacrev(case: CellCase) -> None:
    """v · P_p against the formed paths, for v with an extra leading dimension; Σ_p v · P_p = v · ∂s'/∂s by jacrev;
    the cell's state_vjp is their sum."""
    cell = case.build()
    x, state, cache = _step_at_random_state(cell, seed=5)
    v = _randn(2, B, cell.state_size, seed=6)
    vjps = cell.path_vjps(cache, v)
    paths = cell.jacobian_paths(cache)
    assert list(vjps) == list(paths) == list(cell.path_names)
    for name, path in paths.items():
        assert_per_step(vjps[name], (v.unsqueeze(-2) @ path).squeeze(-2), f"path {name}", group_dims=2)
    jacobian = vmap(jacrev(reference_step(cell), argnums=2), in_dims=(None, 0, 0))(dict(cell.weights), x, state)
    expected = (v.unsqueeze(-2) @ jacobian).squeeze(-2)
    assert_per_step(sum(vjps.values()), expected, "Σ_p v · P_p", group_dims=2)
    assert_per_step(cell.state_vjp(cache, v), expected, "state_vjp", group_dims=2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rows_are_read_only_by_cells_that_say_so(case: CellCase) -> None:
    """A cell that does not need the covectors' rows gives the same sums from their column energies alone; one that
    needs them refuses column energies alone with a ValueError that says so."""
    cell = case.build()
    _, _, cache = _step_at_random_state(cell, seed=7)
    rows = _randn(B, ROWS, cell.output_size, seed=8)
    energies_only = Covectors(rows.square().sum(-2), None)
    if cell.energies_need_rows:
        with pytest.raises(ValueError, match="needs the rows of the covectors above"):
            cell.param_energies(cache, energies_only)
        return
    with_rows = block_energies(cell.param_energies(cache, covectors(rows)))
    without = block_energies(cell.param_energies(cache, energies_only))
    for name, energy in with_rows.items():
        assert torch.equal(without[name], energy), name


# ---------------------------------------------------------------------------------------------------------------
# Drawn models: the closed forms against the protocol's defaults and the former formulas.


@settings(max_examples=flow.examples(10))
@given(spec=flow.model_specs(modes=("forward", "reverse")), data=st.data())
def test_closed_forms_equal_the_protocol_defaults(spec: flow.ModelSpec, data: st.DataObject) -> None:
    """On every step of a drawn stack (or a layer of it): param_energies (with and without covectors on the output),
    input_energies and path_vjps against :class:`gl.Cell`'s defaults, which send one adjoint per covector through
    param_factors, form ∂s'/∂x, and form the paths."""
    case = flow.build(spec)
    choice, _ = data.draw(st.sampled_from(flow.recurrences(case)), "recurrence")
    rec = case.trace.recurrence(**choice)
    cell, cache = rec.cell, rec.cache
    rows = _randn(*rec.input_index.shape, ROWS, cell.output_size, seed=spec.seed)
    for above in (None, covectors(rows)):
        fast = block_energies(cell.param_energies(cache, above))
        default = block_energies(gl.Cell.param_energies(cell, cache, above))
        assert set(fast) == set(default) == set(cell.weights)
        for name, energy in default.items():
            assert_entrywise(fast[name], energy, f"{choice} {name}, rows given: {above is not None}")
    assert_entrywise(cell.input_energies(cache), gl.Cell.input_energies(cell, cache), f"{choice} input energies")
    v = _randn(*rec.input_index.shape, cell.state_size, seed=spec.seed + 1)
    fast_paths, formed = cell.path_vjps(cache, v), gl.Cell.path_vjps(cell, cache, v)
    assert list(fast_paths) == list(formed)
    for name, product in formed.items():
        assert_per_step(fast_paths[name], product, f"{choice} path {name}", group_dims=1)


@settings(max_examples=flow.examples(15))
@given(spec=flow.model_specs(), data=st.data())
def test_local_gradients_and_path_shares_equal_the_former_formulas(spec: flow.ModelSpec, data: st.DataObject) -> None:
    """gl.local_gradients against the one-hots through param_factors, entry by entry with NaN on padded steps, and
    the credit map's path shares (and Recurrence.path_vjps, padding path included) against the formed paths, for a
    drawn recurrence of a drawn model: the stack, one of its layers, or one direction of a bidirectional layer."""
    case = flow.build(spec)
    choice, _ = data.draw(st.sampled_from(flow.recurrences(case)), "recurrence")
    rec = case.trace.recurrence(**choice)
    local = gl.local_gradients(case.trace, **choice).norms
    expected = one_hot_local_norms(rec)
    assert list(local) == list(expected)
    for name, norms in expected.items():
        assert_entrywise(local[name], norms, f"{choice} local {name}")

    adjoints = _randn(*rec.input_index.shape, rec.cell.state_size, seed=spec.seed + 2)
    vjps, formed = rec.path_vjps(adjoints), formed_path_products(rec, adjoints)
    assert list(vjps) == list(formed)
    for name, product in formed.items():
        assert_per_step(vjps[name], product, f"{choice} path {name}", group_dims=1)
    shares, expected_shares = path_shares(rec, adjoints), formed_path_shares(rec, adjoints)
    assert list(shares) == list(expected_shares)
    for name, share in expected_shares.items():
        assert float((shares[name] - share).abs().max()) <= 4 * RTOL, f"{choice} share {name}"

    credit = gl.credit(case.trace, case.out_grads)
    for stream, _ in credit.streams:
        for name, share in formed_path_shares(stream, credit.adjoints[stream.name]).items():
            assert float((credit.path_shares[name] - share).abs().max()) <= 4 * RTOL, f"credit share {name}"


# ---------------------------------------------------------------------------------------------------------------
# Saturated gates, float32 range, and a cell with the protocol's defaults only.


SATURATED = [  # weights × 3 and gate biases pushed by ±40: slopes of e^{−40} ≈ 4e-18 and products of several
    *[
        flow.CellSpec("GRU", 4, reset=reset, update=update, seed=31, scale=3.0, z_offset=z, r_offset=-z)
        for reset in ("after", "before")
        for update in ("keep", "replace")
        for z in (40.0, -40.0)
    ],
    flow.CellSpec("LSTM", 4, seed=32, scale=3.0, z_offset=40.0),
    flow.CellSpec("LSTM", 4, projection=2, seed=33, scale=3.0, z_offset=-40.0),
]


@pytest.mark.parametrize("spec", SATURATED, ids=str)
def test_saturated_gates_keep_their_tiny_local_gradients(spec: flow.CellSpec) -> None:
    """Gates pinned at 0 or 1: each local gradient, however small, equals the one-hot oracle's to RTOL, for the
    saturated cell alone and at the bottom of a two-layer stack (where the feed from above reaches it)."""
    bottom = flow.build_cell(spec, I)
    top = gl.GRU.random(bottom.output_size, 3, dtype=F64, seed=34)
    x = _randn(5, 2, I, seed=35)
    for model in (gl.Model(bottom), gl.Model([bottom, top])):
        trace = model.trace(x, lengths=[5, 3])
        expected = one_hot_local_norms(trace.recurrence())
        assert min(float(n.nan_to_num(1.0).min()) for n in expected.values()) < 1e-12  # tiny gradients are drawn
        for name, norms in gl.local_gradients(trace).norms.items():
            assert_entrywise(norms, expected[name], name)


@pytest.mark.parametrize("update", ["keep", "replace"])
def test_float32_local_gradients_lose_nothing_to_squaring(update: str) -> None:
    """A float32 GRU whose update gate is pinned (slope ≈ 1e-26): δ_z² ≈ 1e-54 lies below float32's range, so the
    sums of squares are formed in float64; W_iz's local gradients equal those of the float64 trace to float32
    rounding."""
    cell = gl.GRU.random(I, 4, update=update, dtype=F64, seed=36)
    weights = dict(cell.weights) | {"b_iz": cell.weights["b_iz"] + (60.0 if update == "keep" else -60.0)}
    x = _randn(6, 2, I, seed=37)
    wide = gl.local_gradients(gl.Model(gl.GRU(weights, update=update)).trace(x)).norms["l0.W_iz"]
    narrow_cell = gl.GRU({k: w.float() for k, w in weights.items()}, update=update)
    narrow = gl.local_gradients(gl.Model(narrow_cell).trace(x.float())).norms["l0.W_iz"]
    assert narrow.dtype == torch.float32
    assert float(wide.max()) < 1e-20 and bool((wide > 0).all())
    assert_entrywise(narrow.double(), wide, "float32 W_iz", rtol=1e-4)


class DefaultsOnlyGRU(gl.GRU):
    """A GRU that keeps the Cell protocol's defaults for the sums over covectors, as a new cell would."""

    path_vjps = gl.Cell.path_vjps
    param_energies = gl.Cell.param_energies
    input_energies = gl.Cell.input_energies
    energies_need_rows = gl.Cell.energies_need_rows


def test_a_cell_with_the_protocol_defaults_only_gives_the_same_results() -> None:
    """Local gradients and path shares of a stack whose GRU layers use the protocol's defaults (one adjoint per
    covector, formed paths and feeds) equal those of the built-in GRU, padded."""
    first = scaled(gl.GRU.random(I, 4, reset="before", dtype=F64, seed=41), 2.0)
    middle = scaled(gl.LSTM.random(4, 3, dtype=F64, seed=42), 2.0)
    last = scaled(gl.GRU.random(3, 3, update="replace", dtype=F64, seed=43), 2.0)
    plain = [DefaultsOnlyGRU(dict(c.weights), reset=c.reset, update=c.update) for c in (first, last)]
    x, lengths = _randn(5, 3, I, seed=44), [5, 2, 4]
    built_in = gl.Model([first, middle, last]).trace(x, lengths=lengths)
    defaults = gl.Model([plain[0], middle, plain[1]]).trace(x, lengths=lengths)
    assert type(defaults.recurrence().cell.cells[0]).param_energies is gl.Cell.param_energies
    local, expected = gl.local_gradients(defaults).norms, gl.local_gradients(built_in).norms
    for name, norms in expected.items():
        assert_entrywise(local[name], norms, name)
    g = _randn(*built_in.output.shape, seed=45)
    shares, expected_shares = gl.credit(defaults, g).path_shares, gl.credit(built_in, g).path_shares
    for name, share in expected_shares.items():
        assert float((shares[name] - share).abs().max()) <= 4 * RTOL, name


@pytest.mark.parametrize("case", EXTRA_CASES, ids=str)
def test_results_do_not_depend_on_the_chunk_of_steps(case: CellCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks sized by Cell.covector_elements, and chunks of one step, give the same local gradients and path
    shares (padded, so a chunk may hold padded and valid steps)."""
    cell = case.build()
    trace = gl.Model(cell).trace(_randn(6, 3, I, seed=51), lengths=[6, 2, 5])
    g = _randn(*trace.output.shape, seed=52)
    local, shares = gl.local_gradients(trace).norms, gl.credit(trace, g).path_shares
    for module in (
        importlib.import_module("gatelens.analysis.local"),
        importlib.import_module("gatelens.analysis.credit"),
    ):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1)
    for name, norms in gl.local_gradients(trace).norms.items():
        assert torch.equal(norms.isnan(), local[name].isnan()) and torch.allclose(
            norms, local[name], rtol=RTOL, equal_nan=True
        ), name
    for name, share in gl.credit(trace, g).path_shares.items():
        assert torch.allclose(share, shares[name], rtol=RTOL, atol=RTOL), name
