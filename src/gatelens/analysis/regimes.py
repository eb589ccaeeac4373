"""Gate regimes and unit timescales: what the gates do to each memory unit at each step.

Every cell reports, per memory unit j and step, its *carry* c (the share of the unit's previous value kept as
it is) and its *admit* a (how open the route is by which the previous state enters the unit's candidate); see
:class:`~gatelens.cells.base.MemoryGates` (GRU: c = z for update "keep", 1 − z for "replace", a = r; LSTM: c = f,
a = i; Elman: c = 0, a = 1). With thresholds lo ≤ hi, the unit's regime at that step is

    carry    c > hi               it keeps its value; the carry path diag(c) passes ∂L/∂h_j on almost unchanged
    blocked  c < lo and a < lo    its gates shut the past out: with saturated gates its Jacobian row is ≈ 0
    elman    c < lo and a > hi    it is replaced by a candidate that reads the whole past state, as in an Elman RNN
    mixed    anything else

For a GRU with reset "before", a is the unit's row-wise admit ‖W_hn[j, :] ⊙ r‖ / ‖W_hn[j, :]‖, so a unit whose own
r_j ≈ 0 is not blocked while other units' r keep its candidate's row open; ``looks_blocked`` counts such steps.

Per unit, over the valid steps of every sequence: the mean carry c̄, admit and gate, the *timescale*

    τ_j = 1 / (1 − c̄_j)      (the carry path alone decays as c̄^ℓ ≈ exp(−ℓ/τ) for c̄ near 1)

and a label: "long-term" if τ ≥ ``long_term`` (default 10 steps, c̄ ≥ 0.9), "short-term" if τ ≤ ``short_term``
(default 2, c̄ ≤ 0.5), "mixed" otherwise. τ reads the gates only; the measured decay of ∂h_t/∂h_k also includes the
recurrent paths (see :func:`gatelens.propagation`). Regimes read the gates only; the Jacobian rows themselves
(which also shrink for saturated candidates or dead ReLU units, whatever the gates) are what
:func:`gatelens.blocking` measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.serialize import json_list
from gatelens.trace import Trace

REGIMES = ("carry", "blocked", "elman", "mixed")
UNIT_KINDS = ("long-term", "short-term", "mixed")
PADDING = -1  # the regime code of a step past a sequence's end


@dataclass(frozen=True, eq=False)
class Regimes:
    """Regime of every memory unit at every step; build one with :func:`regimes`.

    ``codes[i, b, j]`` indexes :data:`REGIMES` (−1 on padded steps); ``carry``, ``admit`` and ``gate`` are the
    memory gates (T, B, U) and ``leak`` = 1 − carry (formed without cancellation); ``valid`` (T, B) marks the steps
    inside each sequence.
    """

    recurrence: str
    unit_labels: list[str]
    thresholds: tuple[float, float]
    long_term: float
    short_term: float
    codes: Tensor
    carry: Tensor
    admit: Tensor
    gate: Tensor
    leak: Tensor
    valid: Tensor

    def _mean(self, values: Tensor) -> Tensor:
        """Mean over the valid (step, sequence) pairs, per unit: (U,)."""
        weights = self.valid.to(values.dtype)[..., None]
        return (values * weights).sum((0, 1)) / weights.sum((0, 1))

    @cached_property
    def census_by_unit(self) -> Tensor:
        """Share of valid steps in each regime, per unit: (U, 4), columns in the order of :data:`REGIMES`."""
        counts = torch.stack([(self.codes == code).sum((0, 1)) for code in range(len(REGIMES))], dim=-1)
        return counts.to(self.carry.dtype) / self.valid.sum()

    @cached_property
    def census(self) -> Tensor:
        """Share of all valid (step, sequence, unit) triples in each regime: (4,)."""
        return self.census_by_unit.mean(0)

    @cached_property
    def looks_blocked(self) -> Tensor:
        """Per unit, the share of valid steps where its own gates say "blocked" (c < lo, gate < lo) but its
        candidate's row is open (admit ≥ lo); always 0 where admit is the unit's own gate."""
        lo = self.thresholds[0]
        nominal = (self.carry < lo) & (self.gate < lo) & (self.admit >= lo) & self.valid[..., None]
        return nominal.sum((0, 1)).to(self.carry.dtype) / self.valid.sum()

    @cached_property
    def mean_carry(self) -> Tensor:
        """c̄ per unit (U,)."""
        return self._mean(self.carry)

    @cached_property
    def mean_admit(self) -> Tensor:
        """Mean admit per unit (U,)."""
        return self._mean(self.admit)

    @cached_property
    def mean_gate(self) -> Tensor:
        """Mean of the unit's own gate on the candidate route (GRU r, LSTM i) per unit (U,)."""
        return self._mean(self.gate)

    @cached_property
    def timescale(self) -> Tensor:
        """τ = 1 / (1 − c̄) per unit, in steps (U,), from the mean leak 1 − c (exact even where 1 − c is below the
        dtype's eps, as under GRU update "replace" with z → 0); inf where the leak is 0."""
        return 1.0 / self._mean(self.leak)

    @cached_property
    def unit_kind(self) -> list[str]:
        """ "long-term", "short-term" or "mixed" per unit, by the rule in the module docstring."""
        return [
            "long-term" if tau >= self.long_term else "short-term" if tau <= self.short_term else "mixed"
            for tau in self.timescale.tolist()
        ]

    def units(self, kind: str) -> list[str]:
        """Labels of the units of one kind ("long-term", "short-term" or "mixed")."""
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {kind!r}; expected one of {', '.join(map(repr, UNIT_KINDS))}")
        return [label for label, k in zip(self.unit_labels, self.unit_kind) if k == kind]

    def to_dict(self, per_step: bool = False) -> dict[str, Any]:
        """Census and per-unit statistics, ready for JSON (an infinite timescale becomes None); with
        ``per_step=True`` also the regime codes and the memory gates of every step, (T, B, U) each."""
        summary = {
            "recurrence": self.recurrence,
            "thresholds": list(self.thresholds),
            "census": dict(zip(REGIMES, self.census.tolist())),
            "units": unit_summaries(self),
        }
        if not per_step:  # the per-step arrays are formed only when asked for (3 × T·B·U values)
            return summary
        return (
            {"codes": self.codes.tolist()}
            | {name: json_list(getattr(self, name)) for name in ("carry", "admit", "gate")}
            | summary
        )


