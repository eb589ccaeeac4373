"""Forward products J·v and ∂s'/∂x·v, the Jacobian norm bounds, and Lyapunov exponents carried by them.

* ``state_jvp`` / ``input_jvp`` of every cell configuration (tests/cell_configs.py) against the formed Jacobians and
  against torch.func.jvp of the reference step, in float64, with extra leading dims and over (T, B) caches; the base
  class's generic defaults against the cells' own;
* ``Recurrence.state_jvp`` over padded, reversed and bidirectional traces (v itself on padded steps), and a hypothesis
  property over the model class of tests/test_flow_properties.py against its unrolled oracle;
* norm bounds: L ≤ ‖J‖_F ≤ U and U ≥ ‖∂s'/∂x‖_F for every cell, L = U = ‖J‖_F where the cell gives the norm itself;
* gl.lyapunov against the algorithm it replaced, which formed every J_i and multiplied J_i @ Q (written out here as
  the oracle), to 1e-10 in float64: every cell configuration, stacks, padding, warm-up, reverse directions,
  rank-deficient traces, and steps where the bounds cannot decide and J_i is formed.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import jvp

import gatelens as gl
from gatelens.cells import NormBounds
from tests.cell_configs import CELL_CASES, F64, CellCase, reference_step, relative_error, scaled
from tests.test_flow_properties import (
    LONG_MEMORY_BIDIRECTIONAL,
    LONG_MEMORY_STACK,
    ModelSpec,
    Unrolled,
    assert_close,
    build,
    chosen_recurrences,
    examples,
    model_specs,
)
from tests.test_local_lyapunov import _nonnegative_inputs, _relu_with_units_off

BATCH, I = 4, 3
TOL = 1e-10
ROUNDING = 1e-12  # relative: a bound computed from the cell's structure against the norm of the formed matrix

lyapunov_module = importlib.import_module("gatelens.analysis.lyapunov")


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _cache(cell: gl.Cell, lead: tuple[int, ...] = (BATCH,), seed: int = 0) -> tuple[Tensor, Tensor, Any]:
    """Inputs x (*lead, I), states s (*lead, S) and the cache of one step from them."""
    x, s = _randn(*lead, cell.input_size, seed=seed), 0.8 * _randn(*lead, cell.state_size, seed=seed + 1)
    return x, s, cell.step(x, s)[1]


def _matvec(matrix: Tensor, v: Tensor) -> Tensor:
    """matrix (..., R, C) times v (extra, ..., C), the extra leading dims of v broadcast: (extra, ..., R)."""
    return (matrix @ v.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(params=CELL_CASES, ids=str)
def case(request: pytest.FixtureRequest) -> CellCase:
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# Forward products of one step


def test_jvps_equal_the_formed_jacobians_with_extra_leading_dims(case: CellCase) -> None:
    """J·v and ∂s'/∂x·v for two extra leading dims of tangents, and over a (T, B) cache in one call."""
    cell = case.build()
    for lead in ((BATCH,), (3, BATCH)):
        _, _, cache = _cache(cell, lead)
        v = _randn(2, 3, *lead, cell.state_size, seed=5)
        u = _randn(2, 3, *lead, cell.input_size, seed=6)
        assert relative_error(cell.state_jvp(cache, v), _matvec(cell.jacobian(cache), v)) <= TOL
        assert relative_error(cell.input_jvp(cache, u), _matvec(cell.input_jacobian(cache), u)) <= TOL


def test_jvps_equal_torch_func_jvp_of_the_reference_step(case: CellCase) -> None:
    """The oracle: forward-mode autograd of tests/reference.py's step, per sequence, in s and in x."""
    cell = case.build()
    step = reference_step(cell)
    x, s, cache = _cache(cell)
    v, u = _randn(BATCH, cell.state_size, seed=7), _randn(BATCH, cell.input_size, seed=8)
    by_state = torch.stack([jvp(lambda h: step(cell.weights, x[b], h), (s[b],), (v[b],))[1] for b in range(BATCH)])
    by_input = torch.stack([jvp(lambda xx: step(cell.weights, xx, s[b]), (x[b],), (u[b],))[1] for b in range(BATCH)])
    assert relative_error(cell.state_jvp(cache, v), by_state) <= TOL
    assert relative_error(cell.input_jvp(cache, u), by_input) <= TOL


