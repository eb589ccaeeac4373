"""Local gradients and Lyapunov exponents against independent oracles.

Local gradients ‖∂⁺h_{i+1}/∂θ‖_F:
* autograd (torch.func.jacrev) of the plain reference step of every cell configuration, with the state held fixed
  and the states themselves replayed through the reference step;
* the parameter VJP of the recurrence with one-hot adjoints, one sequence and one step at a time;
* central finite differences of one cell step;
* padding, reverse directions, statistics and serialisation.

Lyapunov exponents (QR method):
* closed forms: an Elman cell whose Jacobian is exactly a·Q (Q orthogonal), and a GRU whose update gate is pinned
  so that J ≈ I, in both update conventions;
* explicit products of the Jacobians: Σ_{j≤m} λ_j · n = log vol_m(J_n ⋯ J_1 E_m) for every m (so Σ_j λ_j · n =
  log|det J_n ⋯ J_1|), and the largest exponent against the growth rate of propagation's spectral norm;
* warm-up, windows, running estimates and padding against each other and against single-sequence traces;
* bad input.
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

import gatelens as gl
from gatelens.analysis import local_gradients, lyapunov
from tests.cell_configs import CELL_CASES, F64, CellCase, reference_step, relative_error, scaled

T, B, I = 4, 2, 3
TOL = 1e-10

# the modules themselves (gatelens.analysis.lyapunov is also the name of the function the package exports)
local_module = importlib.import_module("gatelens.analysis.local")
lyapunov_module = importlib.import_module("gatelens.analysis.lyapunov")


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _initial_states(model: gl.Model, batch: int, seed: int) -> dict[str, Tensor]:
    """A random full state (B, S) for every recurrence of the model."""
    return {
        name: 0.8 * _randn(batch, cell.state_size, seed=seed + index)
        for index, (name, cell) in enumerate(model.cells().items())
    }


def _assert_close(got: Tensor, expected: Tensor, rtol: float = TOL, what: object = "") -> None:
    """Entrywise |got − expected| ≤ rtol·|expected|, with a floor of 1e-3·rtol times the largest |expected|."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    floor = 1e-3 * rtol * float(expected.abs().max())
    bad = (got - expected).abs() > rtol * expected.abs() + floor
    assert not bool(bad.any()), (what, got[bad], expected[bad])


def _torch_module(kind: str, seed: int = 0, **options: object) -> nn.RNNBase:
    torch.manual_seed(seed)
    module = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind](I, 4, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)  # gates away from ½ so that every path carries weight
    return module


def test_analyses_are_exported_at_the_top_level() -> None:
    """The issue's API is gl.local_gradients(...) and gl.lyapunov(...)."""
    assert gl.local_gradients is local_gradients
    assert gl.lyapunov is lyapunov
    assert gl.LocalGradients is local_module.LocalGradients
    assert gl.Lyapunov is lyapunov_module.Lyapunov


# ---------------------------------------------------------------------------------------------------------------
# Local gradients


@pytest.mark.parametrize("case", CELL_CASES, ids=str)
def test_local_gradients_equal_autograd_of_the_reference_step(case: CellCase) -> None:
    """norms[θ][i, b] = ‖∂ step(θ, x_{i+1}, h_i)/∂θ‖_F by jacrev of the reference step, h_i held fixed.

    For a stack (layer=None on a multi-layer unidirectional model) h_i is the whole stack's state and the oracle
    is the reference stack step, so layer 0's blocks also reach layer 1 within the step.
    """
    cell = case.build()
    model = gl.Model(cell)
    x = _randn(T, B, cell.input_size, seed=1)
    h0 = _initial_states(model, B, seed=2)
    trace = model.trace(x, h0)
    result = local_gradients(trace)

    stacked = isinstance(cell, gl.Stack)
    assert result.recurrence == ("stack" if stacked else "l0")
    qualify = (lambda name: name) if stacked else (lambda name: f"l0.{name}")
    assert set(result.norms) == set(model.weights) == {qualify(name) for name in cell.weights}

    step = reference_step(cell)
    weights = dict(cell.weights)
    state = torch.cat(list(h0.values()), dim=-1)  # (B, S): the layers' states in order
    per_step = vmap(jacrev(step), in_dims=(None, 0, 0))
    expected: dict[str, list[Tensor]] = {name: [] for name in weights}
    everything = []
    for i in range(T):
        # the oracle replays the states itself; they must agree with the trace's
        assert relative_error(trace.recurrence().states[i], state) <= 1e-12
        jacobians = per_step(weights, x[i], state)  # block ↦ (B, S, *shape)
        squares = {name: j.flatten(1).square().sum(1) for name, j in jacobians.items()}
        for name in weights:
            expected[name].append(squares[name].sqrt())
        everything.append(torch.cat([j.flatten(1) for j in jacobians.values()], dim=1).norm(dim=1))
        state = torch.stack([step(weights, x[i, b], state[b]) for b in range(B)])

    for name in weights:
        got = result.norms[qualify(name)]
        assert got.shape == (T, B) and got.dtype == F64
        _assert_close(got, torch.stack(expected[name]), what=name)
    _assert_close(result.total, torch.stack(everything), what="total")
    assert not bool(result.total.isnan().any())
    # a block that the step reads is never identically zero here (h0, x and the weights are all random)
    assert all(bool((torch.stack(expected[name]) > 0).any()) for name in weights)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("which", ["gru-before-replace", "lstm-proj-2layer-stack"])
