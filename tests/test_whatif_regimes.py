"""Gate regimes, timescales and what-if clamps against hand-built gates and an independent oracle.

Regimes: GRU / LSTM / Elman cells whose gates are saturated by ±20 biases must land in the intended regime under
every GRU convention (the Jacobian rows say the same thing); gates, admits and codes are recomputed here from the
equations of docs/notation.md; τ = 1/(1 − c̄) is checked against a constant update gate and against the measured
decay of ∂h_t/∂h_k; labels, padding, stacks and bad input.

What-if: the clamped trace is compared with a plain-torch oracle written here (the constant gate replaces the
computed one; torch.func.jacrev gives the reference Jacobians), the seed's blocking case z = r = 0 is reproduced
with credit maps, and the layer/direction/layout selection and bad input are checked.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor

import gatelens as gl
from gatelens.analysis import Regimes, regimes, what_if
from gatelens.analysis.regimes import PADDING, REGIMES
from tests import reference
from tests.cell_configs import relative_error

F64 = torch.float64
T, B, I, H = 6, 2, 3, 4
SAT = 20.0  # σ(±20) is 1 or 0 within 2.1e-9; a hard sigmoid is exactly 1 or 0 there
GRU_CONVENTIONS = [(reset, update) for reset in ("after", "before") for update in ("keep", "replace")]
GATES = ["sigmoid", "hard_sigmoid_keras2", "hard_sigmoid_keras3"]
CARRY, BLOCKED, ELMAN, MIXED = (REGIMES.index(name) for name in ("carry", "blocked", "elman", "mixed"))


def _randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _full(value: float | Tensor, size: int = H) -> Tensor:
    return torch.zeros(size, dtype=F64) + value


def _gru(
    reset: str,
    update: str,
    gate: str = "sigmoid",
    *,
    b_iz: float | Tensor = 0.0,
    b_ir: float | Tensor = 0.0,
    seed: int = 0,
    scale: float = 0.1,
    hidden: int = H,
    inputs: int = I,
    zero: tuple[str, ...] = (),
    **blocks: Tensor,
) -> gl.GRU:
    """A GRU built by hand: random blocks of size ``scale`` (small: they cannot move a ±20 bias), the z and r
    input biases as given, the blocks named in ``zero`` set to 0 and any block overridden by keyword."""
    weights = {}
    for index, (name, shape) in enumerate(
        [(f"W_i{g}", (hidden, inputs)) for g in "rzn"]
        + [(f"W_h{g}", (hidden, hidden)) for g in "rzn"]
        + [(f"b_{side}{g}", (hidden,)) for side in "ih" for g in "rzn"]
    ):
        weights[name] = _randn(*shape, seed=1000 * seed + index, scale=scale)
    weights["b_iz"], weights["b_ir"] = _full(b_iz, hidden), _full(b_ir, hidden)
    weights["b_hz"], weights["b_hr"] = _full(0.0, hidden), _full(0.0, hidden)
    for name in zero:
        weights[name] = torch.zeros_like(weights[name])
    weights |= blocks
    return gl.GRU(weights, reset=reset, update=update, gate=gate)


def _lstm(
    *,
    b_if: float | Tensor = 0.0,
    b_ii: float | Tensor = 0.0,
    seed: int = 0,
    scale: float = 0.1,
    inputs: int = I,
    projection: int | None = None,
) -> gl.LSTM:
    """An LSTM built by hand like :func:`_gru`: the forget and input gate biases as given."""
    out = projection or H
    shapes = [(f"W_i{g}", (H, inputs)) for g in "ifgo"] + [(f"W_h{g}", (H, out)) for g in "ifgo"]
    shapes += [(f"b_{side}{g}", (H,)) for side in "ih" for g in "ifgo"]
    if projection:
        shapes.append(("W_proj", (projection, H)))
    weights = {
        name: _randn(*shape, seed=1000 * seed + index, scale=scale) for index, (name, shape) in enumerate(shapes)
    }
    weights |= {"b_if": _full(b_if), "b_hf": _full(0.0), "b_ii": _full(b_ii), "b_hi": _full(0.0)}
    return gl.LSTM(weights)


def _z_bias(update: str, carry: bool) -> float:
    """The z bias that makes the carry c ≈ 1 (carry=True) or ≈ 0: c = z for "keep", 1 − z for "replace"."""
    return SAT if carry == (update == "keep") else -SAT


# =============================================================================================================
# Regimes
# =============================================================================================================


@pytest.mark.parametrize("regime", ["carry", "blocked", "elman", "mixed"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize(("reset", "update"), GRU_CONVENTIONS)
def test_saturated_gru_gates_land_in_the_intended_regime(reset: str, update: str, gate: str, regime: str) -> None:
    alternating = torch.tensor([SAT, -SAT] * (H // 2), dtype=F64)  # carry wins whatever r is
    b_iz, b_ir = {
        "carry": (_z_bias(update, True), alternating),
        "blocked": (_z_bias(update, False), -SAT),
        "elman": (_z_bias(update, False), SAT),
        "mixed": (0.0, 0.0),
    }[regime]
    cell = _gru(reset, update, gate, b_iz=b_iz, b_ir=b_ir, seed=1)
    x = _randn(T, B, I, seed=2)
    trace = gl.Model(cell).trace(x)
    result = regimes(trace)
    assert isinstance(result, Regimes)
    assert result.codes.shape == (T, B, H)
    assert torch.equal(result.codes, torch.full((T, B, H), REGIMES.index(regime), dtype=result.codes.dtype))
    expected_census = torch.zeros(4, dtype=F64)
    expected_census[REGIMES.index(regime)] = 1.0
    assert torch.equal(result.census, expected_census)
    assert torch.equal(result.census_by_unit, expected_census.expand(H, 4))
    assert torch.equal(result.looks_blocked, torch.zeros(H, dtype=F64))

    jacobians = trace.jacobians()
    eye = torch.eye(H, dtype=F64)
    if regime == "blocked":  # nothing of the past reaches any unit: every row of J ≈ 0
        assert jacobians.abs().max() < 1e-7
    elif regime == "carry":  # the carry path alone: J ≈ I
        assert (jacobians - eye).abs().max() < 1e-7
    elif regime == "elman":  # z replaces, r ≈ 1 on every unit: J ≈ diag(1 − n²) W_hn, as an Elman RNN
        w = cell.weights
        h = trace.states["l0"][:-1]
        n = torch.tanh(x @ w["W_in"].T + w["b_in"] + h @ w["W_hn"].T + w["b_hn"])
        expected = (1 - n**2)[..., None] * w["W_hn"]
        assert (jacobians - expected).abs().max() < 1e-7
        assert expected.abs().max() > 0.02  # not trivially zero
    else:
        assert bool(((result.carry > 0.1) & (result.carry < 0.9)).all())


@pytest.mark.parametrize("update", ["keep", "replace"])
@pytest.mark.parametrize("reset", ["after", "before"])
def test_one_unit_with_closed_reset_is_blocked_only_with_reset_after(reset: str, update: str) -> None:
    """Every unit replaces (c ≈ 0); unit 0 has r ≈ 0, the others r ≈ 1. With reset "before" unit 0's candidate
    still reads the other units' state through W_hn[0, 1:]: not blocked, and ``looks_blocked`` says so."""
    r_bias = _full(SAT)
    r_bias[0] = -SAT
    w_hn = _randn(H, H, seed=3, scale=0.5)
    cell = _gru(reset, update, b_iz=_z_bias(update, False), b_ir=r_bias, seed=4, W_hn=w_hn)
    trace = gl.Model(cell).trace(_randn(T, B, I, seed=5))
    result = regimes(trace)
    row = trace.jacobians()[..., 0, :].abs().max()
    if reset == "after":
        assert bool((result.codes[..., 0] == BLOCKED).all())
        assert result.looks_blocked[0] == 0
        assert row < 1e-7
    else:
        admit = w_hn[0, 1:].norm() / w_hn[0].norm()  # ‖W_hn[0, :] ⊙ r‖ / ‖W_hn[0, :]‖ with r ≈ (0, 1, 1, 1)
        assert admit > 0.1  # the premise: the row is open
        assert torch.allclose(result.admit[..., 0], admit.expand(T, B), atol=1e-7)
        assert bool((result.codes[..., 0] != BLOCKED).all())
        assert result.looks_blocked[0] == 1.0
        assert row > 1e-3
    assert torch.equal(result.looks_blocked[1:], torch.zeros(H - 1, dtype=F64))  # their own r ≈ 1
    assert trace.jacobians()[..., 1:, :].abs().max() > 1e-3

    # every reset gate closed: blocked with either placement, and the whole Jacobian vanishes
    closed = _gru(reset, update, b_iz=_z_bias(update, False), b_ir=-SAT, seed=4, W_hn=w_hn)
    closed_trace = gl.Model(closed).trace(_randn(T, B, I, seed=5))
    closed_result = regimes(closed_trace)
    assert bool((closed_result.codes == BLOCKED).all())
    assert torch.equal(closed_result.looks_blocked, torch.zeros(H, dtype=F64))
    assert closed_trace.jacobians().abs().max() < 1e-7


