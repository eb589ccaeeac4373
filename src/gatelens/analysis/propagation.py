"""Propagation: how ∂h_t/∂h_{t−ℓ} = J_t J_{t−1} ⋯ J_{t−ℓ+1} grows or decays with the lag ℓ.

For each anchor index a (0-based, so t = a + 1) and every lag ℓ = 0..t, the singular values of the product
Π_ℓ = ∂h_t/∂h_{t−ℓ} (Π_0 = I) are computed per sequence. The product is carried as a normalised matrix and an
accumulated log-scale, Π_ℓ = exp(s_ℓ) · M_ℓ with ‖M_ℓ‖_F = 1 (:mod:`gatelens.analysis.products`), so it neither
underflows nor overflows at any lag:

    M_{ℓ+1} = M_ℓ J_{t−ℓ} / ‖M_ℓ J_{t−ℓ}‖_F,      s_{ℓ+1} = s_ℓ + log ‖M_ℓ J_{t−ℓ}‖_F,
    log σ_j(Π_ℓ) = s_ℓ + log σ_j(M_ℓ).

The normalised product is accurate to the dtype's precision relative to its largest singular value, so a
σ_j below about σ_1 · eps (eps ≈ 1e-7 in float32, 2e-16 in float64) is not resolved: it shows at that noise floor
rather than at its true value (at long lags, products tend to rank one). An exactly zero product (e.g. a ReLU
network whose units are all off) has log-norm −inf.

With ``lengths=``, the steps past a sequence's end are identities, so an anchor past the end of a shorter
sequence sees those lags as ∂h_t/∂h_{t−ℓ} = I; anchor at ``length − 1`` to start at a sequence's own last step.

Cost. Each lag takes one product (B, S, S) @ (B, S, S) per anchor, plus the singular values: a full SVD per anchor
and sequence (``singular_values="all"``, O(S³) each, which dominates for S in the hundreds), or the largest alone
by a warm-started power iteration (``"largest"``, a few O(S²) products; see :meth:`LagProducts.log_spectral_norm`
for its tolerance). log‖·‖_F is exact either way: it is the accumulated log-scale s_ℓ. ``stop_below=eps`` ends the
sweep at the first lag at which every product of every sequence has ‖·‖_F < eps, hence ‖·‖₂ < eps: every horizon
at that eps is then known, and later lags are not computed (NaN). Memory: O(A·B·S²) for the products and
O(A·T·B·k) for the results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.norms import flushes_subnormals
from gatelens.analysis.products import LagProducts, anchor_steps, lag_limit
from gatelens.analysis.serialize import json_list
from gatelens.progress import tick
from gatelens.trace import Trace

SINGULAR_VALUES = ("all", "largest")


@dataclass(frozen=True, eq=False)
class Propagation:
    """Singular values of ∂h_t/∂h_{t−ℓ} for every anchor t and lag ℓ; build one with :func:`propagation`.

    ``log_singular_values[a, ℓ, b, j]`` = log σ_j(∂h_t/∂h_{t−ℓ}) for sequence b, with t = anchors[a] + 1, in
    descending order of j (all S of them, or the largest alone); ``log_frobenius[a, ℓ, b]`` = log‖∂h_t/∂h_{t−ℓ}‖_F.
    Both are NaN where ℓ > t (no such state), beyond ``max_lag`` or after the sweep stopped (``stop_below``).
    """

    recurrence: str
    anchors: Tensor  # (A,) 0-based step indices, ascending
    log_singular_values: Tensor  # (A, T+1, B, S) or (A, T+1, B, 1)
    log_frobenius: Tensor  # (A, T+1, B)

    @property
    def log_norm(self) -> Tensor:
        """log‖∂h_t/∂h_{t−ℓ}‖₂ (spectral), shape (A, T+1, B): lag along the second axis."""
        return self.log_singular_values[..., 0]

    def singular_values(self, lag: int) -> Tensor:
        """σ_j(∂h_t/∂h_{t−lag}) for every anchor and sequence, shape (A, B, S) (NaN where lag > t)."""
        max_lag = self.log_singular_values.shape[1] - 1
        if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or not 0 <= lag <= max_lag:
            raise ValueError(f"lag must be an int in 0..{max_lag}, got {lag!r}")
        return self.log_singular_values[:, int(lag)].exp()

    def horizon(self, eps: float = 1e-3) -> Tensor:
        """The first lag ℓ at which ‖∂h_t/∂h_{t−ℓ}‖₂ < eps, per anchor and sequence (A, B); −1 if it does not
        within the lags computed (all of them, or up to ``max_lag``)."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        below = self.log_norm < math.log(eps)  # NaN compares False
        first = below.to(torch.int8).argmax(dim=1)
        return torch.where(below.any(dim=1), first, -1)

    def to_dict(self) -> dict[str, Any]:
        """Anchors, log spectral and Frobenius norms by lag, ready for JSON: None where there is no such lag (NaN)
        and where the product is exactly zero (log-norm −inf), which JSON cannot hold."""
        return {
            "recurrence": self.recurrence,
            "anchors": self.anchors.tolist(),
            "log_norm": json_list(self.log_norm),
            "log_frobenius": json_list(self.log_frobenius),
        }