def regimes(
    trace: Trace,
    thresholds: float | tuple[float, float] = (0.1, 0.9),
    *,
    layer: int | None = None,
    direction: str | None = None,
    long_term: float = 10.0,
    short_term: float = 2.0,
) -> Regimes:
    """The gate regime of every memory unit at every step, and each unit's timescale (module docstring).

    thresholds: (lo, hi) with 0 < lo ≤ hi < 1, or one number ε in (0, ½) meaning (ε, 1 − ε). layer/direction
    choose the recurrence as in :meth:`Trace.recurrence` (``layer=None``: every layer of a unidirectional model,
    its units labelled ``l0.h3``, ``l1.h0``, …).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"regimes needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    lo, hi = check_thresholds(thresholds)
    long_term, short_term = _timescale_bounds(long_term, short_term)
    rec = trace.recurrence(layer, direction)
    gates = rec.cell.memory_gates(rec.cache)
    steps, batch = rec.input_index.shape
    valid = torch.ones(steps, batch, dtype=torch.bool, device=gates.carry.device) if rec.mask is None else rec.mask
    codes = torch.full(gates.carry.shape, REGIMES.index("mixed"), dtype=torch.int8, device=gates.carry.device)
    replaced = gates.carry < lo
    codes[gates.carry > hi] = REGIMES.index("carry")
    codes[replaced & (gates.admit < lo)] = REGIMES.index("blocked")
    codes[replaced & (gates.admit > hi)] = REGIMES.index("elman")
    codes[~valid] = PADDING
    return Regimes(
        recurrence=rec.name,
        unit_labels=rec.cell.unit_labels(),
        thresholds=(lo, hi),
        long_term=long_term,
        short_term=short_term,
        codes=codes,
        carry=gates.carry,
        admit=gates.admit,
        gate=gates.gate,
        leak=gates.leak,
        valid=valid,
    )


def check_thresholds(thresholds: Any) -> tuple[float, float]:
    """(lo, hi) from a pair with 0 < lo ≤ hi < 1, or from one ε in (0, ½)."""
    expected = "thresholds must be (lo, hi) with 0 < lo ≤ hi < 1, or one number ε in (0, 0.5) for (ε, 1 − ε)"
    if isinstance(thresholds, (int, float, np.floating)) and not isinstance(thresholds, bool):
        if not 0 < thresholds < 0.5:
            raise ValueError(f"{expected}; got {thresholds!r}")
        return float(thresholds), 1.0 - float(thresholds)
    try:
        lo, hi = (float(value) for value in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"{expected}; got {thresholds!r:.80}") from None
    if any(isinstance(value, bool) for value in thresholds) or not 0 < lo <= hi < 1:
        raise ValueError(f"{expected}; got {tuple(thresholds)!r}")
    return lo, hi


def _timescale_bounds(long_term: Any, short_term: Any) -> tuple[float, float]:
    """The label bounds, checked: 1 ≤ short_term ≤ long_term < inf (τ is at least one step)."""
    for name, value in (("long_term", long_term), ("short_term", short_term)):
        if (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, (int, float, np.number))
            or not 1 <= value < math.inf
        ):
            raise ValueError(f"{name} must be a number of steps ≥ 1, got {value!r}")
    if short_term > long_term:
        raise ValueError(f"short_term ({short_term}) must not exceed long_term ({long_term})")
    return float(long_term), float(short_term)


def unit_summaries(regimes: Any) -> list[dict[str, Any]]:
    """Per memory unit of a :class:`Regimes` (or pooled regimes with the same fields): its census, mean carry, admit
    and gate, timescale (None where infinite), kind and whether it looks blocked, ready for JSON."""
    return [
        {
            "unit": label,
            "census": dict(zip(REGIMES, census)),
            "mean_carry": carry,
            "mean_admit": admit,
            "mean_gate": gate,
            "timescale": tau,
            "kind": kind,
            "looks_blocked": looks,
        }
        for label, census, carry, admit, gate, tau, kind, looks in zip(
            regimes.unit_labels,
            regimes.census_by_unit.tolist(),
            regimes.mean_carry.tolist(),
            regimes.mean_admit.tolist(),
            regimes.mean_gate.tolist(),
            json_list(regimes.timescale),
            regimes.unit_kind,
            regimes.looks_blocked.tolist(),
        )
    ]
