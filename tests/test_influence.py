"""Input influence against autograd through the cells' forward steps, and the carry-only timescale identity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import jacrev

import gatelens as gl
from tests.cell_configs import chaotic_elman

F64 = torch.float64


def _oracle(cell: gl.Cell, x: torch.Tensor, lengths: list[int], anchors: list[int], max_lag: int) -> torch.Tensor:
    """Mean ‖∂h_t[j]/∂x_{t−ℓ}‖ over anchors and sequences, by autograd through the unrolled forward."""

    def states(inputs: torch.Tensor) -> torch.Tensor:
        h, out = torch.zeros(cell.state_size, dtype=F64), []
        for t in range(inputs.shape[0]):
            h, _ = cell.step(inputs[t], h)
            out.append(h)
        return torch.stack(out)

    sums, counts = torch.zeros(max_lag + 1, cell.state_size, dtype=F64), torch.zeros(max_lag + 1, dtype=F64)
    for b, length in enumerate(lengths):
        jacobian = jacrev(states)(x[:length, b])  # (L, S, L, I)
        for anchor in anchors:
            for lag in range(max_lag + 1):
                if anchor < length and anchor - lag >= 0:
                    sums[lag] += jacobian[anchor, :, anchor - lag].norm(dim=-1)
                    counts[lag] += 1
    return sums / counts.clamp_min(1)[:, None]


@pytest.mark.parametrize(
    "cell",
    [
        gl.GRU.random(3, 4, reset="before", update="replace", seed=2, dtype=F64),
        gl.LSTM.random(3, 3, projection=2, seed=3, dtype=F64),
        gl.Elman.random(3, 4, seed=4, dtype=F64),
    ],
    ids=["gru", "lstm-proj", "elman"],
)
def test_profile_equals_autograd(cell: gl.Cell) -> None:
    x = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    trace = gl.Model(cell).trace(x, lengths=[12, 9])
    result = gl.input_influence(trace, anchors=[8, 10, 11], max_lag=6)
    expected = _oracle(cell, x, [12, 9], [8, 10, 11], 6)
    assert torch.allclose(result.profile, expected, rtol=1e-10, atol=1e-14)
    assert result.counts.tolist() == [4.0] * 7  # anchors 8, 10, 11 in sequence 0; only 8 in sequence 1
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_carry_only_unit_has_the_gate_timescale_minus_one() -> None:
    """W_hz = W_hn = W_hr = W_iz = 0, a constant z = c on every unit and a constant input (so the input Jacobian is
    the same at every step): I(ℓ) ∝ c^ℓ, so τ = c/(1 − c) = τ_gate − 1."""
    tau = 8.0
    cell = gl.GRU.random(2, 3, seed=5, dtype=F64)
    weights = dict(cell.weights)
    for name in ("W_hz", "W_hn", "W_hr", "W_iz"):
        weights[name] = torch.zeros_like(weights[name])
    weights["b_iz"] = torch.full((3,), math.log(tau - 1), dtype=F64)  # σ(b) = 1 − 1/τ
    weights["b_hz"] = torch.zeros(3, dtype=F64)
    trace = gl.Model(gl.GRU(weights)).trace(torch.randn(1, 2, 2, dtype=F64).expand(400, 2, 2))
    influence = gl.input_influence(trace, anchors=[399], max_lag=399)
    gate = gl.regimes(trace).timescale
    assert torch.allclose(influence.timescale, gate - 1, rtol=1e-9)


def test_bad_input() -> None:
    trace = gl.Model(gl.GRU.random(3, 4, dtype=F64)).trace(torch.randn(5, 1, 3, dtype=F64))
    with pytest.raises(TypeError, match="needs a Trace"):
        gl.input_influence(trace.model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchors must lie in 0..4"):
        gl.input_influence(trace, anchors=[5])
    with pytest.raises(ValueError, match="max_lag must be a positive int"):
        gl.input_influence(trace, max_lag=0)


def test_a_chaotic_float32_network_has_a_finite_exact_log_profile() -> None:
    """Regression: the profile multiplied raw Jacobian products, so a chaotic float32 Elman (H = 64,
    W_hh ~ N(0, 16/H), T = 400) gave inf/NaN wherever ‖∂h_t/∂x_{t−ℓ}‖ left float32's range (about e^{±88}) while
    propagation of the same trace stayed finite. Oracle: raw products in float64 (whose range holds e^{160}) of the
    per-step Jacobians written from the formula."""
    weights, x = chaotic_elman()
    steps, hidden = x.shape[0], weights["W_hh"].shape[0]
    cell = gl.Elman(weights)
    narrow = gl.Model(cell.to(torch.float32)).trace(x.float())
    wide = gl.Model(cell).trace(x)

    def oracle(states: torch.Tensor) -> torch.Tensor:
        """The mean profile from anchor T − 1 at the recorded states (a chaotic float32 trajectory parts from the
        float64 one, so each trace is checked at its own states): h' = tanh(W_ih x + W_hh h) has
        ∂h'/∂h = diag(1 − h'²) W_hh and ∂h'/∂x = diag(1 − h'²) W_ih."""
        expected = torch.zeros(steps, hidden, dtype=F64)
        for b in range(2):
            h = states[:, b].double()
            slope = 1 - torch.tanh(x[:, b] @ weights["W_ih"].T + h[:-1] @ weights["W_hh"].T).square()  # (T, H)
            product = torch.eye(hidden, dtype=F64)
            for lag in range(steps):
                t = steps - 1 - lag
                expected[lag] += (product @ (slope[t, :, None] * weights["W_ih"])).norm(dim=-1) / 2
                product = product @ (slope[t, :, None] * weights["W_hh"])
        return expected

    expected = oracle(narrow.states["l0"])
    assert float(expected.max()) > math.exp(100)  # beyond float32: e^{88.7} is its largest number
    result = gl.input_influence(narrow)
    assert result.log_profile.dtype == torch.float32 and bool(torch.isfinite(result.log_profile).all())
    error = (result.log_profile.double() - expected.log()).abs()  # float32 rounding over 400 products: a row far
    assert float(error.median()) <= 1e-4 and float(error.max()) <= 0.05  # below the product's norm keeps less
    assert bool(torch.isfinite(result.profile).all()) and result.profile.dtype == F64
    expected = oracle(wide.states["l0"])
    exact = gl.input_influence(wide)
    assert torch.allclose(exact.profile, expected, rtol=1e-8, atol=0)
    lags = torch.arange(steps, dtype=F64)[:, None]
    assert torch.allclose(exact.timescale, (lags * expected).sum(0) / expected.sum(0), rtol=1e-8)
    json.dumps(result.to_dict(), allow_nan=False)