@flushes_subnormals
def propagation(
    trace: Trace,
    anchors: int | Sequence[int] | Tensor | None = None,
    *,
    layer: int | None = None,
    direction: str | None = None,
    max_lag: int | None = None,
    singular_values: str = "all",
    stop_below: float | None = None,
) -> Propagation:
    """Singular values of ∂h_t/∂h_{t−ℓ} for each anchor t = a + 1 and lag ℓ = 0..min(t, max_lag).

    anchors: 0-based step indices in 0..T−1 (default: the last step). layer/direction choose the recurrence as in
    :meth:`Trace.recurrence` (``layer=None``: the whole stack of a unidirectional model). All anchors share one
    backward sweep: at each step the products of every anchor already reached take one more Jacobian.
    ``singular_values``: "all" (an SVD per lag) or "largest" (σ₁ alone, by power iteration); ``stop_below``: end
    the sweep once every product is below this norm (module docstring).
    """
    if singular_values not in SINGULAR_VALUES:
        raise ValueError(f"singular_values must be one of {SINGULAR_VALUES}, got {singular_values!r}")
    if stop_below is not None and (
        isinstance(stop_below, bool) or not isinstance(stop_below, (int, float)) or not 0 < stop_below < math.inf
    ):
        raise ValueError(f"stop_below must be a positive finite number or None, got {stop_below!r}")
    rec = trace.recurrence(layer, direction)
    steps = rec.steps
    points = anchor_steps(anchors, steps)
    limit = steps if max_lag is None else lag_limit(max_lag, steps)
    batch, size = rec.states.shape[1:]
    dtype, device = rec.states.dtype, rec.states.device
    width = size if singular_values == "all" else 1
    log_sv = torch.full((len(points), steps + 1, batch, width), math.nan, dtype=dtype, device=device)
    log_frobenius = torch.full((len(points), steps + 1, batch), math.nan, dtype=dtype, device=device)
    log_sv[:, 0] = 0.0  # Π_0 = I
    log_frobenius[:, 0] = 0.5 * math.log(size)
    products = LagProducts(rec, points, lowest=max(0, int(points[0]) - limit + 1))
    lowest_anchor = int(points[0])
    for done, step in enumerate(products):
        tick(done, int(points[-1]) + 1 - products.lowest)
        lags = step.lags + 1  # after J_i the products are ∂h_t/∂h_i: lag a − i + 1
        live = lags <= limit
        if not bool(live.any()):
            continue
        products.advance(step)
        reached = step.first + torch.nonzero(live).flatten()
        log_frobenius[reached, lags[live]] = products.log_scale[reached]
        if singular_values == "all":
            log_sv[reached, lags[live]] = products.log_singular_values(step, live)
        else:
            log_sv[reached, lags[live], :, 0] = products.log_spectral_norm(step, live)
        if stop_below is not None and step.index <= lowest_anchor and _all_below(products, stop_below):
            break
    return Propagation(recurrence=rec.name, anchors=points, log_singular_values=log_sv, log_frobenius=log_frobenius)


def _all_below(products: LagProducts, eps: float) -> bool:
    """Whether every anchor's product of every sequence has ‖·‖_F = exp(s) < eps (so ‖·‖₂ < eps as well)."""
    return bool((products.log_scale < math.log(eps)).all())
