"""Input influence against autograd through the cells' forward steps, and the carry-only timescale identity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import jacrev

import gatelens as gl

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
