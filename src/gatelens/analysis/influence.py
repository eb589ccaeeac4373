"""Input influence: how long an input keeps acting on each state unit, measured through the Jacobians.

For an anchor step t and a lag ℓ ≥ 0 the influence of the input x_{t−ℓ} on state unit j is the row norm

    I_j(t, ℓ) = ‖∂h_t[j] / ∂x_{t−ℓ}‖₂ = ‖(J_t J_{t−1} ⋯ J_{t−ℓ+1})[j, :] · ∂h_{t−ℓ}/∂x_{t−ℓ}‖₂

and ``profile[ℓ, j]`` is its mean over the anchors and sequences for which step t − ℓ lies inside the sequence.
A unit's *influence timescale* is the mean lag of its profile,

    τ_j = Σ_ℓ ℓ · I_j(ℓ) / Σ_ℓ I_j(ℓ)

For a unit that only carries its value with a constant keep c (I(ℓ) ∝ c^ℓ) this is c / (1 − c) = τ_gate − 1 with
τ_gate = 1 / (1 − c) from :func:`gatelens.regimes`, up to the truncation at ``max_lag``. All anchors share one
backward sweep, as in :func:`gatelens.propagation`; Jacobians are fetched a chunk of steps at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gatelens.analysis.norms import frobenius
from gatelens.analysis.propagation import CHUNK_ELEMENTS, anchor_steps, lag_limit
from gatelens.analysis.serialize import json_list
from gatelens.trace import Trace


@dataclass(frozen=True, eq=False)
class InputInfluence:
    """Mean ‖∂h_t[j]/∂x_{t−ℓ}‖ by lag ℓ (rows) and state unit j (columns); build with :func:`input_influence`."""

    recurrence: str
    state_labels: list[str]
    profile: Tensor  # (max_lag + 1, S)
    counts: Tensor  # (max_lag + 1,): (anchor, sequence) pairs averaged at each lag

    @property
    def timescale(self) -> Tensor:
        """τ_j = Σ_ℓ ℓ I_j(ℓ) / Σ_ℓ I_j(ℓ) per state unit (S,); NaN for a unit no input reaches."""
        lags = torch.arange(self.profile.shape[0], dtype=self.profile.dtype, device=self.profile.device)
        return (lags[:, None] * self.profile).sum(0) / self.profile.sum(0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recurrence": self.recurrence,
            "state_labels": self.state_labels,
            "profile": json_list(self.profile),
            "timescale": json_list(self.timescale),
        }


def input_influence(
    trace: Trace,
    anchors: int | Sequence[int] | Tensor | None = None,
    *,
    max_lag: int | None = None,
    layer: int | None = None,
    direction: str | None = None,
) -> InputInfluence:
    """The input-influence profile of every state unit (module docstring).

    anchors: 0-based step indices (default: the last step); max_lag: the longest lag (default: all). layer and
    direction choose the recurrence as in :meth:`Trace.recurrence`.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"input_influence needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    rec = trace.recurrence(layer, direction)
    steps, batch = rec.input_index.shape
    points = anchor_steps(anchors, steps)
    limit = steps - 1 if max_lag is None else min(lag_limit(max_lag, steps), steps - 1)
    size, dtype, device = rec.cell.state_size, rec.states.dtype, rec.states.device
    valid = torch.ones(steps, batch, dtype=torch.bool, device=device) if rec.mask is None else rec.mask
    sums = torch.zeros(limit + 1, size, dtype=dtype, device=device)
    counts = torch.zeros(limit + 1, dtype=dtype, device=device)
    products = torch.eye(size, dtype=dtype, device=device).repeat(len(points), batch, 1, 1)  # ∂h_t/∂h_s per anchor
    points_on = points.to(device)
    chunk = max(1, CHUNK_ELEMENTS // (batch * size * max(size, rec.cell.input_size)))
    lowest = max(0, int(points[0]) - limit)
    first = len(points)  # products[first:] belong to anchors already reached
    for stop in range(int(points[-1]) + 1, lowest, -chunk):
        start = max(lowest, stop - chunk)
        jacobians = rec.jacobians(steps=slice(start, stop))
        inputs = rec.input_jacobians(steps=slice(start, stop))
        for step in reversed(range(start, stop)):
            while first and int(points[first - 1]) >= step:
                first -= 1
            lags = points_on[first:] - step
            live = lags <= limit
            both = valid[step][None, :] & valid[points_on[first:]] & live[:, None]  # (A, B): t − ℓ and t inside
            rows = frobenius(products[first:] @ inputs[step - start], dims=1)  # (A, B, S)
            weighted = torch.where(both[..., None], rows, 0.0).sum(1)
            sums.index_add_(0, lags.clamp_max(limit), torch.where(live[:, None], weighted, 0.0))
            counts.index_add_(0, lags.clamp_max(limit), both.sum(1).to(dtype))
            products[first:] = products[first:] @ jacobians[step - start]
    profile = sums / counts.clamp_min(1)[:, None]
    return InputInfluence(recurrence=rec.name, state_labels=rec.cell.state_labels(), profile=profile, counts=counts)
