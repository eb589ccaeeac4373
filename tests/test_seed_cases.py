"""The three gate cases of the seed question, with saturated gate biases, through a whole trace.

Reset-before / update-keep GRU (the seed's convention):
    z → 1            J → I
    z → 0, r → 0     J → 0
    z → 0, r → 1     J → diag(1 − n²) W_hn
and the reset placement matters for a single blocked unit j (z_j ≈ r_j ≈ 0): with reset-after its row vanishes;
with reset-before it vanishes only when r ≈ 0 on every unit that W_hn feeds into j.
"""

from __future__ import annotations

import pytest
import torch

import gatelens as gl

H, I, T, B = 6, 3, 5, 2
SATURATE = 40.0  # σ(±40) is 1 or 0 to within 4e-18


def _gru(reset: str, z_bias: torch.Tensor | float, r_bias: torch.Tensor | float) -> gl.GRU:
    cell = gl.GRU.random(I, H, reset=reset, update="keep", dtype=torch.float64, seed=11)
    weights = dict(cell.weights)
    weights["b_iz"] = torch.zeros(H, dtype=torch.float64) + z_bias
    weights["b_ir"] = torch.zeros(H, dtype=torch.float64) + r_bias
    return gl.GRU(weights, reset=reset, update="keep")


def _trace(cell: gl.GRU) -> gl.Trace:
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return gl.load(cell).trace(x)


def test_open_update_gate_carries_the_state() -> None:
    jacobians = _trace(_gru("before", SATURATE, 0.0)).jacobians()
    assert torch.allclose(jacobians, torch.eye(H, dtype=torch.float64).expand_as(jacobians), atol=1e-12)


def test_closed_update_and_reset_gates_block_the_gradient() -> None:
    jacobians = _trace(_gru("before", -SATURATE, -SATURATE)).jacobians()
    assert jacobians.abs().max() < 1e-12


def test_closed_update_open_reset_is_an_elman_step() -> None:
    cell = _gru("before", -SATURATE, SATURATE)
    trace = _trace(cell)
    n = trace.recurrence().cache.n
    expected = (1 - n**2).unsqueeze(-1) * cell.weights["W_hn"]
    assert torch.allclose(trace.jacobians(), expected, atol=1e-12)
    assert expected.abs().max() > 0.05  # the case is not trivially zero


@pytest.mark.parametrize("reset", ["after", "before"])
def test_one_blocked_unit(reset: str) -> None:
    """Unit 0 has z ≈ r ≈ 0; the others have ordinary gates."""
    blocked = torch.zeros(H, dtype=torch.float64)
    blocked[0] = -SATURATE
    jacobians = _trace(_gru(reset, blocked, blocked)).jacobians()
    row = jacobians[..., 0, :].abs().max().item()
    others = jacobians[..., 1:, :].abs().max().item()
    assert others > 0.05
    if reset == "after":
        assert row < 1e-12
    else:  # the candidate still reads the other units' (unreset) state through W_hn
        assert row > 1e-3


def test_reset_before_row_vanishes_when_every_reset_gate_is_closed() -> None:
    z_bias = torch.zeros(H, dtype=torch.float64)
    z_bias[0] = -SATURATE
    jacobians = _trace(_gru("before", z_bias, -SATURATE)).jacobians()
    assert jacobians[..., 0, :].abs().max() < 1e-12
    assert jacobians[..., 1:, :].abs().max() > 0.05