@pytest.mark.parametrize("regime", ["carry", "blocked", "elman", "mixed"])
def test_saturated_lstm_gates_land_in_the_intended_regime(regime: str) -> None:
    b_if, b_ii = {"carry": (SAT, -SAT), "blocked": (-SAT, -SAT), "elman": (-SAT, SAT), "mixed": (0.0, 0.0)}[regime]
    trace = gl.Model(_lstm(b_if=b_if, b_ii=b_ii, seed=6)).trace(_randn(T, B, I, seed=7))
    result = regimes(trace)
    assert result.unit_labels == [f"c{j}" for j in range(H)]
    assert bool((result.codes == REGIMES.index(regime)).all())
    c_rows = trace.jacobians()[..., H:, :]  # rows of the cell state c' = f ⊙ c + i ⊙ g
    if regime == "blocked":
        assert c_rows.abs().max() < 1e-7
    elif regime == "carry":
        assert (c_rows[..., H:] - torch.eye(H, dtype=F64)).abs().max() < 1e-7
    elif regime == "elman":  # c' ≈ g: it reads the whole past state through W_hg
        assert c_rows.abs().max() > 1e-3
        assert c_rows[..., H:].abs().max() < 1e-7  # nothing carried on the highway


def test_elman_is_always_elman() -> None:
    trace = gl.Model(gl.Elman.random(I, H, seed=8, dtype=F64)).trace(_randn(T, B, I, seed=9))
    result = regimes(trace)
    assert bool((result.codes == ELMAN).all())
    assert torch.equal(result.carry, torch.zeros(T, B, H, dtype=F64))
    assert torch.equal(result.admit, torch.ones(T, B, H, dtype=F64))
    assert torch.equal(result.census, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64))
    assert torch.equal(result.timescale, torch.ones(H, dtype=F64))
    assert result.unit_kind == ["short-term"] * H


def _expected_codes(carry: Tensor, admit: Tensor, lo: float, hi: float) -> Tensor:
    """The rule of the regimes module, element by element."""
    codes = torch.full(carry.shape, MIXED, dtype=torch.long)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in carry.shape)).tolist():
        c, a = carry[tuple(index)].item(), admit[tuple(index)].item()
        if c > hi:
            codes[tuple(index)] = CARRY
        elif c < lo and a < lo:
            codes[tuple(index)] = BLOCKED
        elif c < lo and a > hi:
            codes[tuple(index)] = ELMAN
    return codes


@pytest.mark.parametrize(("reset", "update"), GRU_CONVENTIONS)
def test_gru_gates_and_codes_match_the_equations(reset: str, update: str) -> None:
    """Gates recomputed from the states with the notation's equations; codes from the rule; a zero W_hn row
    admits nothing (reset "before")."""
    w_hn = _randn(H, H, seed=10, scale=1.5)
    w_hn[2] = 0.0
    cell = _gru(reset, update, seed=11, scale=1.5, W_hn=w_hn)
    x = _randn(8, 3, I, seed=12)
    trace = gl.Model(cell).trace(x)
    lo, hi = 0.2, 0.7
    result = regimes(trace, (lo, hi))
    w, h = cell.weights, trace.states["l0"][:-1]
    r = torch.sigmoid(x @ w["W_ir"].T + w["b_ir"] + h @ w["W_hr"].T + w["b_hr"])
    z = torch.sigmoid(x @ w["W_iz"].T + w["b_iz"] + h @ w["W_hz"].T + w["b_hz"])
    carry = z if update == "keep" else 1 - z
    if reset == "after":
        admit = r
    else:
        admit = torch.stack(
            [
                (w_hn[j] ** 2 * r**2).sum(-1).sqrt() / w_hn[j].norm()
                if w_hn[j].norm() > 0
                else torch.zeros_like(r[..., 0])
                for j in range(H)
            ],
            dim=-1,
        )
    assert relative_error(result.carry, carry) <= 1e-12
    assert relative_error(result.gate, r) <= 1e-12
    assert relative_error(result.admit, admit) <= 1e-12
    assert not bool(torch.isnan(result.admit).any())
    codes = _expected_codes(carry, admit, lo, hi)
    assert torch.equal(result.codes.long(), codes)
    assert len(set(codes.flatten().tolist())) >= 3  # the weights are large enough to visit several regimes
    assert result.thresholds == (lo, hi)
    assert relative_error(result.mean_carry, carry.mean((0, 1))) <= 1e-12
    assert relative_error(result.mean_admit, admit.mean((0, 1))) <= 1e-12
    assert relative_error(result.mean_gate, r.mean((0, 1))) <= 1e-12
    counts = torch.stack([(codes == k).sum((0, 1)) for k in range(4)], dim=-1).to(F64) / (8 * 3)
    assert relative_error(result.census_by_unit, counts) <= 1e-15
    assert relative_error(result.census, counts.mean(0)) <= 1e-15
    expected_looks = ((carry < lo) & (r < lo) & (admit >= lo)).to(F64).mean((0, 1))
    assert torch.equal(result.looks_blocked, expected_looks)
    # one number ε means (ε, 1 − ε)
    assert regimes(trace, 0.2).thresholds == (0.2, 0.8)
    assert torch.equal(regimes(trace, 0.2).codes, regimes(trace, (0.2, 0.8)).codes)


@pytest.mark.parametrize(
    ("z", "r", "thresholds", "regime"),
    [
        (0.9, 0.5, (0.1, 0.9), "mixed"),  # c = hi exactly: not carry (c > hi)
        (0.9, 0.5, (0.1, 0.875), "carry"),
        (0.125, 0.0, (0.125, 0.9), "mixed"),  # c = lo exactly: not replaced (c < lo)
        (0.0, 0.125, (0.125, 0.9), "mixed"),  # admit = lo exactly: not blocked (a < lo)
        (0.0, 0.0625, (0.125, 0.9), "blocked"),
        (0.0, 0.75, (0.125, 0.75), "mixed"),  # admit = hi exactly: not elman (a > hi)
        (0.0, 0.875, (0.125, 0.75), "elman"),
        (0.5, 0.5, (0.5, 0.5), "mixed"),  # lo = hi = ½
        (0.5, 0.5, (0.25, 0.25), "carry"),
    ],
)
def test_thresholds_are_strict(z: float, r: float, thresholds: object, regime: str) -> None:
    """Gates clamped to exact values (what-if) put c and a exactly on the thresholds."""
    trace = gl.Model(_gru("after", "keep", seed=72)).trace(_randn(T, B, I, seed=73))
    result = regimes(what_if(trace, {"z": z, "r": r}), thresholds)  # type: ignore[arg-type]
    assert torch.equal(result.carry, torch.full((T, B, H), z, dtype=F64))
    assert bool((result.codes == REGIMES.index(regime)).all())