def test_the_generic_defaults_agree_with_every_cells_own(case: CellCase) -> None:
    """The base class forms J (so a new cell works at once); the cells' own forms never do."""
    cell = case.build()
    _, _, cache = _cache(cell, (2, BATCH), seed=3)
    v, u = _randn(5, 2, BATCH, cell.state_size, seed=9), _randn(5, 2, BATCH, cell.input_size, seed=10)
    assert relative_error(gl.Cell.state_jvp(cell, cache, v), cell.state_jvp(cache, v)) <= TOL
    assert relative_error(gl.Cell.input_jvp(cell, cache, u), cell.input_jvp(cache, u)) <= TOL
    formed = gl.Cell.jacobian_norm_bounds(cell, cache)
    assert torch.equal(formed.lower, formed.upper)
    assert torch.equal(formed.lower, torch.linalg.matrix_norm(cell.jacobian(cache)))
    input_norm = gl.Cell.input_jacobian_norm_bound(cell, cache)
    assert torch.equal(input_norm, torch.linalg.matrix_norm(cell.input_jacobian(cache)))


# ---------------------------------------------------------------------------------------------------------------
# Norm bounds


def _gives_the_norm(cell: gl.Cell) -> bool:
    """The cells whose docstrings claim ‖J‖_F itself: Elman, GRU with reset "after", LSTM without projection."""
    if isinstance(cell, gl.GRU):
        return cell.reset == "after"
    return isinstance(cell, gl.Elman) or (isinstance(cell, gl.LSTM) and "W_proj" not in cell.weights)


def _assert_bounds(bounds: NormBounds, norm: Tensor, exact: bool, what: object) -> None:
    assert bounds.lower.shape == bounds.upper.shape == norm.shape, what
    if exact:
        assert torch.equal(bounds.lower, bounds.upper), what
        assert relative_error(bounds.upper, norm) <= ROUNDING, what
    assert bool((bounds.lower <= norm * (1 + ROUNDING)).all()), (what, bounds.lower, norm)
    assert bool((bounds.upper >= norm * (1 - ROUNDING)).all()), (what, bounds.upper, norm)


@pytest.mark.parametrize("factor", [1.0, 3.0, 0.0])  # 3: saturated gates; 0: every weight zero
def test_norm_bounds_hold_and_are_the_norm_where_claimed(case: CellCase, factor: float) -> None:
    built = case.build()
    stacked = isinstance(built, gl.Stack)
    cells = tuple(scaled(layer, factor) for layer in (built.cells if stacked else (built,)))
    cell = gl.Stack(cells) if stacked else cells[0]
    _, _, cache = _cache(cell, (3, BATCH), seed=4)
    jacobian, input_jacobian = cell.jacobian(cache), cell.input_jacobian(cache)
    exact = not stacked and _gives_the_norm(cell)
    _assert_bounds(cell.jacobian_norm_bounds(cache), torch.linalg.matrix_norm(jacobian), exact, case)
    input_norm = torch.linalg.matrix_norm(input_jacobian)
    bound = cell.input_jacobian_norm_bound(cache)
    assert bool((bound >= input_norm * (1 - ROUNDING)).all()), (bound, input_norm)
    if exact:
        assert relative_error(bound, input_norm) <= ROUNDING


def test_a_stacks_bounds_are_its_layers_diagonal_blocks_and_the_product_bound() -> None:
    """L² = Σ_m ‖J^m‖_F² (the diagonal blocks) and U² = ‖J^0‖²(1 + ‖K^1‖²) + ‖J^1‖² for two exact layers."""
    layers = [scaled(gl.GRU.random(I, 4, dtype=F64, seed=1), 2.0), scaled(gl.LSTM.random(4, 3, dtype=F64, seed=2), 2.0)]
    stack = gl.Stack(layers)
    _, _, cache = _cache(stack, (2, BATCH), seed=5)
    own = [torch.linalg.matrix_norm(layer.jacobian(c)) for layer, c in zip(layers, cache)]
    feed = torch.linalg.matrix_norm(layers[1].input_jacobian(cache[1]))
    bounds = stack.jacobian_norm_bounds(cache)
    assert relative_error(bounds.lower, torch.hypot(*own)) <= ROUNDING
    assert relative_error(bounds.upper, (own[0].square() * (1 + feed.square()) + own[1].square()).sqrt()) <= ROUNDING