def test_local_gradients_equal_parameter_vjps_with_one_hot_adjoints(which: str, padded: bool) -> None:
    """norms[θ][i, b]² = Σ_j ‖param_vjp(e_j on sequence b, steps=i)[θ]‖², one covector at a time."""
    if which == "gru-before-replace":
        model = gl.Model(scaled(gl.GRU.random(I, 4, reset="before", update="replace", dtype=F64, seed=11), 2.0))
    else:
        model = gl.load(_torch_module("LSTM", num_layers=2, proj_size=2))
    steps, batch, lengths = 5, 3, [5, 2, 4]
    trace = model.trace(_randn(steps, batch, I, seed=3), lengths=lengths if padded else None)
    rec = trace.recurrence()
    result = local_gradients(trace)
    size = rec.cell.state_size
    assert set(result.norms) == set(model.weights)
    for i in range(steps):
        for b in range(batch):
            squares = dict.fromkeys(result.norms, 0.0)
            for j in range(size):
                v = torch.zeros(batch, size, dtype=F64)
                v[b, j] = 1.0
                for name, grad in rec.param_vjp(v, steps=i).items():
                    squares[name] += float(grad.square().sum())
            for name, norms in result.norms.items():
                if padded and i >= lengths[b]:
                    assert squares[name] == 0.0
                    assert math.isnan(float(norms[i, b]))
                else:
                    expected = math.sqrt(squares[name])
                    assert abs(float(norms[i, b]) - expected) <= TOL * expected + 1e-300, (name, i, b)
            if not (padded and i >= lengths[b]):
                total = math.sqrt(sum(squares.values()))
                assert abs(float(result.total[i, b]) - total) <= TOL * total, (i, b)


@pytest.mark.parametrize("block", ["W_hn", "W_iz", "b_hr"])
def test_local_gradient_against_central_finite_differences(block: str) -> None:
    """The whole (H × |θ|) matrix ∂⁺h_k/∂θ by central differences of one cell step with h_{k−1} fixed."""
    cell = scaled(gl.GRU.random(I, 4, reset="after", update="keep", dtype=F64, seed=12), 2.0)
    x = _randn(T, B, I, seed=4)
    trace = gl.Model(cell).trace(x, 0.5 * _randn(1, B, 4, seed=5))
    norms = local_gradients(trace).norms[f"l0.{block}"]
    states = trace.states["l0"]
    eps = 1e-6
    for i, b in [(2, 1), (0, 0)]:
        columns = []
        for index in range(cell.weights[block].numel()):
            outputs = []
            for sign in (1.0, -1.0):
                weights = {name: w.clone() for name, w in cell.weights.items()}
                weights[block].view(-1)[index] += sign * eps
                moved = gl.GRU(weights, reset=cell.reset, update=cell.update)
                outputs.append(moved.step(x[i, b], states[i, b])[0])
            columns.append((outputs[0] - outputs[1]) / (2 * eps))
        expected = torch.stack(columns, dim=1).norm()
        assert expected > 1e-3
        assert abs(float(norms[i, b]) - float(expected)) <= 1e-7 * float(expected), (i, b)


def test_padding_gives_nan_exactly_on_padded_steps_and_matches_each_sequence_alone() -> None:
    module = _torch_module("LSTM", num_layers=2)
    model = gl.load(module)
    steps, lengths = 6, [6, 2, 4]
    x = _randn(steps, 3, I, seed=6)
    result = local_gradients(model.trace(x, lengths=lengths))
    valid = torch.arange(steps)[:, None] < torch.tensor(lengths)[None, :]
    for name, norms in {**result.norms, "total": result.total}.items():
        assert torch.equal(norms.isnan(), ~valid), name
    for b, length in enumerate(lengths):
        alone = local_gradients(model.trace(x[:length, b : b + 1]))
        for name, norms in result.norms.items():
            _assert_close(norms[:length, b], alone.norms[name][:, 0], rtol=1e-12, what=(name, b))
    summary = result.summary()
    for name, norms in {**result.norms, "all": result.total}.items():
        values = norms[valid].numpy()
        assert summary[name]["mean"] == pytest.approx(values.mean(), rel=1e-13)
        assert summary[name]["max"] == values.max()
        assert all(math.isfinite(v) for v in summary[name].values())
    document = result.to_dict()
    json.dumps(document, allow_nan=False)
    for name in result.norms:
        assert document["norms"][name][5][1] is None  # step 6 of a sequence of length 2
        assert document["norms"][name][1][1] is not None


def _flipped(x: Tensor, lengths: list[int]) -> Tensor:
    """Each sequence's first L_b steps reversed in time (padding left where it is)."""
    out = x.clone()
    for b, length in enumerate(lengths):
        out[:length, b] = x[:length, b].flip(0)
    return out


@pytest.mark.parametrize("lengths", [None, [5, 2, 4]])
def test_reverse_direction_equals_a_forward_model_on_flipped_input(lengths: list[int] | None) -> None:
    """The reverse direction of a bidirectional layer (and a reverse=True model), in its own processing order, is
    the forward recurrence of the same cell run on each sequence reversed."""
    steps = 5
    x = _randn(steps, 3, I, seed=7)
    full = lengths or [steps] * 3
    bidirectional = gl.load(_torch_module("GRU", bidirectional=True))
    reverse_cell = bidirectional.cells()["l0_reverse"]
    result = local_gradients(bidirectional.trace(x, lengths=lengths), layer=0, direction="reverse")
    assert result.recurrence == "l0_reverse"
    assert set(result.norms) == {f"l0_reverse.{name}" for name in reverse_cell.weights}
    oracle = local_gradients(gl.Model(reverse_cell).trace(_flipped(x, full), lengths=lengths))
    backwards = local_gradients(gl.Model(reverse_cell, reverse=True).trace(x, lengths=lengths))
    assert backwards.recurrence == "l0_reverse"
    valid = torch.arange(steps)[:, None] < torch.tensor(full)[None, :]
    for name in reverse_cell.weights:
        got = result.norms[f"l0_reverse.{name}"]
        assert torch.equal(got.isnan(), ~valid)
        _assert_close(got[valid], oracle.norms[f"l0.{name}"][valid], rtol=1e-12, what=name)
        _assert_close(backwards.norms[f"l0_reverse.{name}"][valid], got[valid], rtol=1e-12, what=name)
    # the forward direction is a different recurrence with its own weights
    forward = local_gradients(bidirectional.trace(x, lengths=lengths), layer=0, direction="forward")
    assert set(forward.norms) == {f"l0.{name}" for name in reverse_cell.weights}
    assert not torch.allclose(forward.norms["l0.W_hn"][valid], result.norms["l0_reverse.W_hn"][valid])