def test_lstm_gates_match_the_equations() -> None:
    cell = _lstm(seed=13, scale=1.5)
    x = _randn(T, B, I, seed=14)
    trace = gl.Model(cell).trace(x)
    result = regimes(trace)
    w, h = cell.weights, trace.states["l0"][:-1, :, :H]
    f = torch.sigmoid(x @ w["W_if"].T + w["b_if"] + h @ w["W_hf"].T + w["b_hf"])
    i = torch.sigmoid(x @ w["W_ii"].T + w["b_ii"] + h @ w["W_hi"].T + w["b_hi"])
    assert relative_error(result.carry, f) <= 1e-12
    assert relative_error(result.admit, i) <= 1e-12
    assert relative_error(result.gate, i) <= 1e-12
    assert torch.equal(result.codes.long(), _expected_codes(f, i, 0.1, 0.9))


# ---------------------------------------------------------------------------------------------------------------
# Timescales


def _constant_z_gru(update: str, tau: Tensor | float, *, seed: int, w_hn_scale: float = 0.0) -> gl.GRU:
    """z constant per unit, chosen so that c = 1 − 1/τ: W_iz = W_hz = 0, b_iz = logit(c) ("keep") or logit(1 − c)
    ("replace"), b_hz = 0. W_hr = 0; W_hn random of size ``w_hn_scale`` (0: the carry path alone)."""
    carry = 1 - 1 / _full(tau)
    p = carry if update == "keep" else 1 - carry
    return _gru(
        "after",
        update,
        b_iz=torch.log(p / (1 - p)),
        seed=seed,
        scale=0.5,
        zero=("W_iz", "W_hz", "W_hr"),
        W_hn=_randn(H, H, seed=seed + 1, scale=w_hn_scale),
    )


def _products(jacobians: Tensor, start: int, lags: int) -> Tensor:
    """∂h_{start+ℓ}/∂h_start = J[start+ℓ−1] ⋯ J[start] for ℓ = 1..lags: (lags, B, S, S)."""
    product, out = torch.eye(jacobians.shape[-1], dtype=F64).expand_as(jacobians[0]), []
    for step in range(start, start + lags):
        product = jacobians[step] @ product
        out.append(product)
    return torch.stack(out)


@pytest.mark.parametrize("update", ["keep", "replace"])
@pytest.mark.parametrize("tau", [5, 20, 50])
def test_constant_update_gate_gives_its_timescale_and_the_carry_path_decays_as_c_to_the_lag(
    tau: int, update: str
) -> None:
    cell = _constant_z_gru(update, tau, seed=15)
    lags = 2 * tau
    trace = gl.Model(cell).trace(_randn(lags + 2, B, I, seed=16))
    result = regimes(trace)
    assert relative_error(result.timescale, torch.full((H,), float(tau), dtype=F64)) <= 1e-9
    assert result.unit_kind == ["long-term" if tau >= 10 else "mixed"] * H

    # With W_hz = W_hn = W_hr = 0 every other path of J is 0 (no update slope, no candidate row), so
    # J = diag(c) and the diagonal of ∂h_{k+ℓ}/∂h_k is exactly c^ℓ = (1 − 1/τ)^ℓ.
    c = 1 - 1 / tau
    jacobians = trace.jacobians()
    assert relative_error(jacobians, torch.diag_embed(torch.full((lags + 2, B, H), c, dtype=F64))) <= 1e-12
    products = _products(jacobians, 1, lags)
    diagonal = products.diagonal(dim1=-2, dim2=-1)  # (lags, B, H)
    ell = torch.arange(1, lags + 1, dtype=F64)[:, None, None]
    assert relative_error(diagonal, (c**ell).expand_as(diagonal)) <= 1e-12
    # The e-folding lag ℓ* (c^ℓ* = 1/e) measured from the decay rate −log(diag)/ℓ is −1/log(1 − 1/τ)
    # = τ − 1/2 − 1/(12τ) − …, so it matches τ to within 1/(2τ) relative (plus 1% slack for the tail).
    e_fold = 1 / (-torch.log(diagonal) / ell)
    assert bool(((e_fold - tau).abs() / tau <= 1 / (2 * tau) + 0.01).all())
    assert relative_error(e_fold, torch.full_like(e_fold, -1 / math.log(c))) <= 1e-9


def test_measured_decay_with_recurrent_coupling_is_close_to_one_over_tau() -> None:
    """Unit 0 has τ = 20, the others τ = 5; W_hn random and nonzero couples them. τ reads the gates only, but
    the measured decay of unit 0's diagonal of ∂h_{k+ℓ}/∂h_k over the lags stays near 1/τ."""
    tau = torch.tensor([20.0, 5.0, 5.0, 5.0], dtype=F64)
    cell = _constant_z_gru("keep", tau, seed=17, w_hn_scale=0.5)
    trace = gl.Model(cell).trace(_randn(45, 1, I, seed=18))
    assert relative_error(regimes(trace).timescale, tau) <= 1e-9
    jacobians = trace.jacobians()
    assert (jacobians - torch.diag_embed(1 - 1 / tau.expand(45, 1, H))).abs().max() > 0.01  # coupling is real
    diagonal = _products(jacobians, 2, 40)[:, 0, 0, 0]
    assert bool((diagonal > 0).all())
    ell = torch.arange(1, 41, dtype=F64)[4:]
    log_d = diagonal.log()[4:]
    slope = ((ell - ell.mean()) * (log_d - log_d.mean())).sum() / ((ell - ell.mean()) ** 2).sum()
    assert abs(-slope.item() - 1 / 20) <= 0.1 / 20


# ---------------------------------------------------------------------------------------------------------------
# Labels, census, padding, stacks, to_dict


def test_unit_kinds_follow_the_rule_and_its_bounds() -> None:
    tau = torch.tensor([20.0, 2.0, 5.0, 1 / 0.7], dtype=F64)  # c̄ = 0.95, 0.5, 0.8, 0.3
    trace = gl.Model(_constant_z_gru("keep", tau, seed=19)).trace(_randn(T, B, I, seed=20))
    result = regimes(trace)
    assert relative_error(result.timescale, tau) <= 1e-9
    assert result.unit_kind == ["long-term", "short-term", "mixed", "short-term"]
    assert result.units("long-term") == ["h0"]
    assert result.units("short-term") == ["h1", "h3"]
    assert result.units("mixed") == ["h2"]
    exact = result.timescale[2].item()  # the bounds are inclusive: τ ≥ long_term, τ ≤ short_term
    assert regimes(trace, long_term=exact).unit_kind[2] == "long-term"
    assert regimes(trace, long_term=math.nextafter(exact, math.inf)).unit_kind[2] == "mixed"
    assert regimes(trace, short_term=exact).unit_kind[2] == "short-term"
    assert regimes(trace, short_term=math.nextafter(exact, 0)).unit_kind[2] == "mixed"
    assert regimes(trace, long_term=30.0, short_term=1.0).unit_kind == ["mixed"] * H
    with pytest.raises(ValueError, match="unknown unit kind 'long'"):
        result.units("long")


