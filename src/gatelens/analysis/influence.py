"""Input influence: how long an input keeps acting on each state unit, measured through the Jacobians.

For an anchor step t and a lag ℓ ≥ 0 the influence of the input x_{t−ℓ} on state unit j is the row norm

    I_j(t, ℓ) = ‖∂h_t[j] / ∂x_{t−ℓ}‖₂ = ‖(J_t J_{t−1} ⋯ J_{t−ℓ+1})[j, :] · ∂h_{t−ℓ}/∂x_{t−ℓ}‖₂

and ``profile[ℓ, j]`` is its mean over the anchors and sequences for which both the anchor t and step t − ℓ
lie inside the sequence.
A unit's *influence timescale* is the mean lag of its profile,

    τ_j = Σ_ℓ ℓ · I_j(ℓ) / Σ_ℓ I_j(ℓ)

For a unit that only carries its value with a constant keep c (I(ℓ) ∝ c^ℓ) this is c / (1 − c) = τ_gate − 1 with
τ_gate = 1 / (1 − c) from :func:`gatelens.regimes`, up to the truncation at ``max_lag``. All anchors share one
backward sweep, as in :func:`gatelens.propagation`; Jacobians are fetched a chunk of steps at a time.

The products are kept as (normalised matrix, log-scale) (:mod:`gatelens.analysis.products`) and the profile is
accumulated as logarithms, log I_j(ℓ) = logsumexp over (anchor, sequence) pairs − log(count), so a chaotic network
whose influence grows like e^{160} over the lags (beyond float32's range) or a contracting one that falls below
it still has an exact profile: ``log_profile`` holds it in every case, ``profile`` = exp(log_profile) in float64,
and τ_j is a softmax-weighted mean of the lags, finite whenever some input reaches the unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gatelens.analysis.products import LagProducts, anchor_steps, lag_limit
from gatelens.analysis.serialize import json_list
from gatelens.trace import Trace


@dataclass(frozen=True, eq=False)
class InputInfluence:
    """Mean ‖∂h_t[j]/∂x_{t−ℓ}‖ by lag ℓ (rows) and state unit j (columns); build with :func:`input_influence`."""

    recurrence: str
    state_labels: list[str]
    log_profile: Tensor  # (max_lag + 1, S): log of the mean influence; −inf where nothing reaches (or no pair)
    counts: Tensor  # (max_lag + 1,): (anchor, sequence) pairs averaged at each lag

    @property
    def profile(self) -> Tensor:
        """Mean ‖∂h_t[j]/∂x_{t−ℓ}‖, (max_lag + 1, S), in float64 (whose range holds influences that the trace's
        float32 cannot); inf only where the influence exceeds even float64 — ``log_profile`` is exact then."""
        return self.log_profile.double().exp()

    @property
    def timescale(self) -> Tensor:
        """τ_j = Σ_ℓ ℓ I_j(ℓ) / Σ_ℓ I_j(ℓ) per state unit (S,), from the log profile (a softmax over lags, so it
        never overflows); NaN for a unit no input reaches."""
        lags = torch.arange(self.log_profile.shape[0], dtype=self.log_profile.dtype, device=self.log_profile.device)
        return (lags[:, None] * torch.softmax(self.log_profile, dim=0)).sum(0)

    def to_dict(self) -> dict[str, Any]:
        """The log profile, the profile and the timescales, ready for JSON (None where not finite)."""
        return {
            "recurrence": self.recurrence,
            "state_labels": self.state_labels,
            "log_profile": json_list(self.log_profile),
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
    log_sums = torch.full((limit + 1, size), -math.inf, dtype=dtype, device=device)
    counts = torch.zeros(limit + 1, dtype=dtype, device=device)
    anchors_on = points.to(device)
    products = LagProducts(rec, points, lowest=max(0, int(points[0]) - limit), input_jacobians=True)
    for step in products:
        live = step.lags <= limit  # the anchors of one step have distinct lags, so the index updates do not collide
        both = valid[step.index][None, :] & valid[anchors_on[step.first :]] & live[:, None]  # (A, B): t − ℓ, t inside
        log_rows = products.log_row_norms(step, step.input_jacobian)  # (A, B, S)
        pooled = torch.logsumexp(torch.where(both[..., None], log_rows, -math.inf), dim=1)  # (A, S)
        lags = step.lags[live]
        log_sums[lags] = torch.logaddexp(log_sums[lags], pooled[live])
        counts.index_add_(0, lags, both[live].sum(1).to(dtype))
        products.advance(step)
    log_profile = log_sums - counts.clamp_min(1).log()[:, None]
    return InputInfluence(
        recurrence=rec.name, state_labels=rec.cell.state_labels(), log_profile=log_profile, counts=counts
    )