def test_summary_largest_and_to_dict() -> None:
    model = gl.Model(scaled(gl.GRU.random(I, 5, dtype=F64, seed=13), 2.0))
    steps, lengths = 8, [8, 3, 6, 1]
    result = local_gradients(model.trace(_randn(steps, 4, I, seed=8), lengths=lengths))
    summary = result.summary()
    assert set(summary) == {*result.norms, "all"}
    for name, norms in {**result.norms, "all": result.total}.items():
        values = norms.numpy()
        values = values[~np.isnan(values)]
        assert values.size == sum(lengths)
        expected = {
            "mean": values.mean(),
            "median": np.median(values),
            "p95": np.percentile(values, 95),
            "max": values.max(),
        }
        assert set(summary[name]) == set(expected)
        for statistic, value in expected.items():
            assert summary[name][statistic] == pytest.approx(value, rel=1e-13, abs=0), (name, statistic)
    stacked = np.stack([norms.numpy() for norms in result.norms.values()])
    block, step, sequence = np.unravel_index(np.nanargmax(stacked), stacked.shape)
    largest = result.largest
    assert largest == {
        "block": list(result.norms)[block],
        "step": int(step),
        "sequence": int(sequence),
        "value": float(np.nanmax(stacked)),
    }
    assert step < lengths[sequence]
    assert largest["value"] == pytest.approx(summary[largest["block"]]["max"], rel=0, abs=0)
    assert max(s["max"] for name, s in summary.items() if name != "all") == largest["value"]

    document = result.to_dict()
    round_trip = json.loads(json.dumps(document, allow_nan=False))
    assert round_trip["recurrence"] == "l0"
    assert round_trip["largest"] == largest
    assert round_trip["summary"] == summary
    for name, norms in result.norms.items():
        rows = round_trip["norms"][name]
        assert len(rows) == steps and all(len(row) == 4 for row in rows)
        for i in range(steps):
            for b in range(4):
                if i < lengths[b]:
                    assert rows[i][b] == float(norms[i, b])
                else:
                    assert rows[i][b] is None


def test_local_gradients_do_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    model = gl.load(_torch_module("GRU", num_layers=2))
    trace = model.trace(_randn(7, 3, I, seed=9), lengths=[7, 3, 5])
    whole = local_gradients(trace)
    monkeypatch.setattr(local_module, "CHUNK_ELEMENTS", 1)  # one step per chunk
    chunked = local_gradients(trace)
    assert list(chunked.norms) == list(whole.norms)
    for name in whole.norms:
        assert torch.allclose(chunked.norms[name], whole.norms[name], rtol=1e-14, atol=0, equal_nan=True)