def test_census_sums_to_one_and_to_dict_is_json() -> None:
    cell = _gru("before", "keep", gate="hard_sigmoid_keras2", seed=21, scale=2.0, b_iz=torch.tensor([3 * SAT, 0, 0, 0]))
    trace = gl.Model(cell).trace(_randn(T, B, I, seed=22))
    result = regimes(trace)
    assert abs(result.census.sum().item() - 1) <= 1e-15
    assert relative_error(result.census_by_unit.sum(1), torch.ones(H, dtype=F64)) <= 1e-15
    assert result.timescale[0] == math.inf  # z = 1 exactly: c̄ = 1
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["recurrence"] == "l0"
    assert data["thresholds"] == [0.1, 0.9]
    assert list(data["census"]) == list(REGIMES)
    assert [unit["unit"] for unit in data["units"]] == result.unit_labels
    assert data["units"][0]["timescale"] is None and data["units"][0]["kind"] == "long-term"
    for j, unit in enumerate(data["units"]):
        assert unit["census"] == dict(zip(REGIMES, result.census_by_unit[j].tolist()))
        assert unit["mean_carry"] == result.mean_carry[j].item()
        assert unit["looks_blocked"] == result.looks_blocked[j].item()


@pytest.mark.parametrize("kind", ["gru-before", "lstm"])
def test_padded_steps_are_left_out_of_the_census_and_the_means(kind: str) -> None:
    cell = _gru("before", "keep", seed=23, scale=2.0) if kind == "gru-before" else _lstm(seed=24, scale=2.0)
    lengths = [6, 3, 1]
    x = _randn(T, 3, I, seed=25)
    for b, length in enumerate(lengths):
        x[length:, b] = 50.0  # the padded steps would saturate every gate if they were read
    trace = gl.Model(cell).trace(x, lengths=lengths)
    result = regimes(trace)
    valid = torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]
    assert torch.equal(result.valid, valid)
    assert bool((result.codes[~valid] == PADDING).all())
    assert bool((result.codes[valid] >= 0).all())

    # the sequences one by one, unpadded: their valid steps concatenated are what the padded batch describes
    alone = [regimes(gl.Model(cell).trace(x[:length, b : b + 1])) for b, length in enumerate(lengths)]
    carry = torch.cat([r.carry[:, 0] for r in alone])
    codes = torch.cat([r.codes[:, 0] for r in alone]).long()
    assert torch.equal(torch.cat([r.codes[:, 0] for r in alone]), result.codes.permute(1, 0, 2)[valid.T])
    assert relative_error(result.mean_carry, carry.mean(0)) <= 1e-12
    assert relative_error(result.mean_admit, torch.cat([r.admit[:, 0] for r in alone]).mean(0)) <= 1e-12
    assert relative_error(result.mean_gate, torch.cat([r.gate[:, 0] for r in alone]).mean(0)) <= 1e-12
    assert relative_error(result.timescale, 1 / (1 - carry.mean(0))) <= 1e-12
    counts = torch.stack([(codes == k).sum(0) for k in range(4)], dim=-1).to(F64) / sum(lengths)
    assert relative_error(result.census_by_unit, counts) <= 1e-15
    assert relative_error(result.census_by_unit.sum(1), torch.ones(H, dtype=F64)) <= 1e-15
    assert abs(result.census.sum().item() - 1) <= 1e-15


def test_stack_labels_and_per_layer_equality() -> None:
    layers = [_gru("after", "replace", seed=26, scale=1.5), _lstm(seed=27, scale=1.5, inputs=H)]
    trace = gl.Model(layers).trace(_randn(T, B, I, seed=32), lengths=[6, 4])
    stack = regimes(trace)
    per_layer = [regimes(trace, layer=0), regimes(trace, layer=1)]
    assert stack.recurrence == "stack"
    assert [r.recurrence for r in per_layer] == ["l0", "l1"]
    assert stack.unit_labels == [f"l0.h{j}" for j in range(H)] + [f"l1.c{j}" for j in range(H)]
    assert per_layer[0].unit_labels == [f"h{j}" for j in range(H)]
    for field in ("codes", "carry", "admit", "gate", "census_by_unit", "mean_carry", "timescale", "looks_blocked"):
        parts = [getattr(r, field) for r in per_layer]
        assert torch.equal(getattr(stack, field), torch.cat(parts, dim=-1 if field != "census_by_unit" else 0)), field
    assert relative_error(stack.census, (per_layer[0].census + per_layer[1].census) / 2) <= 1e-15
    assert stack.unit_kind == per_layer[0].unit_kind + per_layer[1].unit_kind
    assert bool((stack.codes[4:, 1] == PADDING).all())


def test_bidirectional_needs_a_layer_and_reverse_codes_follow_its_processing_order() -> None:
    forward = _gru("after", "keep", seed=33, scale=1.5)
    backward = _gru("after", "keep", seed=34, scale=1.5)
    x = _randn(T, B, I, seed=35)
    trace = gl.Model([(forward, backward)]).trace(x, lengths=[6, 3])
    with pytest.raises(ValueError, match="bidirectional"):
        regimes(trace)
    result = regimes(trace, layer=0, direction="reverse")
    assert result.recurrence == "l0_reverse"
    states, w = trace.states["l0_reverse"], backward.weights
    for b, length in enumerate([6, 3]):
        for i in range(length):  # reverse step i reads x at L_b − 1 − i
            a_z = w["W_iz"] @ x[length - 1 - i, b] + w["b_iz"] + w["W_hz"] @ states[i, b] + w["b_hz"]
            assert relative_error(result.carry[i, b], torch.sigmoid(a_z)) <= 1e-12
    assert bool((result.codes[3:, 1] == PADDING).all())
    assert bool((result.codes[:3, 1] >= 0).all())


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def gru_trace() -> gl.Trace:
    return gl.Model(_gru("after", "keep", seed=36)).trace(_randn(T, B, I, seed=37))


