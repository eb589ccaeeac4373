"""Local gradients: how strongly one step's state reacts to each weight block with the previous state held fixed.

For step k, sequence b and weight block θ, the local gradient is the Frobenius norm of the immediate derivative
(Rehmer & Kroll, 2020; the last factor of eq. (8) in docs/notation.md):

    ℓ_θ(k, b) = ‖∂⁺h_k/∂θ‖_F,      ∂⁺h_k/∂θ: (S × |θ|), h_{k−1} held fixed

Every block enters a step as θ·u (cells/base.py), so with δ_j the adjoint at the product's output for the one-hot
covector e_j on h_k, row j of ∂⁺h_k/∂θ is δ_jᵀ ⊗ u and

    ℓ_θ(k, b)² = Σ_j ‖δ_j‖² ‖u‖²       (a bias: Σ_j ‖δ_j‖²)

The cell sums Σ_j ‖δ_j‖² itself (:meth:`Cell.param_energies`), for a chunk of steps at a time, and no (S × |θ|)
matrix is formed: the built-in cells in closed form (most adjoints are v ⊙ d for a per-unit gain d, so the sum is
Σ_i d_i²), any other cell by sending the S one-hots through its parameter factors. ``total`` is ‖∂⁺h_k/∂θ_all‖_F over
every block together. Padded steps (past a sequence's end) have no local gradient; they are NaN and left out of every
statistic. Sums of squares are formed in float64, so no local gradient that float32 can hold is lost to squaring.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.norms import flushes_subnormals, frobenius
from gatelens.analysis.serialize import json_list
from gatelens.trace import Trace

CHUNK_ELEMENTS = 1 << 24  # elements a cell's sums form at once (64 MiB in float32; see Cell.covector_elements)
QUANTILES = {"median": 0.5, "p95": 0.95}


@dataclass(frozen=True, eq=False)
class LocalGradients:
    """‖∂⁺h_{i+1}/∂θ‖_F per step index i and sequence b, for every block: ``norms[block]`` is (T, B)."""

    recurrence: str
    norms: dict[str, Tensor]

    @cached_property
    def total(self) -> Tensor:
        """‖∂⁺h_{i+1}/∂θ‖_F over all blocks together: (T, B)."""
        return torch.stack(list(self.norms.values())).square().sum(0).sqrt()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per block, and for ``"all"`` blocks together: mean, median, p95 and max over valid steps and sequences."""
        return {name: finite_statistics(values) for name, values in {**self.norms, "all": self.total}.items()}

    @cached_property
    def largest(self) -> dict[str, Any]:
        """The largest local gradient of any block: its block, step index, sequence and value."""
        stacked = torch.stack(list(self.norms.values()))
        flat = int(torch.nan_to_num(stacked, nan=-1.0).flatten().argmax())
        block, step, sequence = (int(i) for i in torch.unravel_index(torch.tensor(flat), stacked.shape))
        return {
            "block": list(self.norms)[block],
            "step": step,
            "sequence": sequence,
            "value": float(stacked[block, step, sequence]),
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary statistics, the largest value and the norms per step, ready for JSON (None on padded steps)."""
        return {
            "recurrence": self.recurrence,
            "summary": self.summary(),
            "largest": self.largest,
            "norms": {name: json_list(values) for name, values in self.norms.items()},
        }


@flushes_subnormals
def local_gradients(trace: Trace, *, layer: int | None = None, direction: str | None = None) -> LocalGradients:
    """‖∂⁺h_k/∂θ‖_F for every step, sequence and weight block (module docstring).

    layer/direction choose the recurrence as in :meth:`Trace.recurrence`; for a stack (``layer=None`` on a
    unidirectional model) h_k is the whole stack's state, so a lower layer's blocks also reach the layers above
    within the same step.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"local_gradients needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    rec = trace.recurrence(layer, direction)
    steps, batch = rec.input_index.shape
    chunk = max(1, CHUNK_ELEMENTS // (batch * rec.cell.covector_elements))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, steps, chunk):
        for name, (energy, inputs) in rec.param_energies(steps=slice(start, min(steps, start + chunk))).items():
            norm = energy.sqrt()  # (Σ_j ‖δ_j‖²)^½, in float64
            if inputs is not None:
                norm = norm * frobenius(inputs, dims=1)
            parts.setdefault(name, []).append(norm.to(rec.states.dtype))
    norms = {name: torch.cat(values) for name, values in parts.items()}
    if rec.mask is not None:
        norms = {name: torch.where(rec.mask, values, torch.nan) for name, values in norms.items()}
    return LocalGradients(recurrence=rec.name, norms=norms)


def finite_statistics(values: Tensor) -> dict[str, float]:
    """Mean, quantiles and max of the finite entries (padded steps are NaN)."""
    valid = values[~values.isnan()].detach().double().cpu().numpy()
    stats = {"mean": float(valid.mean())}
    stats |= {name: float(np.quantile(valid, q)) for name, q in QUANTILES.items()}
    return stats | {"max": float(valid.max())}
