"""Products of Jacobians over lags, kept as (normalised matrix, log-scale) so they never underflow or overflow.

For anchors a (0-based steps, t = a + 1) a backward sweep over the steps i = a, a − 1, … builds, per sequence,

    P_a(i) = J_a J_{a−1} ⋯ J_{i+1} = ∂h_{a+1}/∂h_{i+1}      (P_a(a) = I; J_i = jacobians[i] = ∂h_{i+1}/∂h_i)

as P = exp(s) · M with ‖M‖_F = 1:

    M ← M J_i / ‖M J_i‖_F,      s ← s + log ‖M J_i‖_F.

Every analysis that forms products over lags (propagation, input influence) walks them with :class:`LagProducts`,
so none of them multiplies raw products: a chaotic network whose ‖∂h_t/∂h_{t−ℓ}‖ reaches e^{160} (beyond float32)
or a contracting one at e^{−160} is carried exactly to the dtype's relative precision. An exactly zero product
has s = −inf (and M = 0). All anchors share the sweep: at step i the rows of every anchor a ≥ i take one more
Jacobian together, as covectors of the step's VJP (:meth:`Recurrence.product_vjp`): M J_i is never formed from
J_i, whose cell forms only the blocks that many covectors make worth forming (a GRU's J, an LSTM's cell-gate rows)
and exploits the rest of its structure (an LSTM's diagonal cell-state columns, a stack's layer order). Input
Jacobians, where asked for, are formed ``CHUNK_ELEMENTS`` at a time, never all T at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.norms import frobenius, spectral_norm, starting_basis
from gatelens.trace import Recurrence

CHUNK_ELEMENTS = 1 << 24  # elements of Jacobians fetched at once (64 MiB in float32)


@dataclass(frozen=True)
class SweepStep:
    """One step i of the sweep: the anchors reached (``first`` onwards) with their lags a − i, and the input
    Jacobian where asked for."""

    index: int  # i, 0-based
    first: int  # the anchors reached so far are anchors[first:]
    lags: Tensor  # (A − first,) a − i for each anchor reached
    input_jacobian: Tensor | None  # (B, S, I) ∂h_{i+1}/∂x_{i+1}, when asked for


class LagProducts:
    """P_a(i) for every anchor a, as ``matrix`` (A, B, S, S) with unit Frobenius norm and ``log_scale`` (A, B).

    Iterate to walk i from the last anchor down to ``lowest``; at each :class:`SweepStep` the products hold
    P_a(i) = ∂h_{a+1}/∂h_{i+1} for the anchors reached, and :meth:`advance` turns them into P_a(i − 1) by one
    more Jacobian.
    """

    def __init__(self, rec: Recurrence, anchors: Tensor, lowest: int, *, input_jacobians: bool = False) -> None:
        batch, size = rec.states.shape[1:]
        dtype, device = rec.states.dtype, rec.states.device
        self.rec, self.anchors, self.lowest, self.input_jacobians = rec, anchors, lowest, input_jacobians
        self.matrix = torch.eye(size, dtype=dtype, device=device).repeat(len(anchors), batch, 1, 1) / math.sqrt(size)
        self.log_scale = torch.full((len(anchors), batch), 0.5 * math.log(size), dtype=dtype, device=device)
        self.chunk = max(1, CHUNK_ELEMENTS // (batch * size * rec.cell.input_size)) if input_jacobians else rec.steps
        self.basis = starting_basis(size, dtype, device).repeat(len(anchors), batch, 1, 1)

    def __iter__(self) -> Iterator[SweepStep]:
        anchors, anchors_on = self.anchors, self.anchors.to(self.matrix.device)
        first = len(anchors)
        for stop in range(int(anchors[-1]) + 1, self.lowest, -self.chunk):
            start = max(self.lowest, stop - self.chunk)
            inputs = self.rec.input_jacobians(steps=slice(start, stop)) if self.input_jacobians else None
            for step in reversed(range(start, stop)):
                while first and int(anchors[first - 1]) >= step:
                    first -= 1
                yield SweepStep(
                    index=step,
                    first=first,
                    lags=anchors_on[first:] - step,
                    input_jacobian=None if inputs is None else inputs[step - start],
                )

    def advance(self, step: SweepStep) -> None:
        """P_a(i − 1) = P_a(i) J_i for the anchors reached, renormalised (module docstring): the rows of every P_a(i)
        as covectors (rows, B, S) of the VJP of step i."""
        reached, batch, size = self.matrix[step.first :].shape[:3]
        rows = self.matrix[step.first :].transpose(1, 2).reshape(reached * size, batch, size)
        product = self.rec.product_vjp(rows, steps=step.index).view(reached, size, batch, size).transpose(1, 2)
        norm = frobenius(product, dims=2)
        safe = torch.where(norm > 0, norm, 1.0)
        self.matrix[step.first :] = product / safe[..., None, None]
        self.log_scale[step.first :] += norm.log()

    def log_row_norms(self, step: SweepStep, right: Tensor) -> Tensor:
        """log ‖(P_a(i) · right)[j, :]‖ per anchor reached, sequence and row j: (A − first, B, S); right (B, S, C)."""
        rows = frobenius(self.matrix[step.first :] @ right, dims=1)
        return rows.log() + self.log_scale[step.first :, :, None]

    def log_spectral_norm(self, step: SweepStep, reached: Tensor) -> Tensor:
        """log σ₁(P_a(i)) for the anchors reached where ``reached`` holds: (reached, B), by subspace iteration
        (:func:`~gatelens.analysis.norms.spectral_norm`) from the basis of the previous lag: P_a(i − 1) = P_a(i) J_i
        keeps the left singular vectors of a product that is close to rank one, so a few iterations suffice."""
        current = slice(step.first, None)
        estimate, basis = spectral_norm(self.matrix[current][reached], self.basis[current][reached])
        kept = self.basis[current]
        kept[reached] = basis
        self.basis[current] = kept
        return estimate.log() + self.log_scale[current][reached]

    def log_singular_values(self, step: SweepStep, reached: Tensor) -> Tensor:
        """log σ_j(P_a(i)) for the anchors reached where ``reached`` (A − first,) holds, descending in j."""
        current = slice(step.first, None)
        return torch.linalg.svdvals(self.matrix[current][reached]).log() + self.log_scale[current][reached][..., None]


def anchor_steps(anchors: Any, steps: int) -> Tensor:
    """Anchors as a sorted, de-duplicated (A,) long tensor of step indices in 0..T−1 (default: the last step)."""
    if anchors is None:
        return torch.tensor([steps - 1])
    expected = f"anchors must be an int or a non-empty list of ints (0-based step indices), got {anchors!r:.80}"
    if isinstance(anchors, (bool, np.bool_, str, bytes)):
        raise TypeError(expected)
    try:
        values = torch.as_tensor(anchors)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(expected) from None
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex() or values.numel() == 0:
        raise TypeError(expected)
    if values.dim() > 1:
        raise ValueError(f"anchors must be one int or a 1-D list of ints, got shape {tuple(values.shape)}")
    values = values.reshape(-1).long().cpu()
    if int(values.min()) < 0 or int(values.max()) >= steps:
        raise ValueError(f"anchors must lie in 0..{steps - 1} (0-based step indices), got {values.tolist()}")
    return torch.unique(values)


def lag_limit(max_lag: Any, steps: int) -> int:
    """``max_lag`` checked (a positive int) and capped at the number of steps."""
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or max_lag < 1:
        raise ValueError(f"max_lag must be a positive int, got {max_lag!r}")
    return min(int(max_lag), steps)