@pytest.mark.parametrize(
    "thresholds",
    [(0.0, 0.9), (0.1, 1.0), (-0.1, 0.5), (0.9, 0.1), (0.1, 0.5, 0.9), (0.1,), True, (True, 0.9), "0.1", "ab",
     0.5, 0.7, 0.0, -0.1, math.nan, (math.nan, 0.5), None, {"lo": 0.1}],
)  # fmt: skip
def test_bad_thresholds(gru_trace: gl.Trace, thresholds: object) -> None:
    with pytest.raises(ValueError, match=re.escape("thresholds must be (lo, hi) with 0 < lo ≤ hi < 1")):
        regimes(gru_trace, thresholds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"long_term": 2.0, "short_term": 5.0}, r"short_term \(5.0\) must not exceed long_term \(2.0\)"),
        ({"short_term": 0.5}, "short_term must be a number of steps ≥ 1, got 0.5"),
        ({"long_term": 0.9, "short_term": 0.5}, "must be a number of steps ≥ 1"),
        ({"long_term": math.inf}, "long_term must be a number of steps ≥ 1, got inf"),
        ({"long_term": math.nan}, "long_term must be a number of steps ≥ 1"),
        ({"long_term": True}, "long_term must be a number of steps ≥ 1, got True"),
        ({"short_term": "2"}, "short_term must be a number of steps ≥ 1"),
    ],
)
def test_bad_timescale_bounds(gru_trace: gl.Trace, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        regimes(gru_trace, **options)


def test_regimes_needs_a_trace(gru_trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match="regimes needs a Trace .* got Model"):
        regimes(gru_trace.model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got Tensor"):
        regimes(gru_trace.output)  # type: ignore[arg-type]


def test_regimes_bad_layer_and_direction(gru_trace: gl.Trace) -> None:
    with pytest.raises(ValueError, match="layer must be an int in 0..0, got 1"):
        regimes(gru_trace, layer=1)
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        regimes(gru_trace, direction="sideways")


# =============================================================================================================
# What-if
# =============================================================================================================


def _assert_same_trace(a: gl.Trace, b: gl.Trace) -> None:
    assert torch.equal(a.output, b.output)
    if isinstance(a.final_state, tuple):
        assert all(torch.equal(p, q) for p, q in zip(a.final_state, b.final_state))  # type: ignore[arg-type]
    else:
        assert torch.equal(a.final_state, b.final_state)  # type: ignore[arg-type]
    assert set(a.states) == set(b.states)
    for name in a.states:
        assert torch.equal(a.states[name], b.states[name]), name
        assert torch.equal(a.recurrences[name].jacobians(), b.recurrences[name].jacobians()), name


MODELS = {
    "gru": lambda: gl.Model(_gru("before", "replace", seed=40, scale=1.5)),
    "lstm": lambda: gl.Model(_lstm(seed=41, scale=1.5)),
    "elman": lambda: gl.Model(gl.Elman.random(I, H, seed=42, dtype=F64)),
    "gru-bi-2layer": lambda: gl.Model(
        [
            (_gru("after", "keep", seed=43, scale=1.5), _gru("before", "keep", seed=44, scale=1.5)),
            (_gru("after", "keep", seed=45, scale=1.5, inputs=2 * H), _gru("after", "replace", seed=46, inputs=2 * H)),
        ]
    ),
    "lstm-batch-first": lambda: gl.Model(_lstm(seed=47, scale=1.5), batch_first=True),
}


@pytest.mark.parametrize("layout", ["time-major", "unbatched"])
@pytest.mark.parametrize("name", list(MODELS))
def test_clamping_nothing_is_a_no_op(name: str, layout: str) -> None:
    model = MODELS[name]()
    x = _randn(T, B, I, seed=48)
    if model.batch_first:
        x = x.transpose(0, 1).contiguous()
    if layout == "unbatched":
        x = x[:, 0] if not model.batch_first else x[0]
        h0 = {rec: _randn(c.state_size, seed=49 + k, scale=0.5) for k, (rec, c) in enumerate(model.cells().items())}
        trace = model.trace(x, h0)
    else:
        h0 = {rec: _randn(B, c.state_size, seed=49 + k, scale=0.5) for k, (rec, c) in enumerate(model.cells().items())}
        trace = model.trace(x, h0, lengths=[T, 3])
    assert trace.recurrences["l0"].states[0].abs().max() > 0  # a nonzero initial state must be kept
    same = what_if(trace, {})
    assert same is not trace
    assert same.output.shape == trace.output.shape
    _assert_same_trace(same, trace)
    if name != "elman":
        gate = "z" if "gru" in name else "f"
        _assert_same_trace(what_if(trace, {gate: 0.5}, steps=[]), trace)  # an empty step selection is accepted
        changed = what_if(trace, {gate: 0.5})
        assert changed.output.shape == trace.output.shape
        assert not torch.allclose(changed.output, trace.output)


# ---------------------------------------------------------------------------------------------------------------
# The oracle: the cells' equations with a clamp, for one sequence element (vectors), written from the notation.

Clamp = dict[str, tuple[Tensor, Tensor]]  # gate ↦ (value (U,), where (U,) bool) at one step


def _gate(name: str, value: Tensor, clamp: Clamp) -> Tensor:
    if name not in clamp:
        return value
    constant, where = clamp[name]
    return torch.where(where, constant, value)


def oracle_gru_step(w: dict[str, Tensor], x: Tensor, h: Tensor, clamp: Clamp, *, cell: gl.GRU) -> Tensor:
    act = reference.activation
    r = _gate("r", act(cell.gate, w["W_ir"] @ x + w["b_ir"] + w["W_hr"] @ h + w["b_hr"]), clamp)
    z = _gate("z", act(cell.gate, w["W_iz"] @ x + w["b_iz"] + w["W_hz"] @ h + w["b_hz"]), clamp)
    if cell.reset == "after":
        n = act(cell.candidate, w["W_in"] @ x + w["b_in"] + r * (w["W_hn"] @ h + w["b_hn"]))
    else:
        n = act(cell.candidate, w["W_in"] @ x + w["b_in"] + w["W_hn"] @ (r * h) + w["b_hn"])
    return z * h + (1 - z) * n if cell.update == "keep" else (1 - z) * h + z * n


def oracle_lstm_step(w: dict[str, Tensor], x: Tensor, s: Tensor, clamp: Clamp, *, cell: gl.LSTM) -> Tensor:
    width = w["W_hi"].shape[1]
    h, c = s[:width], s[width:]

    def pre(g: str) -> Tensor:
        return w[f"W_i{g}"] @ x + w[f"b_i{g}"] + w[f"W_h{g}"] @ h + w[f"b_h{g}"]

    i = _gate("i", torch.sigmoid(pre("i")), clamp)
    f = _gate("f", torch.sigmoid(pre("f")), clamp)
    o = _gate("o", torch.sigmoid(pre("o")), clamp)
    c_new = f * c + i * torch.tanh(pre("g"))
    m = o * torch.tanh(c_new)
    return torch.cat([w["W_proj"] @ m if "W_proj" in w else m, c_new])


def oracle_run(cell: gl.Cell, x: Tensor, clamps: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """States (T+1, B, S) from h_0 = 0 and Jacobians ∂h_{i+1}/∂h_i (T, B, S, S) by jacrev, with the gates in
    ``clamps`` (gate ↦ (values (T, B, U), where (T, B, U))) fixed."""
    weights = {k: v.detach().clone() for k, v in cell.weights.items()}
    step = oracle_gru_step if isinstance(cell, gl.GRU) else oracle_lstm_step
    steps, batch = x.shape[:2]
    states = torch.zeros(steps + 1, batch, cell.state_size, dtype=F64)
    jacobians = torch.zeros(steps, batch, cell.state_size, cell.state_size, dtype=F64)
    for t in range(steps):
        for b in range(batch):
            clamp = {g: (v[t, b], where[t, b]) for g, (v, where) in clamps.items()}

            def f(s: Tensor, t: int = t, b: int = b, clamp: Clamp = clamp) -> Tensor:
                return step(weights, x[t, b], s, clamp, cell=cell)  # type: ignore[arg-type]

            states[t + 1, b] = f(states[t, b])
            jacobians[t, b] = torch.func.jacrev(f)(states[t, b])
    return states, jacobians


def _dense_clamps(spec: dict[str, Tensor], units: list[int], steps: list[int], shape: tuple[int, int, int]):
    """gate ↦ (values, where) over (T, B, U), filled element by element from a (steps, B, units) value per gate."""
    dense = {}
    for gate, value in spec.items():
        value = torch.broadcast_to(torch.as_tensor(value, dtype=F64), (len(steps), shape[1], len(units)))
        values, where = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=torch.bool)
        for a, t in enumerate(steps):
            for b in range(shape[1]):
                for c, j in enumerate(units):
                    values[t, b, j] = value[a, b, c]
                    where[t, b, j] = True
        dense[gate] = (values, where)
    return dense


CLAMP_CASES = {
    **{
        f"gru-{reset}-{update}": (
            lambda reset=reset, update=update: _gru(reset, update, seed=50, scale=1.5),
            lambda: {
                "z": torch.tensor([0.2, 0.9], dtype=F64),  # per unit
                "r": torch.arange(6, dtype=F64).reshape(3, B, 1).expand(3, B, 2) / 10 + torch.tensor([0.0, 0.35]),
            },
        )
        for reset, update in GRU_CONVENTIONS
    },
    "gru-hard-sigmoid": (
        lambda: _gru("before", "keep", "hard_sigmoid_keras3", seed=51, scale=2.0),
        lambda: {"z": 0.0, "r": torch.tensor([1.0, 0.3], dtype=F64)},
    ),
    "lstm": (
        lambda: _lstm(seed=52, scale=1.5),
        lambda: {"f": torch.tensor([0.95, 0.1], dtype=F64), "i": 0.5, "o": torch.rand(3, B, 2, dtype=F64)},
    ),
    "lstm-proj": (
        lambda: _lstm(seed=53, scale=1.5, projection=2),
        lambda: {"f": 1.0, "o": torch.tensor([0.0, 0.6], dtype=F64)},
    ),
}


@pytest.mark.parametrize("case", list(CLAMP_CASES))
def test_clamped_trace_is_the_exact_trace_of_the_modified_network(case: str) -> None:
    build, spec = CLAMP_CASES[case]
    cell = build()
    torch.manual_seed(0)
    values = spec()
    units, steps = [1, 3], [1, 3, 4]
    x = _randn(T, B, I, seed=59)
    trace = gl.Model(cell).trace(x)
    clamped = what_if(trace, values, units=units, steps=steps)
    states, jacobians = oracle_run(cell, x, _dense_clamps(values, units, steps, (T, B, H)))
    out = cell.output_size
    assert relative_error(clamped.output, states[1:, :, :out]) <= 1e-12
    assert relative_error(clamped.states["l0"], states) <= 1e-12
    assert relative_error(clamped.jacobians(), jacobians) <= 1e-10
    assert (clamped.output - trace.output).abs().max() > 1e-3  # the clamp changed the network
    assert torch.equal(clamped.output[:1], trace.output[:1])  # … but not before the first clamped step
    rec = clamped.recurrence()
    for gate, value in values.items():  # the gates the cell recorded are the constants, where clamped
        recorded = getattr(rec.cache, gate)[steps][:, :, units]
        assert torch.equal(recorded, torch.broadcast_to(torch.as_tensor(value, dtype=F64), recorded.shape)), gate


def test_finite_difference_of_a_clamped_step() -> None:
    """One entry of J at a clamped step against central differences of the forward pass with the same clamp
    (one step of Model.trace, clamps built by hand, h_0 = the state before that step)."""
    cell = _gru("after", "keep", seed=60, scale=1.5)
    x = _randn(T, B, I, seed=61)
    m, unit = 2, 1
    clamped = what_if(gl.Model(cell).trace(x), {"z": 0.3}, units=[unit], steps=[m])
    where = torch.zeros(1, B, H, dtype=torch.bool)
    where[..., unit] = True
    clamps = {"l0": {"z": (torch.full((1, B, H), 0.3, dtype=F64), where)}}
    h = clamped.states["l0"][m]
    eps, column = 1e-6, 2

    def forward(state: Tensor) -> Tensor:
        return gl.Model(cell).trace(x[m : m + 1], {"l0": state}, clamps=clamps).states["l0"][1]

    step = torch.zeros_like(h)
    step[:, column] = eps
    assert relative_error(forward(h), clamped.states["l0"][m + 1]) <= 1e-15
    numeric = (forward(h + step) - forward(h - step)) / (2 * eps)
    analytic = clamped.jacobians()[m, :, :, column]
    assert (numeric - analytic).abs().max() <= 1e-8
    assert analytic[:, unit].abs().min() > 1e-3  # the clamped unit's entry is not trivially 0
    # the clamped unit's z is a constant: no update path in its row, unlike the unclamped trace
    paths = clamped.jacobian_paths(steps=m)
    assert torch.equal(paths["update"][:, unit], torch.zeros(B, H, dtype=F64))
    assert paths["update"][:, 0].abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# The seed's blocking case, by clamping


MB = 3  # 0-based index of the blocking step
TB = 8
GATE_BLOCKS = ("W_iz", "W_hz", "b_iz", "b_hz", "W_ir", "W_hr", "b_ir", "b_hr", "W_hn")


def _blocking_setup(reset: str, update: str) -> tuple[gl.GRU, Tensor, Tensor]:
    """The seed-style model of tests/test_credit.py: input feature 0 is 0 except at step index MB, where its 50
    drives a_z to ∓50 (z ≈ 0 "keep", z ≈ 1 "replace": c ≈ 0) and a_r to −50 on every unit, and touches nothing
    else. Returns the cell, the input without the spike and the input with it."""
    cell = _gru(reset, update, seed=62, scale=1.0, inputs=I + 1)
    weights = dict(cell.weights)
    for block, value in (("W_iz", 1.0 if update == "replace" else -1.0), ("W_ir", -1.0), ("W_in", 0.0)):
        weights[block] = weights[block].clone()
        weights[block][:, 0] = value
    plain = torch.cat([torch.zeros(TB, B, 1, dtype=F64), _randn(TB, B, I, seed=63)], dim=-1)
    spiked = plain.clone()
    spiked[MB, :, 0] = 50.0
    return gl.GRU(weights, reset=reset, update=update), plain, spiked


@pytest.mark.parametrize(("reset", "update"), GRU_CONVENTIONS)
def test_clamping_z_and_r_at_one_step_blocks_credit_to_earlier_sources(reset: str, update: str) -> None:
    """Indexing: 0-based step index m = MB is step m+1, the step that reads x[m] and maps h_m to h_{m+1}, so
    steps=[m] clamps the gates of that step and jacobians()[m] = ∂h_{m+1}/∂h_m. Clamping c = 0 (z = 0 "keep",
    z = 1 "replace") and r = 0 on every unit makes that Jacobian exactly 0. by_source[k] is the credit of source
    step k+1 (θ's immediate effect on h_{k+1}); a loss at the last step reaches h_{k+1} only through
    ∂h_T/∂h_{k+1} = J_T ⋯ J_{k+2}, which contains jacobians()[m] whenever k+1 ≤ m: so by_source[k] = 0 for every
    k < m, exactly. The clamped step itself (k = m) still gets credit through its candidate (W_in, b_in), but the
    clamped gates' blocks get none (slope 0) and neither does W_hn (it only reads h_m, through r = 0)."""
    cell, plain, spiked = _blocking_setup(reset, update)
    closed = 1.0 if update == "replace" else 0.0
    trace = gl.Model(cell).trace(plain)
    assert trace.jacobians()[MB].abs().max() > 1e-2  # without the clamp the step is open
    clamped = what_if(trace, {"z": closed, "r": 0.0}, steps=[MB])
    jacobians = clamped.jacobians()
    assert torch.equal(jacobians[MB], torch.zeros(B, H, H, dtype=F64))
    assert jacobians[MB + 1].abs().max() > 1e-2 and jacobians[MB - 1].abs().max() > 1e-2
    assert torch.equal(clamped.states["l0"][: MB + 1], trace.states["l0"][: MB + 1])  # nothing changes before

    cm = gl.credit(clamped, loss="last", targets=torch.zeros(B, H, dtype=F64))
    for name, by_source in cm.by_source.items():
        assert torch.count_nonzero(by_source[:MB]) == 0, name
        assert cm.norms[name][-1, :MB].abs().max() == 0, name
    for block in GATE_BLOCKS:
        assert torch.count_nonzero(cm.by_source[f"l0.{block}"][MB]) == 0, block
    for block in ("W_in", "b_in"):
        assert cm.by_source[f"l0.{block}"][MB].abs().max() > 1e-4, block
    for block in ("W_iz", "W_hz", "W_in", "W_hn", "W_hr"):
        sources = cm.by_source[f"l0.{block}"][MB + 1 :].flatten(1).abs().amax(1)
        assert bool((sources > 1e-8).all()), block  # later sources still contribute
    assert relative_error(cm.total["l0.W_iz"], cm.by_source["l0.W_iz"][MB + 1 :].sum(0)) <= 1e-12

    # loss at every step: earlier loss steps still give the earlier sources credit; later loss steps do not
    targets = _randn(TB, B, H, seed=64)
    every = gl.credit(clamped, loss="all", targets=targets)
    for block in ("W_iz", "W_in", "b_iz"):
        norms = every.norms[f"l0.{block}"]
        assert torch.equal(norms[MB:, :MB], torch.zeros(TB - MB, MB, dtype=F64)), block
        assert norms[:MB, :MB].abs().max() > 1e-4, block
        assert every.by_source[f"l0.{block}"][:MB].abs().max() > 1e-4, block

    # the seed's saturated gates (a spike in the input) give the same result, to within σ(−45) ≈ 3e-20
    saturated = gl.Model(cell).trace(spiked)
    assert saturated.jacobians()[MB].abs().max() < 1e-15
    assert (saturated.states["l0"] - clamped.states["l0"]).abs().max() < 1e-15
    seed_cm = gl.credit(saturated, loss="last", targets=torch.zeros(B, H, dtype=F64))
    # the same clamp on the spiked input (W_in's column 0 reads the spike, so compare on the same input)
    clamped_spiked = what_if(saturated, {"z": closed, "r": 0.0}, steps=[MB])
    assert torch.equal(clamped_spiked.states["l0"], clamped.states["l0"])  # feature 0 feeds only z and r
    spiked_cm = gl.credit(clamped_spiked, loss="last", targets=torch.zeros(B, H, dtype=F64))
    for name, by_source in seed_cm.by_source.items():
        assert by_source[:MB].abs().max() <= 1e-12 * by_source.abs().max(), name
        assert torch.count_nonzero(spiked_cm.by_source[name][:MB]) == 0, name
        assert relative_error(by_source, spiked_cm.by_source[name]) <= 1e-10, name


# ---------------------------------------------------------------------------------------------------------------
# Selection: layers, directions, layouts


def test_clamping_only_layer_1_leaves_layer_0_unchanged() -> None:
    model = gl.Model([_gru("before", "keep", seed=65, scale=1.5), _gru("after", "keep", seed=66, scale=1.5, inputs=H)])
    trace = model.trace(_randn(T, B, I, seed=67))
    clamped = what_if(trace, {"z": 0.0, "r": 1.0}, layer=1, units=[0, 2])
    assert torch.equal(clamped.states["l0"], trace.states["l0"])
    assert (clamped.states["l1"] - trace.states["l1"]).abs().max() > 1e-3
    assert bool((regimes(clamped, layer=1).codes[..., [0, 2]] == ELMAN).all())
    stack = regimes(clamped)  # layer=None: the stack, its layer-1 units clamped
    assert stack.unit_labels[4:] == [f"l1.h{j}" for j in range(H)]
    assert bool((stack.codes[..., [4, 6]] == ELMAN).all())
    both = what_if(trace, {"z": 1.0})  # every layer: z = 1 ("keep") carries the state: J = I
    eye = torch.eye(2 * H, dtype=F64)
    assert torch.equal(both.jacobians(), eye.expand(T, B, 2 * H, 2 * H))
    assert torch.equal(both.states["l1"][-1], trace.states["l1"][0])


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_bidirectional_clamp_of_the_reverse_direction(padded: bool) -> None:
    model = MODELS["gru-bi-2layer"]()
    lengths = [T, 3] if padded else None
    trace = model.trace(_randn(T, B, I, seed=68), lengths=lengths)
    # (step index 1, not 0: with reset "before" and h_0 = 0 the reset gate of the first step has no effect)
    clamped = what_if(trace, {"r": 0.25}, layer=0, direction="reverse", steps=[1], units=[1])
    assert torch.equal(clamped.states["l0"], trace.states["l0"])  # the forward recurrence is untouched
    reverse, original = clamped.recurrence(0, "reverse"), trace.recurrence(0, "reverse")
    # steps count in the reverse direction's processing order: step index 1 reads x at L_b − 2
    assert torch.equal(reverse.cache.r[1, :, 1], torch.full((B,), 0.25, dtype=F64))
    assert torch.equal(reverse.cache.r[:2, :, [0, 2, 3]], original.cache.r[:2, :, [0, 2, 3]])
    assert torch.equal(reverse.cache.r[0], original.cache.r[0])
    assert bool((reverse.cache.r[2:, :, 1] != 0.25).all())
    assert (clamped.states["l0_reverse"] - trace.states["l0_reverse"]).abs().max() > 1e-4
    assert (clamped.states["l1"] - trace.states["l1"]).abs().max() > 1e-4  # layer 1 reads the changed outputs
    time = torch.tensor(lengths or [T, T]) - 2
    out = clamped.output[time, torch.arange(B), H:] - trace.output[time, torch.arange(B), H:]
    assert out.abs().min() > 0  # …and so does layer 1's reverse output at time L_b − 2
    every = what_if(trace, {"z": 0.75, "r": 0.0})  # direction=None, layer=None: every recurrence
    for name, rec in every.recurrences.items():
        assert torch.equal(rec.cache.z, torch.full((T, B, H), 0.75, dtype=F64)), name
        assert torch.equal(rec.cache.r, torch.zeros(T, B, H, dtype=F64)), name


@pytest.mark.parametrize("layout", ["batch-first", "unbatched"])
def test_layouts_round_trip(layout: str) -> None:
    x = _randn(T, B, I, seed=69)
    if layout == "batch-first":
        model = gl.Model(_gru("after", "keep", seed=70, scale=1.5), batch_first=True)
        inputs = x.transpose(0, 1).contiguous()
    else:
        model = gl.Model(_gru("after", "keep", seed=70, scale=1.5))
        inputs = x[:, 1]
    trace = model.trace(inputs)
    clamped = what_if(trace, {"z": 0.0, "r": 1.0}, steps=[2])
    assert clamped.output.shape == trace.output.shape
    assert clamped.inputs.shape == trace.inputs.shape
    time_major = clamped.output.transpose(0, 1) if layout == "batch-first" else clamped.output
    original = trace.output.transpose(0, 1) if layout == "batch-first" else trace.output
    assert torch.equal(time_major[:2], original[:2])  # steps before index 2 are unchanged
    assert (time_major[2] - original[2]).abs().min() > 0  # step index 2 is the clamped one
    reference_model = gl.Model(_gru("after", "keep", seed=70, scale=1.5))  # the same, time-major and batched
    expected = what_if(reference_model.trace(x), {"z": 0.0, "r": 1.0}, steps=[2]).output
    assert relative_error(time_major, expected if layout == "batch-first" else expected[:, 1]) <= 1e-13


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("model", "clamp", "message"),
    [
        ("elman", {"z": 0.0}, "clamp names gate(s) ['z'] that the Elman cell of l0 lacks; it has no gates"),
        ("lstm", {"z": 0.0}, "clamp names gate(s) ['z'] that the LSTM cell of l0 lacks; its gates are 'i', 'f', 'o'"),
        (
            "gru",
            {"f": 0.0, "z": 0.0},
            "clamp names gate(s) ['f'] that the GRU cell of l0 lacks; its gates are 'r', 'z'",
        ),
        ("gru", {"n": 0.0}, "lacks; its gates are 'r', 'z'"),
        ("lstm", {"g": 0.0}, "lacks; its gates are 'i', 'f', 'o'"),
    ],
)
def test_clamp_of_a_gate_the_cell_lacks(model: str, clamp: dict, message: str) -> None:
    trace = MODELS[model]().trace(_randn(T, B, I, seed=71))
    with pytest.raises(ValueError, match=re.escape(message)):
        what_if(trace, clamp)


def test_clamp_of_a_gate_one_layer_lacks() -> None:
    """A GRU under an LSTM: "z" on every layer is refused, naming the layer; on layer 0 alone it is fine."""
    trace = gl.Model([_gru("after", "keep", seed=74), _lstm(seed=75, inputs=H)]).trace(_randn(T, B, I, seed=76))
    with pytest.raises(ValueError, match=re.escape("that the LSTM cell of l1 lacks; its gates are 'i', 'f', 'o'")):
        what_if(trace, {"z": 0.0})
    clamped = what_if(trace, {"z": 0.0}, layer=0)
    assert torch.equal(clamped.recurrences["l0"].cache.z, torch.zeros(T, B, H, dtype=F64))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"units": [4]}, ValueError, r"units must lie in 0\.\.3 \(the units of l0\), got \[4\]"),
        ({"units": -1}, ValueError, r"units must lie in 0\.\.3 \(the units of l0\), got \[-1\]"),
        ({"units": [0.5]}, TypeError, r"units must be an int or a list of ints in 0\.\.3"),
        ({"units": 1.0}, TypeError, r"units must be an int or a list of ints"),
        ({"units": True}, TypeError, r"units must be an int or a list of ints"),
        ({"units": "0"}, TypeError, r"units must be an int or a list of ints"),
        ({"units": [[0, 1], [2]]}, TypeError, r"units must be an int or a list of ints"),
        ({"steps": T}, ValueError, rf"step index {T} is out of range"),
        ({"steps": [0, -T - 1]}, ValueError, rf"step indices must lie in {-T}\.\.{T - 1}"),
        ({"steps": [1.5]}, TypeError, "steps must be an int, a slice or a 1-D list of ints"),
        ({"steps": True}, TypeError, "steps must be an int, a slice or a list of ints"),
        ({"layer": 1}, ValueError, r"layer must be an int in 0\.\.0, got 1"),
        ({"direction": "reverse"}, ValueError, "reads sequences forward only"),
    ],
)
def test_bad_units_steps_and_layers(gru_trace: gl.Trace, options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        what_if(gru_trace, {"z": 0.0}, **options)


def test_an_empty_unit_list_clamps_nothing(gru_trace: gl.Trace) -> None:
    clamped = what_if(gru_trace, {"z": 0.0}, units=[])
    assert torch.equal(clamped.output, gru_trace.output)
    assert torch.equal(clamped.jacobians(), gru_trace.jacobians())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "must lie in"),
        (-0.1, "must lie in"),
        (math.nan, "must lie in"),
        (math.inf, "must lie in"),
        (torch.tensor([0.5, 1.0 + 1e-12, 0.5, 0.5], dtype=F64), "must lie in"),
        (torch.zeros(3, dtype=F64), "must be a number in .0, 1. or broadcast to .steps, batch, units. = .6, 2, 4."),
        (torch.zeros(T, B + 1, 1, dtype=F64), "must be a number in .0, 1. or broadcast to"),
        ("open", "must be a number in .0, 1. or broadcast to"),
        (None, "must be a number in .0, 1. or broadcast to"),
    ],
)
def test_bad_clamp_values(gru_trace: gl.Trace, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"clamp\['z'\] " + message):
        what_if(gru_trace, {"z": value})