# ---------------------------------------------------------------------------------------------------------------
# Recurrence.state_jvp and the bounds over a trace


def _torch_module(kind: str, seed: int = 0, **options: object) -> nn.RNNBase:
    torch.manual_seed(seed)
    module = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind](I, 4, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)  # gates away from ½ so that every path carries weight
    return module


TRACED = [
    ("GRU", {"num_layers": 2}, {}),
    ("LSTM", {"num_layers": 2, "proj_size": 2}, {}),
    ("RNN", {"num_layers": 3}, {}),
    ("GRU", {"bidirectional": True, "num_layers": 2}, {"layer": 1, "direction": "reverse"}),
    ("LSTM", {"bidirectional": True}, {"layer": 0, "direction": "forward"}),
]


@pytest.mark.parametrize(("kind", "options", "choice"), TRACED, ids=lambda item: str(item))
def test_recurrence_state_jvp_and_bounds_over_a_padded_trace(kind: str, options: dict, choice: dict) -> None:
    """Every step at once and step by step: J_i v with J_i = I on padded steps; √S on padded steps for the bounds."""
    steps, lengths = 6, [6, 2, 4]
    trace = gl.load(_torch_module(kind, **options)).trace(_randn(steps, 3, I, seed=11), lengths=lengths)
    rec = trace.recurrence(**choice)
    size = rec.cell.state_size
    v = _randn(2, steps, 3, size, seed=12)
    jacobians = rec.jacobians()
    expected = _matvec(jacobians, v)
    assert relative_error(rec.state_jvp(v), expected) <= TOL
    assert relative_error(rec.state_jvp(v[:, 4], steps=4), expected[:, 4]) <= TOL
    assert torch.equal(rec.state_jvp(v)[:, 2:, 1], v[:, 2:, 1])  # sequence 1 ends after 2 steps
    bounds = rec.jacobian_norm_bounds()
    norms = torch.linalg.matrix_norm(jacobians)
    _assert_bounds(bounds, norms, exact=False, what=(kind, options))
    assert torch.equal(bounds.lower[2:, 1], torch.full((steps - 2,), size**0.5, dtype=F64))
    assert torch.equal(bounds.upper[2:, 1], bounds.lower[2:, 1])
    with pytest.raises(ValueError, match="v must have shape"):
        rec.state_jvp(v[..., :-1])


def test_state_jvp_of_a_model_read_backwards() -> None:
    """reverse=True: a stack read from each sequence's end; J_i in processing order."""
    model = gl.load(_torch_module("GRU", num_layers=2))
    backwards = gl.Model([cell for cell in model.cells().values()], reverse=True)
    rec = backwards.trace(_randn(5, 2, I, seed=13), lengths=[5, 3]).recurrence()
    assert rec.name == "stack" and rec.cell.names == ("l0_reverse", "l1_reverse")
    v = _randn(5, 2, rec.cell.state_size, seed=14)
    assert relative_error(rec.state_jvp(v), _matvec(rec.jacobians(), v)) <= TOL


@settings(max_examples=examples(5))
@given(spec=model_specs(), data=st.data())
@example(spec=LONG_MEMORY_STACK, data=None)
@example(spec=LONG_MEMORY_BIDIRECTIONAL, data=None)
def test_jvps_and_bounds_match_the_unrolled_oracle(spec: ModelSpec, data: st.DataObject | None) -> None:
    """For a drawn recurrence (a stack, a layer, a direction): state_jvp against ∂s_{i+1}/∂s_i · v and input_jvp
    against ∂s_{i+1}/∂u_{i+1} · u from jacrev of the unrolled oracle, and L ≤ ‖J_i‖_F ≤ U."""
    case = build(spec)
    oracle = Unrolled(case)
    steps, batch = spec.steps, oracle.batch
    for choice, recs in chosen_recurrences(case, data):
        rec = case.trace.recurrence(**choice)
        size = rec.cell.state_size
        v = _randn(2, steps, batch, size, seed=spec.seed)
        u = _randn(steps, batch, rec.cell.input_size, seed=spec.seed + 1)
        by_state, by_input = rec.state_jvp(v), rec.cell.input_jvp(rec.cache, u)
        bounds = rec.jacobian_norm_bounds()
        for b, length in enumerate(oracle.lengths):
            jacobians = oracle.state_jacobians(recs, b)  # [t, :, s, :] = ∂s_t/∂s_s
            input_jacobians = oracle.input_jacobians(recs, b)  # [t, :, s, :] = ∂s_{t+1}/∂u_{s+1}
            for i in range(steps):
                where = f"{choice} sequence {b} step {i}"
                jacobian = jacobians[i + 1, :, i, :]
                assert_close(by_state[:, i, b], v[:, i, b] @ jacobian.T, f"state_jvp {where}")
                norm = torch.linalg.matrix_norm(jacobian)
                assert bounds.lower[i, b] <= norm * (1 + ROUNDING), f"lower bound {where}"
                assert bounds.upper[i, b] >= norm * (1 - ROUNDING), f"upper bound {where}"
                if i < length:
                    expected = input_jacobians[i, :, i, :] @ u[i, b]
                    assert_close(by_input[i, b], expected, f"input_jvp {where}")