def test_local_gradients_bad_input() -> None:
    model = gl.load(_torch_module("GRU", bidirectional=True))
    trace = model.trace(_randn(T, B, I))
    with pytest.raises(TypeError, match="needs a Trace"):
        local_gradients(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bidirectional"):
        local_gradients(trace)
    with pytest.raises(ValueError, match="unknown direction"):
        local_gradients(trace, layer=0, direction="sideways")
    with pytest.raises((ValueError, IndexError, TypeError), match="layer"):
        local_gradients(trace, layer=3, direction="forward")


# ---------------------------------------------------------------------------------------------------------------
# Lyapunov exponents: closed forms


def _orthogonal(size: int, seed: int) -> Tensor:
    q, r = torch.linalg.qr(_randn(size, size, seed=seed))
    return q * r.diagonal().sign()


def _linear_elman(scale: float, size: int = 4, seed: int = 0) -> gl.Elman:
    """tanh(0·x + a·Q h + 0): at h = 0 the Jacobian is exactly a·Q."""
    zeros = torch.zeros(size, dtype=F64)
    weights = {
        "W_ih": torch.zeros(size, I, dtype=F64),
        "W_hh": scale * _orthogonal(size, seed),
        "b_ih": zeros,
        "b_hh": zeros.clone(),
    }
    return gl.Elman(weights)


@pytest.mark.parametrize("scale", [0.5, 0.9, 1.1])
def test_elman_with_scaled_orthogonal_recurrence_has_every_exponent_log_a(scale: float) -> None:
    model = gl.Model(_linear_elman(scale))
    steps = 20
    x = torch.zeros(steps, B, I, dtype=F64)
    result = lyapunov(model, x)
    assert result.exponents.shape == (B, 4)
    assert torch.all((result.exponents - math.log(scale)).abs() <= 1e-10), result.exponents
    assert torch.all((result.largest - math.log(scale)).abs() <= 1e-10)
    assert torch.all((result.finite_time - math.log(scale)).abs() <= 1e-10)
    assert torch.all((result.running - math.log(scale)).abs() <= 1e-10)
    assert result.recurrence == "l0"
    # the first k exponents alone
    first_two = lyapunov(model, x, k=2)
    assert first_two.exponents.shape == (B, 2)
    assert torch.all((first_two.exponents - math.log(scale)).abs() <= 1e-10)
    # a tiny initial state: tanh'(a) = 1 − O(a²), so the exponents move by far less than 1e-6
    h0 = 1e-6 * _randn(1, B, 4, seed=1)
    nudged = lyapunov(model, x, h0=h0)
    assert torch.all((nudged.exponents - math.log(scale)).abs() <= 1e-6)
    assert not torch.equal(model.trace(x, h0).states["l0"][-1], torch.zeros(B, 4, dtype=F64))


@pytest.mark.parametrize(("update", "bias"), [("keep", 30.0), ("replace", -30.0)])
def test_gru_with_a_pinned_update_gate_carries_its_state(update: str, bias: float) -> None:
    """z ≈ 1 ("keep") or z ≈ 0 ("replace") to within e^{−30}: h' ≈ h, J ≈ I, every exponent ≈ 0; the opposite
    bias overwrites the state with the candidate instead, and the exponents are clearly negative."""
    cell = gl.GRU.random(I, 4, update=update, dtype=F64, seed=14)
    x = _randn(40, B, I, seed=10)

    def pinned(value: float) -> gl.Model:
        weights = dict(cell.weights)
        weights["b_iz"] = torch.full((4,), value, dtype=F64)
        return gl.Model(gl.GRU(weights, update=update))

    result = lyapunov(pinned(bias), x)
    assert torch.all(result.exponents.abs() <= 1e-9), result.exponents
    assert torch.all(result.stderr.abs() <= 1e-9)
    overwritten = lyapunov(pinned(-bias), x)
    assert torch.all(overwritten.largest < -0.1), overwritten.exponents


# ---------------------------------------------------------------------------------------------------------------
# Lyapunov exponents against explicit products of the Jacobians


def _exact_log_volumes(jacobians: Tensor) -> list[float]:
    """log vol_m(P e_1, …, P e_m) for m = 1..S, P = J_n ⋯ J_1 (jacobians (n, S, S) of one sequence), in 120-digit
    arithmetic: float64 cannot hold P's small singular values next to its large ones (cond(P) ~ e^{n(λ_1 − λ_S)}),
    but the float64 Jacobians are exact mpmath numbers and their product and its QR are exact to 120 digits."""
    mpmath = pytest.importorskip("mpmath")  # a dependency of torch (through sympy)
    with mpmath.workdps(120):
        product = mpmath.eye(jacobians.shape[-1])
        for jacobian in jacobians.tolist():
            product = mpmath.matrix(jacobian) * product
        _, r = mpmath.qr(product)
        logs = [mpmath.log(abs(r[j, j])) for j in range(r.rows)]
        return [float(sum(logs[: m + 1])) for m in range(len(logs))]


PRODUCT_CASES = {
    "gru": lambda: gl.Model(scaled(gl.GRU.random(I, 3, dtype=F64, seed=15), 2.0)),
    "lstm": lambda: gl.load(_torch_module("LSTM")),
    "rnn-2layer-stack": lambda: gl.load(_torch_module("RNN", num_layers=2)),
}


@pytest.mark.parametrize("case", list(PRODUCT_CASES))
def test_exponents_against_the_explicit_product_of_jacobians(case: str) -> None:
    """With P = J_n ⋯ J_1 formed explicitly: n·Σ_{j≤m} λ_j = log vol_m(P e_1, …, P e_m) for every m (exact), so
    n·Σ_j λ_j = log|det P| and n·λ_1 = log‖P e_1‖ ≤ log σ_1(P)."""
    steps = 30
    trace = PRODUCT_CASES[case]().trace(_randn(steps, B, I, seed=11))
    result = lyapunov(trace)
    jacobians = trace.jacobians()
    size = jacobians.shape[-1]
    assert result.exponents.shape == (B, size)
    volumes = result.exponents.cumsum(-1) * steps
    for b in range(B):
        exact = torch.tensor(_exact_log_volumes(jacobians[:, b]), dtype=F64)
        assert torch.all((volumes[b] - exact).abs() <= 1e-9 * exact.abs().clamp_min(1)), (b, volumes[b], exact)
    # log|det P| = Σ_i log|det J_i|, each factor well conditioned
    log_det = torch.linalg.slogdet(jacobians).logabsdet.sum(0)
    assert torch.all((volumes[:, -1] - log_det).abs() <= 1e-9 * log_det.abs().clamp_min(1))
    # the top of P is resolved in float64
    product = torch.eye(size, dtype=F64).expand(B, size, size)
    for i in range(steps):
        product = jacobians[i] @ product
    first = product[..., 0].norm(dim=-1).log()
    assert torch.all((result.exponents[:, 0] * steps - first).abs() <= 1e-9 * first.abs().clamp_min(1))
    top = torch.linalg.svdvals(product)[:, 0].log()
    assert torch.all(result.largest * steps <= top + 1e-9)
    assert torch.all(result.largest * steps >= top - math.log(10 * size))  # e_1 is not special
    assert torch.all(result.exponents[:, :-1] >= result.exponents[:, 1:] - 0.5)  # roughly ordered already
    # the leading k exponents do not depend on k
    for k in (1, 2):
        assert torch.allclose(lyapunov(trace, k=k).exponents, result.exponents[:, :k], rtol=1e-13, atol=1e-15)
    # full rank: every exponent is finite, and rank says so
    assert result.rank.tolist() == [size] * B
    assert torch.all(result.exponents.isfinite())


def test_largest_exponent_is_the_growth_rate_of_propagations_spectral_norm() -> None:
    steps = 400
    model = gl.Model(scaled(gl.GRU.random(I, 4, dtype=F64, seed=1), 3.0))
    trace = model.trace(_randn(steps, B, I, seed=1))
    largest = lyapunov(trace, k=1).largest
    assert largest.shape == (B,)
    assert torch.all(largest < -0.05)  # not trivially zero: gradients vanish at a definite rate
    log_norm = gl.propagation(trace).log_norm[0]  # anchor T − 1: log‖J_T ⋯ J_{T−ℓ+1}‖ by lag ℓ
    for lag in (steps, steps - 50):
        rate = log_norm[lag] / lag
        assert torch.all((largest - rate).abs() <= 0.05), (largest, rate)
    # the full spectrum agrees, and its other exponents lie below the largest
    spectrum = lyapunov(trace)
    assert torch.allclose(spectrum.largest, largest, rtol=1e-12, atol=0)
    assert torch.all(spectrum.exponents[:, 1:] < largest[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Numerical rank: directions that J_i Q_{i−1} maps to zero within roundoff have λ = −inf


OFF = (1, 3)  # units of _relu_with_units_off that are always off
SLOPE = 0.7  # the active units' recurrence is SLOPE times a permutation: every finite exponent is log SLOPE


def _relu_with_units_off(size: int = 5, parallel: bool = False, seed: int = 0) -> gl.Elman:
    """A ReLU Elman RNN whose units OFF are always off and whose other units are always on (for inputs x ≥ 0):

    active rows: W_hh[A, A] = SLOPE·Π (a permutation), W_ih[A] ≥ 0, bias +1, so the pre-activation is ≥ 1;
    off rows: W_hh[off, A] ≤ 0, W_ih[off] = 0, bias −1, so the pre-activation is ≤ −1 and relu' = 0.

    J_i = diag(relu') W_hh has zero rows at OFF, so rank J_i = 3 and the product P = J_n ⋯ J_1 has rank 3: exactly
    two exponents are −inf, and on the active subspace J acts as SLOPE·Π, so the three others are log SLOPE. With
    ``parallel`` the column of the first off unit is a multiple of column 0 (its rows in A), so that QR without
    care meets a roundoff-level column in the middle of the frame.
    """
    generator = torch.Generator().manual_seed(seed)
    active = torch.tensor([j for j in range(size) if j not in OFF])
    off = torch.tensor(OFF)
    w_hh = torch.randn(size, size, generator=generator, dtype=F64)
    w_hh[active[:, None], active[None, :]] = SLOPE * torch.eye(len(active), dtype=F64)[[2, 0, 1]]
    w_hh[off[:, None], active[None, :]] = -w_hh[off[:, None], active[None, :]].abs()
    if parallel:
        w_hh[active, OFF[0]] = w_hh[active, 0] / 3
    w_ih = torch.rand(size, I, generator=generator, dtype=F64)
    w_ih[off] = 0.0
    bias = torch.ones(size, dtype=F64)
    bias[off] = -1.0
    weights = {"W_ih": w_ih, "W_hh": w_hh, "b_ih": bias, "b_hh": torch.zeros(size, dtype=F64)}
    return gl.Elman(weights, nonlinearity="relu")


def _nonnegative_inputs(steps: int, batch: int = B, seed: int = 17) -> Tensor:
    return torch.rand(steps, batch, I, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_units_that_are_always_off_give_minus_inf_exponents() -> None:
    """Two of five ReLU units never switch on: exactly two exponents are −inf (not a large negative number such as
    −37, the log of roundoff), and the other three are log SLOPE, as J acts on the active units as SLOPE·Π."""
    steps = 12
    trace = gl.Model(_relu_with_units_off()).trace(_nonnegative_inputs(steps))
    jacobians = trace.jacobians()
    assert torch.all(jacobians[:, :, list(OFF)] == 0)  # the premise: the off units' rows are exactly 0
    assert torch.all(jacobians[1:] == jacobians[0])  # and every active unit is on at every step
    result = lyapunov(trace, warmup=1)  # the first step turns Q onto the active subspace
    for b in range(B):
        exponents = sorted(result.exponents[b].tolist(), reverse=True)
        assert exponents[3:] == [-math.inf, -math.inf], exponents
        assert all(abs(value - math.log(SLOPE)) <= 1e-12 for value in exponents[:3]), exponents
    assert result.rank.tolist() == [3] * B
    assert torch.equal(result.largest, result.exponents.max(-1).values)
    # a run without warm-up: the first step's rotation is averaged in, the rank is the same
    assert lyapunov(trace).rank.tolist() == [3] * B
    # the top k exponents alone: finite, and rank counts only those
    top = lyapunov(trace, k=2, warmup=1)
    assert top.rank.tolist() == [2] * B
    assert torch.allclose(top.exponents, torch.full((B, 2), math.log(SLOPE), dtype=F64), rtol=0, atol=1e-12)
    # JSON: −inf becomes None, and rank says how many exponents are finite
    document = json.loads(json.dumps(result.to_dict(running=True), allow_nan=False))
    assert document["rank"] == [3] * B
    for b in range(B):
        row = document["exponents"][b]
        assert [value is None for value in row] == [not math.isfinite(v) for v in result.exponents[b].tolist()]
        assert sum(value is not None for value in row) == 3
    assert torch.all(result.stderr[result.exponents.isneginf()].isnan())  # no spread to measure around −inf


def _exact_log_volumes_of(jacobians: Tensor, columns: list[int]) -> list[float]:
    """log vol_m(P e_{c_1}, …, P e_{c_m}) for m = 1..len(columns), P = J_n ⋯ J_1, in 120-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(120):
        product = mpmath.eye(jacobians.shape[-1])
        for jacobian in jacobians.tolist():
            product = mpmath.matrix(jacobian) * product
        chosen = mpmath.matrix([[product[i, j] for j in columns] for i in range(product.rows)])
        _, r = mpmath.qr(chosen)
        logs = [mpmath.log(abs(r[j, j])) for j in range(len(columns))]
        return [float(sum(logs[: m + 1])) for m in range(len(logs))]


def test_a_collapsed_column_in_the_middle_takes_nothing_from_the_live_ones() -> None:
    """The first off unit's column is a multiple of column 0, so J e_1 ∈ span(J e_0) and R[1, 1] is roundoff at the
    first step, in the middle of the frame. Its exponent is −inf, and its arbitrary direction goes behind the live
    columns: the finite exponents are those of the live columns alone (n·Σ_{j ≤ m} λ_{c_j} = log vol_m(P e_{c_1},
    …, P e_{c_m}), exact), and as many are finite as P has rank (3), not fewer."""
    steps = 12
    trace = gl.Model(_relu_with_units_off(parallel=True)).trace(_nonnegative_inputs(steps))
    jacobians = trace.jacobians()
    result = lyapunov(trace)
    assert result.rank.tolist() == [3] * B
    for b in range(B):
        product = torch.linalg.multi_dot(list(jacobians[:, b].flip(0)))
        assert int(torch.linalg.matrix_rank(product)) == 3  # the premise
        exponents = result.exponents[b]
        assert exponents[1] == -math.inf  # the parallel column
        live = [j for j in range(5) if math.isfinite(exponents[j])]
        assert len(live) == 3 and live[0] == 0
        exact = torch.tensor(_exact_log_volumes_of(jacobians[:, b], live), dtype=F64)
        volumes = exponents[live].cumsum(0) * steps
        assert torch.all((volumes - exact).abs() <= 1e-9 * exact.abs().clamp_min(1)), (volumes, exact)
    warm = lyapunov(trace, warmup=1)  # the collapse falls in the warm-up: what follows is exact
    for b in range(B):
        finite = warm.exponents[b][warm.exponents[b].isfinite()]
        assert finite.shape == (3,) and torch.all((finite - math.log(SLOPE)).abs() <= 1e-12), warm.exponents[b]


def _diagonal_relu(delta: float, dtype: torch.dtype) -> gl.Elman:
    """h' = relu(diag(1, δ) h + 1): always on, so J = diag(1, δ) at every step, and R = diag(1, δ) exactly."""
    ones = torch.ones(2, dtype=dtype)
    weights = {
        "W_ih": torch.zeros(2, I, dtype=dtype),
        "W_hh": torch.diag(torch.tensor([1.0, delta], dtype=dtype)),
        "b_ih": ones,
        "b_hh": torch.zeros(2, dtype=dtype),
    }
    return gl.Elman(weights, nonlinearity="relu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_rank_tolerance_is_state_size_times_eps_times_the_frobenius_norm(dtype: torch.dtype) -> None:
    """|R_i[j, j]| ≤ S · eps(dtype) · ‖J_i‖_F counts as zero (λ_j = −inf); just above it, λ_j = log δ."""
    eps = torch.finfo(dtype).eps
    tolerance = 2 * eps * math.sqrt(1 + (2 * eps) ** 2)  # S = 2, ‖diag(1, δ)‖_F = √(1 + δ²)
    x = torch.zeros(6, B, I, dtype=dtype)
    above = lyapunov(gl.Model(_diagonal_relu(1.01 * tolerance, dtype)), x)
    expected = torch.tensor([0.0, math.log(float(torch.tensor(1.01 * tolerance, dtype=dtype)))], dtype=dtype)
    assert torch.allclose(above.exponents, expected.expand(B, 2), rtol=1e-6, atol=0), above.exponents
    assert above.rank.tolist() == [2] * B
    below = lyapunov(gl.Model(_diagonal_relu(0.99 * tolerance, dtype)), x)
    assert below.exponents[:, 0].tolist() == [0.0] * B
    assert below.exponents[:, 1].tolist() == [-math.inf] * B
    assert below.rank.tolist() == [1] * B
    # an exact zero at every step is dead at the counted steps too, whatever the warm-up
    assert lyapunov(gl.Model(_diagonal_relu(0.0, dtype)), x, warmup=5).rank.tolist() == [1] * B


def test_rank_of_an_exactly_singular_step_and_of_padding() -> None:
    """J = 0 at one step (z = r = 0 clamped): every exponent is −inf, rank 0; a sequence that ends before that
    step keeps its rank, and one with no counted step has NaN exponents and counts none as −inf."""
    model = gl.Model(gl.GRU.random(I, 3, dtype=F64, seed=3))
    x = _randn(8, 3, I, seed=18)
    trace = gl.what_if(model.trace(x, lengths=[8, 3, 6]), {"z": 0.0, "r": 0.0}, steps=[4])
    result = lyapunov(trace)
    assert result.rank.tolist() == [0, 3, 0]
    assert torch.all(result.exponents[[0, 2]].isneginf()) and torch.all(result.exponents[1].isfinite())
    short = lyapunov(model, x, lengths=[8, 2, 6], warmup=3, windows=2)
    assert short.rank.tolist() == [3, 3, 3] and torch.all(short.exponents[1].isnan())
    # a collapse inside the warm-up only turns Q: the counted steps decide
    early = gl.what_if(model.trace(x), {"z": 0.0, "r": 0.0}, steps=[0])
    assert lyapunov(early).rank.tolist() == [0, 0, 0]
    warmed = lyapunov(early, warmup=1)
    assert warmed.rank.tolist() == [3, 3, 3] and torch.all(warmed.exponents.isfinite())


# ---------------------------------------------------------------------------------------------------------------
# Warm-up, windows, running estimates and padding


def test_warmup_windows_and_running_estimates() -> None:
    steps, warmup, windows = 23, 5, 4
    model = gl.Model(scaled(gl.GRU.random(I, 3, dtype=F64, seed=16), 2.5))
    trace = model.trace(_randn(steps, B, I, seed=12))
    plain = lyapunov(trace, windows=1)
    # the log-growth of every step, recovered from the running means of a run without warm-up
    cumulative = plain.running * torch.arange(1, steps + 1, dtype=F64)[:, None, None]
    assert torch.allclose(cumulative[-1] / steps, plain.exponents, rtol=1e-13, atol=0)
    growth = torch.diff(cumulative, dim=0, prepend=torch.zeros_like(cumulative[:1]))  # (T, B, S)

    result = lyapunov(trace, warmup=warmup, windows=windows)
    assert result.warmup == warmup
    edges = result.window_edges
    assert len(edges) == windows + 1 and edges[0] == warmup and edges[-1] == steps
    assert all(a < b for a, b in zip(edges, edges[1:]))
    assert result.finite_time.shape == (windows, B, 3)
    assert result.running.shape == (steps - warmup, B, 3)
    # warm-up steps still turn the directions: the counted steps' growth is the same as without warm-up
    assert torch.allclose(result.exponents, growth[warmup:].mean(0), rtol=1e-12, atol=1e-14)
    for w, (a, b) in enumerate(zip(edges, edges[1:])):
        assert torch.allclose(result.finite_time[w], growth[a:b].mean(0), rtol=1e-12, atol=1e-14)
    sizes = torch.tensor(np.diff(edges), dtype=F64)[:, None, None]
    assert torch.allclose((result.finite_time * sizes).sum(0) / sizes.sum(), result.exponents, rtol=1e-13, atol=0)
    assert torch.allclose(result.running[-1], result.exponents, rtol=1e-13, atol=0)
    expected_running = growth[warmup:].cumsum(0) / torch.arange(1, steps - warmup + 1, dtype=F64)[:, None, None]
    assert torch.allclose(result.running, expected_running, rtol=1e-12, atol=1e-14)
    stderr = result.finite_time.numpy().std(axis=0, ddof=1) / math.sqrt(windows)
    assert np.allclose(result.stderr.numpy(), stderr, rtol=1e-12, atol=0)
    assert torch.all(plain.stderr.isnan())  # one window: no spread to measure
    # to_dict is plain JSON (NaN standard errors become None)
    document = json.loads(json.dumps(plain.to_dict(), allow_nan=False))
    assert document["stderr"] == [[None] * 3] * B
    assert document["window_edges"] == [0, steps]
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["exponents"] == result.exponents.tolist()
    assert document["finite_time"] == result.finite_time.tolist()
    assert document["warmup"] == warmup and document["recurrence"] == "l0"


def test_padded_sequences_count_only_their_own_steps() -> None:
    steps, lengths, warmup = 12, [12, 4, 9], 2
    model = gl.load(_torch_module("GRU"))
    x = _randn(steps, 3, I, seed=13)
    result = lyapunov(model, x, lengths=lengths, warmup=warmup, windows=5)
    assert result.counted.tolist() == [length - warmup for length in lengths]
    for b, length in enumerate(lengths):
        alone = lyapunov(model, x[:length, b : b + 1], warmup=warmup, windows=1)
        assert torch.allclose(result.exponents[b], alone.exponents[0], rtol=1e-12, atol=1e-15), b
    assert torch.allclose(result.running[-1], result.exponents, rtol=1e-13, atol=0)
    # windows past a sequence's end are empty (NaN); the others average to the exponents, weighted by their
    # counted steps
    edges = result.window_edges
    counts = torch.tensor(
        [[max(0, min(b_end, length) - a) for length in lengths] for a, b_end in zip(edges, edges[1:])], dtype=F64
    )
    assert torch.equal(result.finite_time.isnan().all(-1), counts == 0)
    weighted = torch.where(counts[..., None] > 0, result.finite_time * counts[..., None], 0.0).sum(0)
    assert torch.allclose(weighted / counts.sum(0)[:, None], result.exponents, rtol=1e-12, atol=0)
    # the standard error needs at least two non-empty windows
    assert torch.equal(result.stderr.isnan().all(-1), (counts > 0).sum(0) < 2)
    assert torch.equal(result.stderr.isnan().any(-1), (counts > 0).sum(0) < 2)
    # a sequence that ends inside the warm-up has nothing to average
    short = lyapunov(model, x, lengths=[12, 2, 9], warmup=3, windows=2)
    assert short.counted.tolist() == [9, 0, 6]
    assert torch.all(short.exponents[1].isnan()) and torch.all(short.exponents[[0, 2]].isfinite())
    assert json.loads(json.dumps(short.to_dict(), allow_nan=False))["exponents"][1] == [None] * 4


def test_reverse_direction_and_stacks() -> None:
    """Lyapunov of a bidirectional layer's reverse direction equals the forward model on flipped input; a stack's
    exponents sum to the sum of its layers' (the stack's Jacobian is block lower-triangular)."""
    steps = 15
    x = _randn(steps, B, I, seed=14)
    bidirectional = gl.load(_torch_module("GRU", bidirectional=True))
    reverse_cell = bidirectional.cells()["l0_reverse"]
    for lengths in (None, [15, 9]):
        result = lyapunov(bidirectional, x, lengths=lengths, layer=0, direction="reverse", windows=3)
        assert result.recurrence == "l0_reverse"
        full = lengths or [steps] * B
        oracle = lyapunov(gl.Model(reverse_cell), _flipped(x, full), lengths=lengths, windows=3)
        for field in ("exponents", "finite_time", "stderr", "running"):
            got, expected = getattr(result, field), getattr(oracle, field)
            assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15, equal_nan=True), field
        backwards = lyapunov(gl.Model(reverse_cell, reverse=True), x, lengths=lengths, windows=3)
        assert backwards.recurrence == "l0_reverse"
        assert torch.allclose(backwards.exponents, result.exponents, rtol=1e-12, atol=1e-15)
        forward = lyapunov(bidirectional, x, lengths=lengths, layer=0, direction="forward", windows=3)
        assert not torch.allclose(forward.exponents, result.exponents)

    stack = gl.load(_torch_module("GRU", num_layers=2))
    trace = stack.trace(x)
    whole = lyapunov(trace)
    assert whole.recurrence == "stack" and whole.exponents.shape == (B, 8)
    parts = [lyapunov(trace, layer=layer) for layer in (0, 1)]
    assert all(part.exponents.shape == (B, 4) for part in parts)
    total = parts[0].exponents.sum(-1) + parts[1].exponents.sum(-1)
    assert torch.allclose(whole.exponents.sum(-1), total, rtol=1e-11, atol=0)


def test_lyapunov_does_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = gl.load(_torch_module("LSTM")).trace(_randn(9, 3, I, seed=15), lengths=[9, 4, 7])
    whole = lyapunov(trace, windows=3)
    monkeypatch.setattr(lyapunov_module, "CHUNK_ELEMENTS", 1)  # one step per chunk
    chunked = lyapunov(trace, windows=3)
    for field in ("exponents", "finite_time", "stderr", "running"):
        assert torch.allclose(getattr(chunked, field), getattr(whole, field), rtol=1e-14, atol=0, equal_nan=True)


def test_counted_has_one_entry_per_sequence_without_padding() -> None:
    """BUG repro: ``counted`` is documented as (B,), steps averaged per sequence, and is (B,) for a padded trace,
    but without lengths= it comes out as (1,): the mask ``arange(T)[:, None] >= warmup`` is (T, 1) and is never
    broadcast to the batch. to_dict()["counted"] then has one entry for the whole batch."""
    steps, warmup = 7, 2
    trace = gl.Model(gl.GRU.random(I, 3, dtype=F64, seed=0)).trace(_randn(steps, 3, I, seed=16))
    result = lyapunov(trace, warmup=warmup, windows=2)
    assert result.exponents.shape == (3, 3)
    assert tuple(result.counted.shape) == (3,), f"counted has shape {tuple(result.counted.shape)}, expected (3,)"
    assert result.counted.tolist() == [steps - warmup] * 3
    assert result.to_dict()["counted"] == [steps - warmup] * 3
    padded = lyapunov(trace.model, trace.inputs, lengths=[steps] * 3, warmup=warmup, windows=2)
    assert padded.counted.tolist() == result.counted.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_lyapunov_bad_input() -> None:
    model = gl.Model(gl.GRU.random(I, 4, dtype=F64, seed=0))
    steps = 6
    x = _randn(steps, B, I)
    trace = model.trace(x)
    for k in (0, 5, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match=r"k must be an int in 1\.\.4"):
            lyapunov(trace, k=k)  # type: ignore[arg-type]
    for warmup in (-1, steps, steps + 3, 0.5):
        with pytest.raises(ValueError, match=r"warmup must be an int in 0\.\.5"):
            lyapunov(trace, warmup=warmup)  # type: ignore[arg-type]
    for windows in (0, steps + 1, 2.0):
        with pytest.raises(ValueError, match=r"windows must be an int in 1\.\.6"):
            lyapunov(trace, windows=windows)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"windows must be an int in 1\.\.2"):
        lyapunov(trace, warmup=4, windows=3)  # only two counted steps
    assert lyapunov(trace, warmup=4, windows=2).window_edges == [4, 5, 6]
    numpy_ints = lyapunov(trace, k=np.int64(2), warmup=np.int64(1), windows=np.int64(5))
    assert numpy_ints.exponents.shape == (B, 2) and numpy_ints.window_edges == [1, 2, 3, 4, 5, 6]
    last = lyapunov(trace, warmup=steps - 1, windows=1)
    assert torch.allclose(last.exponents, last.running[0], rtol=1e-15, atol=0)
    with pytest.raises(TypeError, match="needs the inputs x"):
        lyapunov(model)
    with pytest.raises(TypeError, match="takes no x, h0 or lengths"):
        lyapunov(trace, x)
    with pytest.raises(TypeError, match="takes no x, h0 or lengths"):
        lyapunov(trace, lengths=[steps] * B)
    with pytest.raises(TypeError, match="takes no x, h0 or lengths"):
        lyapunov(trace, h0=torch.zeros(1, B, 4, dtype=F64))
    for source in (nn.GRU(I, 4).double(), "model", None, model.cells()["l0"]):
        with pytest.raises(TypeError, match="needs a gatelens Model"):
            lyapunov(source, x)  # type: ignore[arg-type]
    bidirectional = gl.load(_torch_module("GRU", bidirectional=True))
    with pytest.raises(ValueError, match="bidirectional"):
        lyapunov(bidirectional, x)
    with pytest.raises(ValueError, match="unknown direction"):
        lyapunov(bidirectional, x, layer=0, direction="backward")
    with pytest.raises(ValueError, match="x has 2 input features"):
        lyapunov(model, x[..., :2])


def test_default_windows_fit_a_short_trace() -> None:
    trace = gl.Model(gl.GRU.random(3, 4, dtype=F64, seed=0)).trace(_randn(6, 2, 3))
    result = lyapunov(trace, warmup=2)
    assert result.finite_time.shape[0] == 4
    assert result.window_edges == [2, 3, 4, 5, 6]
    assert lyapunov(gl.Model(gl.GRU.random(3, 4, dtype=F64)).trace(_randn(40, 2, 3))).finite_time.shape[0] == 10


def test_lyapunov_to_dict_with_the_running_estimate() -> None:
    result = lyapunov(gl.Model(gl.GRU.random(3, 4, dtype=F64)).trace(_randn(8, 2, 3)), warmup=2)
    data = json.loads(json.dumps(result.to_dict(running=True), allow_nan=False))
    assert torch.allclose(torch.tensor(data["running"], dtype=F64), result.running)
    assert "running" not in result.to_dict()