def test_bad_clamp_container_and_trace(gru_trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match="clamp must be a dict of gate name ↦ value.*got list"):
        what_if(gru_trace, [("z", 0.0)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clamp must be a dict.*got float"):
        what_if(gru_trace, 0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="what_if needs a Trace .* got Model"):
        what_if(gru_trace.model, {"z": 0.0})  # type: ignore[arg-type]


def test_clamp_values_shaped_per_step_and_unit(gru_trace: gl.Trace) -> None:
    """A value of shape (steps chosen, 1, units chosen) reaches exactly those (step, unit) pairs, in order."""
    values = torch.tensor([[[0.1, 0.2]], [[0.3, 0.4]]], dtype=F64)  # (2 steps, 1, 2 units)
    clamped = what_if(gru_trace, {"r": values}, steps=[4, 1], units=[3, 0])
    r = clamped.recurrence().cache.r
    assert torch.equal(r[4][:, [3, 0]], torch.tensor([[0.1, 0.2]] * B, dtype=F64))
    assert torch.equal(r[1][:, [3, 0]], torch.tensor([[0.3, 0.4]] * B, dtype=F64))
    original = gru_trace.recurrence().cache.r
    assert torch.equal(r[0], original[0])  # before the first clamped step nothing changes
    assert torch.equal(r[1][:, [1, 2]], original[1][:, [1, 2]])  # nor the other units of that step
    assert bool((r[2:4] != original[2:4]).all())  # later steps read the changed state


def test_regimes_and_what_if_are_exported_at_the_top_level() -> None:
    """The documented API is gl.regimes and gl.what_if."""
    assert getattr(gl, "regimes", None) is regimes
    assert getattr(gl, "what_if", None) is what_if
    assert getattr(gl, "Regimes", None) is Regimes


def test_clamps_add_up_over_nested_what_ifs() -> None:
    model = gl.Model(gl.GRU.random(3, 4, seed=1, dtype=F64))
    trace = model.trace(torch.randn(6, 2, 3, dtype=F64))
    blocked = what_if(trace, {"z": 0.0, "r": 0.0}, steps=[2])
    assert torch.equal(what_if(blocked, {}).jacobians(), blocked.jacobians())
    both = what_if(blocked, {"z": 1.0}, steps=[4])
    assert both.jacobians()[2].abs().max() == 0
    assert torch.equal(both.jacobians()[4], torch.eye(4, dtype=F64).expand(2, 4, 4))
    overridden = what_if(blocked, {"z": 1.0}, steps=[2])  # the later clamp takes over on the same gate and step
    assert torch.equal(overridden.recurrences["l0"].cache.z[2], torch.ones(2, 4, dtype=F64))
    assert torch.equal(overridden.recurrences["l0"].cache.r[2], torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize(
    ("clamps", "message"),
    [
        ({"L0": {}}, r"clamps name recurrence\(s\) \['L0'\]; this model has \['l0'\]"),
        ({"l0": {"Z": None}}, r"names gate\(s\) \['Z'\]"),
        ({"l0": {"z": (torch.zeros(3), torch.ones(6, 2, 4, dtype=torch.bool))}}, r"must be a pair \(values, where\)"),
        ({"l0": {"z": (0.0, torch.ones(6, 2, 4, dtype=torch.bool))}}, r"must be a pair \(values, where\)"),
        ({"l0": {"z": torch.zeros(6, 2, 4)}}, r"must be a pair \(values, where\)"),
    ],
)
def test_model_trace_checks_its_clamps(clamps: dict, message: str) -> None:
    model = gl.Model(gl.GRU.random(3, 4, seed=1, dtype=F64))
    with pytest.raises(ValueError, match=message):
        model.trace(torch.randn(6, 2, 3, dtype=F64), clamps=clamps)


def test_a_trace_records_values_not_a_graph() -> None:
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    trace = gl.Model(gl.GRU.random(3, 4, seed=1, dtype=F64)).trace(x)
    assert not trace.output.requires_grad and not trace.recurrences["l0"].cache.z.requires_grad
    assert not gl.local_gradients(trace).total.requires_grad


def test_regimes_to_dict_per_step() -> None:
    trace = gl.Model(gl.GRU.random(3, 4, seed=1, dtype=F64)).trace(torch.randn(5, 2, 3, dtype=F64), lengths=[5, 3])
    result = gl.regimes(trace, long_term=np.int64(10), short_term=np.float32(2.0))
    data = json.loads(json.dumps(result.to_dict(per_step=True), allow_nan=False))
    assert torch.equal(torch.tensor(data["codes"], dtype=torch.int8), result.codes)
    assert torch.equal(torch.tensor(data["carry"], dtype=F64), result.carry)
    assert "codes" not in result.to_dict()