# ---------------------------------------------------------------------------------------------------------------
# Lyapunov exponents against the algorithm that formed every J_i


def _formed_qr_step(product: Tensor, tolerance: Tensor, order: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The previous algorithm's step, as it was: J Q = Q' R; −inf where |R_jj| ≤ tolerance (B, 1); dead columns moved
    behind the live ones and the QR redone."""
    q, r = torch.linalg.qr(product)
    diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
    dead = diagonal <= tolerance
    if product.shape[-1] > 1 and bool((dead[..., :-1] & ~dead[..., 1:]).any()):
        moved = torch.sort(dead.to(torch.int8), dim=-1, stable=True).indices
        order = moved if order is None else order.gather(-1, moved)
        q, r = torch.linalg.qr(product.gather(-1, moved[..., None, :].expand_as(product)))
        diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
        dead = dead.gather(-1, moved) | (diagonal <= tolerance)
    return q, order, torch.where(dead, -math.inf, diagonal.log())


def formed_lyapunov(trace: gl.Trace, k: int | None = None, warmup: int = 0, **choice: Any) -> dict[str, Tensor]:
    """The oracle: every J_i formed, Q_i R_i = J_i @ Q_{i−1}, and the rank test |R_jj| ≤ S · eps · ‖J_i‖_F with the
    norm of the formed J_i; exponents, running estimates and rank as gl.lyapunov defines them."""
    rec = trace.recurrence(**choice)
    jacobians = rec.jacobians()  # (T, B, S, S)
    steps, batch, size, _ = jacobians.shape
    k = size if k is None else k
    directions = torch.eye(size, k, dtype=jacobians.dtype).expand(batch, size, k)
    order, rows = None, []
    for jacobian in jacobians:
        tolerance = size * torch.finfo(jacobian.dtype).eps * torch.linalg.matrix_norm(jacobian)[:, None]
        directions, order, growth = _formed_qr_step(jacobian @ directions, tolerance, order)
        rows.append(growth if order is None else growth.scatter(-1, order, growth))
    counted = (torch.arange(steps)[:, None] >= warmup).expand(steps, batch)
    if rec.mask is not None:
        counted = counted & rec.mask
    log_growth = torch.where(counted[..., None], torch.stack(rows), 0.0)[warmup:]
    counted = counted[warmup:]
    return {
        "exponents": log_growth.sum(0) / counted.sum(0)[..., None],
        "running": log_growth.cumsum(0) / counted.cumsum(0)[..., None],
        "rank": k - log_growth.isneginf().any(0).sum(-1),
    }


def _assert_as_formed(result: gl.Lyapunov, expected: dict[str, Tensor], what: object = "") -> None:
    """The same −inf and NaN entries, the finite ones within TOL of the largest, and the same rank."""
    assert result.rank.tolist() == expected["rank"].tolist(), (what, result.rank, expected["rank"])
    for name in ("exponents", "running"):
        got, wanted = getattr(result, name), expected[name]
        assert got.shape == wanted.shape, (what, name)
        assert torch.equal(got.isneginf(), wanted.isneginf()), (what, name, got, wanted)
        assert torch.equal(got.isnan(), wanted.isnan()), (what, name)
        finite = wanted.isfinite()
        if finite.any():
            scale = max(1.0, float(wanted[finite].abs().max()))
            assert float((got[finite] - wanted[finite]).abs().max()) <= TOL * scale, (what, name, got, wanted)


@pytest.fixture
def formations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every step at which gl.lyapunov forms a Jacobian (the bounds could not decide a column)."""
    steps: list[int] = []
    formed = lyapunov_module._formed_tolerance

    def counting(rec: gl.Recurrence, step: int, scale: float) -> Tensor:
        steps.append(step)
        return formed(rec, step, scale)

    monkeypatch.setattr(lyapunov_module, "_formed_tolerance", counting)
    return steps


def test_every_cell_configuration_gives_the_exponents_of_the_formed_jacobians(case: CellCase) -> None:
    cell = case.build()
    model = gl.Model(cell)
    trace = model.trace(_randn(40, 3, cell.input_size, seed=15))
    for k in (None, 2):
        _assert_as_formed(gl.lyapunov(trace, k=k, windows=4), formed_lyapunov(trace, k=k), (case, k))
    default = gl.lyapunov(trace)
    assert default.exponents.shape == (3, min(8, cell.state_size))
    _assert_as_formed(default, formed_lyapunov(trace, k=min(8, cell.state_size)), case)


@pytest.mark.parametrize(("kind", "options", "choice"), TRACED, ids=lambda item: str(item))
def test_stacks_padding_warmup_and_directions_give_the_exponents_of_the_formed_jacobians(
    kind: str, options: dict, choice: dict, formations: list[int]
) -> None:
    """Padded sequences, warm-up, stacks with projections, bidirectional layers; no Jacobian is formed."""
    trace = gl.load(_torch_module(kind, **options)).trace(_randn(60, 3, I, seed=16), lengths=[60, 17, 41])
    for k, warmup in ((None, 0), (3, 5)):
        result = gl.lyapunov(trace, k=k, warmup=warmup, **choice)
        _assert_as_formed(result, formed_lyapunov(trace, k=k, warmup=warmup, **choice), (kind, options, k))
    assert formations == []


def test_a_model_read_backwards_gives_the_exponents_of_the_formed_jacobians() -> None:
    model = gl.load(_torch_module("LSTM", num_layers=2))
    backwards = gl.Model([cell for cell in model.cells().values()], reverse=True)
    trace = backwards.trace(_randn(30, 2, I, seed=17), lengths=[30, 22])
    _assert_as_formed(gl.lyapunov(trace, k=None, warmup=2), formed_lyapunov(trace, warmup=2))


RANK_DEFICIENT = {
    # two ReLU units always off: two exponents −inf at every step
    "relu-units-off": lambda: gl.Model(_relu_with_units_off()),
    # a column of J_1 parallel to another: a roundoff R_jj in the middle of the frame at the first step
    "relu-parallel": lambda: gl.Model(_relu_with_units_off(parallel=True)),
    # below a GRU, the same ReLU layer: the stack's J is rank-deficient in its first block
    "stack-relu-gru": lambda: gl.Model([_relu_with_units_off(), gl.GRU.random(5, 3, dtype=F64, seed=2)]),
    # a layer whose weights are all zero: J^1 = 0 (tanh Elman) and K^1 = 0
    "stack-zero-layer": lambda: gl.Model(
        [scaled(gl.GRU.random(I, 3, dtype=F64, seed=3), 2.0), scaled(gl.Elman.random(3, 2, dtype=F64), 0.0)]
    ),
    # an LSTM with all weights zero above a GRU: its h-columns are zero (f = ½ carries c alone)
    "stack-zero-lstm": lambda: gl.Model(
        [scaled(gl.GRU.random(I, 3, dtype=F64, seed=4), 2.0), scaled(gl.LSTM.random(3, 2, dtype=F64), 0.0)]
    ),
}


@pytest.mark.parametrize("name", RANK_DEFICIENT)
def test_rank_deficient_traces_give_the_exponents_of_the_formed_jacobians(name: str) -> None:
    model = RANK_DEFICIENT[name]()
    trace = model.trace(_nonnegative_inputs(16, batch=2))
    # no column dies inside a warm-up here: a column dead at an uncounted step takes an arbitrary (roundoff)
    # direction, and its later, finite exponent over a short trace depends on that direction in either algorithm
    for k, warmup in ((None, 0), (2, 0), (2, 1)):
        result = gl.lyapunov(trace, k=k, warmup=warmup)
        _assert_as_formed(result, formed_lyapunov(trace, k=k, warmup=warmup), (name, k, warmup))
    assert int(gl.lyapunov(trace, k=None).rank.max()) < trace.recurrence().cell.state_size  # the premise


def test_an_exactly_singular_step_gives_the_exponents_of_the_formed_jacobians() -> None:
    """z = r = 0 clamped at one step of a padded batch: J = 0 there, every exponent −inf where it is counted."""
    model = gl.load(_torch_module("GRU", num_layers=2))
    trace = gl.what_if(model.trace(_randn(10, 3, I, seed=18), lengths=[10, 3, 7]), {"z": 0.0, "r": 0.0}, steps=[4])
    result = gl.lyapunov(trace, k=None)
    _assert_as_formed(result, formed_lyapunov(trace))
    assert result.rank.tolist()[1] == 8 and result.rank.tolist()[0] < 8


def _looser_stack(delta: float, mu: float = 10.0, kappa: float = 10.0, a: float = 0.5) -> gl.Model:
    """Two always-on ReLU Elman layers of two units whose stack Jacobian is constant and whose last column is
    isolated, with R_33 = δ at every step:

        J^0 = diag(1, μ),  K^1 = [[κ, 0], [0, 0]],  J^1 = diag(a, δ):
        ‖J‖_F² = 1 + μ² + κ² + a² + δ²,  L² = 1 + μ² + a² + δ²,  U² = (1 + μ²)(1 + κ²) + a² + δ²

    so the bounds are loose on both sides (L ≈ 10.0, ‖J‖_F ≈ 14.2, U ≈ 101 for μ = κ = 10), and a δ between
    S · eps · L and S · eps · U can only be decided by forming J."""
    zeros, ones = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    below = gl.Elman(
        {"W_ih": torch.zeros(2, I, dtype=F64), "W_hh": torch.diag(torch.tensor([1.0, mu], dtype=F64)),
         "b_ih": ones, "b_hh": zeros},
        nonlinearity="relu",
    )  # fmt: skip
    above = gl.Elman(
        {"W_ih": torch.tensor([[kappa, 0.0], [0.0, 0.0]], dtype=F64),
         "W_hh": torch.diag(torch.tensor([a, delta], dtype=F64)), "b_ih": ones, "b_hh": zeros},
        nonlinearity="relu",
    )  # fmt: skip
    return gl.Model([below, above])


@pytest.mark.parametrize(
    ("delta", "alive", "formed"),
    [
        (3e-14, True, True),  # S·eps·‖J‖_F = 1.26e-14 < δ ≤ S·eps·U = 8.97e-14: alive, only the formed J can tell
        (1.1e-14, False, True),  # S·eps·L = 8.94e-15 < δ ≤ S·eps·‖J‖_F: dead, only the formed J can tell
        (1e-16, False, False),  # below S·eps·L: dead by the bounds alone
        (0.5, True, False),  # far above S·eps·U: alive by the bounds alone
    ],
)
def test_columns_the_bounds_cannot_decide_are_decided_by_the_formed_jacobian(
    delta: float, alive: bool, formed: bool, formations: list[int]
) -> None:
    steps = 12
    trace = _looser_stack(delta).trace(torch.zeros(steps, 2, I, dtype=F64))
    jacobians = trace.jacobians()
    assert torch.all(jacobians == jacobians[0, 0])  # the premise: one constant J
    size, eps = 4, torch.finfo(F64).eps
    bounds = trace.recurrence().jacobian_norm_bounds()
    norm = float(torch.linalg.matrix_norm(jacobians[0, 0]))
    assert float(bounds.lower[0, 0]) * 1.3 < norm and norm * 7 < float(bounds.upper[0, 0])  # loose on both sides
    assert (delta > size * eps * norm) == alive
    result = gl.lyapunov(trace, k=None, windows=3)
    _assert_as_formed(result, formed_lyapunov(trace), delta)
    assert bool(result.exponents[:, 3].isfinite().all()) == alive
    if alive:
        assert torch.allclose(result.exponents[:, 3], torch.tensor(math.log(delta), dtype=F64), rtol=1e-12, atol=0)
    assert (len(formations) > 0) == formed
    if formed:  # every step has the same undecided column, and each is formed once
        assert formations == list(range(steps))
