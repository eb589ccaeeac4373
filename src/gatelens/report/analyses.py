"""Every analysis of one model on one batch, run once, for the report, ``results.json`` and the command line.

:func:`run_analyses` traces nothing itself: it takes a :class:`~gatelens.Trace` and runs

    credit        the credit map of the task's loss when it is known, else of a probe loss L = ⟨w, y⟩
                  (many-to-one, "last": the output at each sequence's last step, as ``gl.credit(loss="last")``
                  reads it; for a bidirectional model that is [forward h_T, reverse state after reading x_T
                  alone], not h_n; many-to-many, "all": the output at every step); and, when that loss sits at
                  fewer than half the steps (a many-to-one loss), the many-to-many probe's too, whose loss step ×
                  source step map has a row at every step
    per recurrence (the whole unidirectional model, or each layer and direction of a bidirectional one):
      regimes       gate regimes and unit timescales τ = 1 / (1 − c̄)
      propagation   log‖∂h_T/∂h_{T−ℓ}‖ for every lag ℓ from the last step, and the gradient horizon
      local         ‖∂⁺h_k/∂θ‖_F per step and weight block
      lyapunov      all Lyapunov exponents of the trajectory
    explain       the findings, in plain language, each with its number

A checkpoint carries no head and no targets, so without a credit map the loss is a probe: a fixed random readout
w drawn from ``seed`` (:func:`gatelens.probe_credits`). Where credit comes from does not depend on the readout;
only the magnitudes do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatelens.analysis import (
    CreditMap,
    Explanation,
    LocalGradients,
    Lyapunov,
    Propagation,
    Regimes,
    explain,
    local_gradients,
    lyapunov,
    probe_credits,
    propagation,
    regimes,
)
from gatelens.analysis.serialize import json_list
from gatelens.trace import DIRECTIONS, Trace

PROBES = {"last": "many-to-one", "all": "many-to-many"}  # --loss → the probe loss it stands for
EPS = 1e-3  # the gradient horizon: the lag at which ‖∂h_T/∂h_{T−ℓ}‖₂ falls below EPS


@dataclass(frozen=True)
class RecurrenceAnalyses:
    """The analyses of one recurrence, ``label`` as the findings name it ("l0", "l0_reverse", …)."""

    label: str
    layer: int | None
    direction: str | None
    regimes: Regimes
    propagation: Propagation
    local: LocalGradients
    lyapunov: Lyapunov

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "regimes": self.regimes.to_dict(),
            "propagation": self.propagation.to_dict() | {"eps": EPS, "horizon": self.propagation.horizon(EPS).tolist()},
            "local_gradients": self.local.to_dict(),
            "lyapunov": self.lyapunov.to_dict(),
        }


@dataclass(frozen=True)
class Analyses:
    """Everything gatelens says about one model on one batch."""

    name: str
    trace: Trace
    loss: str  # what the credit map is of, in words
    credit: CreditMap
    credit_by_step: CreditMap  # for the loss step × source step map: credit, or the probe when its loss is sparse
    recurrences: list[RecurrenceAnalyses]
    explanation: Explanation

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results; the credit map keeps its total, lag profile and path shares (the T × T maps are
        in ``gatelens credit``'s .npz)."""
        credit = {
            field: {name: json_list(value) for name, value in getattr(self.credit, field).items()}
            for field in ("total", "by_lag", "path_shares")
        }
        return {
            "name": self.name,
            "model": repr(self.trace.model),
            "loss": self.loss,
            "explanation": self.explanation.to_dict(),
            "credit": credit,
            "recurrences": {part.label: part.to_dict() for part in self.recurrences},
        }


def stages(trace: Trace) -> int:
    """How many steps :func:`run_analyses` reports through ``advance`` for this trace."""
    return 2 + 4 * len(recurrence_parts(trace))


def recurrence_parts(trace: Trace) -> list[tuple[int | None, str | None]]:
    """The recurrences analysed: the whole unidirectional model, or each layer and direction."""
    model = trace.model
    if not model.bidirectional:
        return [(None, None)]
    return [(layer, direction) for layer in range(model.num_layers) for direction in DIRECTIONS]


def run_analyses(
    trace: Trace,
    *,
    name: str,
    credit: CreditMap | None = None,
    loss: str = "last",
    seed: int = 0,
    advance: Callable[[str], None] = lambda stage: None,
) -> Analyses:
    """Run every analysis on ``trace``; ``advance(stage)`` is called after each of :func:`stages` steps.

    ``credit``: the credit map of the task's loss; without it, the probe loss ``loss`` ("last" or "all")."""
    if credit is not None and not isinstance(credit, CreditMap):
        raise TypeError(f"credit must be a CreditMap (from gl.credit), got {type(credit).__name__}")
    if credit is None and loss not in PROBES:
        raise ValueError(f"unknown loss {loss!r}; expected 'last' (many-to-one) or 'all' (many-to-many)")
    probes = probe_credits(trace, seed=seed)
    if credit is None:
        credits, chosen = probes, probes[PROBES[loss]]
        description = f"probe loss {PROBES[loss]}: ⟨w, h⟩ with a random readout w (seed {seed})"
    else:
        credits, chosen, description = credit, credit, "the task's loss"
    loss_steps = int(chosen.out_grads.flatten(1).ne(0).any(dim=1).sum())
    by_step = chosen if 2 * loss_steps >= len(chosen.out_grads) else probes["many-to-many"]
    advance("credit map")
    parts = []
    for layer, direction in recurrence_parts(trace):
        where = {"layer": layer, "direction": direction}
        regime = regimes(trace, **where)
        label = regime.recurrence
        advance(f"regimes ({label})")
        flow = propagation(trace, **where)
        advance(f"propagation ({label})")
        local = local_gradients(trace, **where)
        advance(f"local gradients ({label})")
        exponents = lyapunov(trace, **where)
        advance(f"Lyapunov exponents ({label})")
        parts.append(RecurrenceAnalyses(label, layer, direction, regime, flow, local, exponents))
    explanation = explain(trace, credit=credits, seed=seed)
    advance("findings")
    return Analyses(name, trace, description, chosen, by_step, parts, explanation)
