"""A plain-language account of one model on one batch: a short list of findings, each with its number.

``explain`` runs every analysis on a trace and turns the results into findings:

    regimes          share of unit-steps that carry, are blocked, are Elman-like or mixed      (regimes)
    timescales       long-term and short-term units by τ = 1 / (1 − c̄)                         (regimes)
    horizon          the lag at which ‖∂h_T/∂h_{T−ℓ}‖₂ falls below eps                         (propagation)
    blocking         steps with collapsed Jacobian rows, and what survives of each gradient    (blocking, credit)
    local gradients  the largest ‖∂⁺h_k/∂θ‖_F and the typical size per step                    (local_gradients)
    lyapunov         the top Lyapunov exponent and the e-folding time it implies               (lyapunov)

A unidirectional model is explained as one recurrence (all layers together); a bidirectional one per layer and
direction. Each finding keeps its supporting numbers in ``details``; ``to_dict`` gives JSON and ``render`` text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gatelens.analysis.blocking import Blocking, blocking
from gatelens.analysis.credit import CreditMap
from gatelens.analysis.local import local_gradients
from gatelens.analysis.lyapunov import lyapunov
from gatelens.analysis.propagation import propagation
from gatelens.analysis.regimes import REGIMES, check_thresholds, regimes
from gatelens.analysis.serialize import json_number
from gatelens.trace import DIRECTIONS, Trace

HORIZON_LAGS = 64  # lags of the first propagation sweep for the horizon; grown fourfold as needed


@dataclass(frozen=True)
class Finding:
    """One statement about the model: its topic, the sentence, the number it rests on, and the details."""

    topic: str
    recurrence: str
    text: str
    value: float | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    """The findings of :func:`explain` for one model on one batch."""

    model: str
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "findings": [
                {
                    "topic": f.topic,
                    "recurrence": f.recurrence,
                    "text": f.text,
                    "value": None if f.value is None else json_number(f.value),
                    "details": f.details,
                }
                for f in self.findings
            ],
        }

    def render(self) -> str:
        """The findings as text, one bullet each."""
        lines = [self.model]
        lines += [f"- {f.topic} ({f.recurrence}): {f.text}" for f in self.findings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def explain(
    trace: Trace,
    credit: CreditMap | Mapping[str, CreditMap] | None = None,
    *,
    thresholds: float | tuple[float, float] = (0.1, 0.9),
    eps: float = 1e-3,
    tol: float = 0.1,
    seed: int = 0,
) -> Explanation:
    """Findings about ``trace`` (module docstring). ``credit``: the credit map(s) of the user's loss, used for
    the blocking findings; default: the many-to-one and many-to-many probe losses of
    :func:`gatelens.analysis.blocking.probe_credits` drawn from ``seed``."""
    if not isinstance(trace, Trace):
        raise TypeError(f"explain needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    check_thresholds(thresholds)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.number)) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1) (a norm below which the flow counts as gone), got {eps!r}")
    dtype = str(trace.output.dtype).removeprefix("torch.")
    findings = _blocking_findings(blocking(trace, credit, tol=tol, seed=seed), dtype)  # checks credit and tol first
    for layer, direction in _parts(trace):
        regime = regimes(trace, thresholds, layer=layer, direction=direction)
        findings += [_regime_finding(regime), _timescale_finding(regime)]
        findings.append(_horizon_finding(trace, layer, direction, float(eps)))
        findings.append(_local_finding(trace, layer, direction))
        findings.append(_lyapunov_finding(trace, layer, direction))
    order = ["regimes", "timescales", "horizon", "blocking", "local gradients", "lyapunov"]
    findings.sort(key=lambda f: order.index(f.topic))
    return Explanation(model=repr(trace.model), findings=findings)


def _parts(trace: Trace) -> list[tuple[int | None, str | None]]:
    """The recurrences explained: the whole unidirectional model, or each layer and direction."""
    model = trace.model
    if not model.bidirectional:
        return [(None, None)]
    return [(layer, direction) for layer in range(model.num_layers) for direction in DIRECTIONS]


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _regime_finding(regime: Any) -> Finding:
    census = dict(zip(REGIMES, regime.census.tolist()))
    lo, hi = regime.thresholds
    text = (
        f"{_percent(census['carry'])} of unit-steps carry their value (c > {hi:g}), {_percent(census['blocked'])} "
        f"are blocked (c < {lo:g} and admit < {lo:g}), {_percent(census['elman'])} are Elman-like, "
        f"{_percent(census['mixed'])} mixed."
    )
    return Finding("regimes", regime.recurrence, text, census["blocked"], {"census": census})


def _timescale_finding(regime: Any) -> Finding:
    taus = regime.timescale.tolist()
    long_units, short_units = regime.units("long-term"), regime.units("short-term")
    longest = max(range(len(taus)), key=lambda j: taus[j])
    text = (
        f"{len(long_units)} of {len(taus)} units are long-term (τ ≥ {regime.long_term:g} steps), "
        f"{len(short_units)} short-term (τ ≤ {regime.short_term:g}); the longest, {regime.unit_labels[longest]}, "
        f"has τ = {_steps(taus[longest])} (mean carry {regime.mean_carry[longest]:.3f})."
    )
    details = {
        "long_term": {unit: json_number(tau) for unit, tau in zip(regime.unit_labels, taus) if unit in long_units},
        "short_term": short_units,
    }
    return Finding("timescales", regime.recurrence, text, taus[longest], details)


def _steps(value: float) -> str:
    return "∞ steps" if math.isinf(value) else f"{value:.1f} steps"


def _horizon_finding(trace: Trace, layer: int | None, direction: str | None, eps: float) -> Finding:
    """The horizon from each sequence's own last step L_b (0 < eps < 1).

    Steps past a sequence's end are identities, so from the last step T the first T − L_b lags of sequence b are
    identity lags: its own horizon is the one from T minus T − L_b, and one anchor serves every sequence. Lags
    are computed up to the longest padding plus a limit that grows fourfold until every sequence has fallen below
    eps (or all T are done).
    """
    rec = trace.recurrence(layer, direction)
    steps, batch = rec.input_index.shape
    padding = steps - trace.lengths.cpu() if trace.lengths is not None else torch.zeros(batch, dtype=torch.long)
    limit = int(padding.max()) + HORIZON_LAGS
    while True:
        from_end = propagation(trace, layer=layer, direction=direction, max_lag=min(limit, steps)).horizon(eps)[0]
        if bool((from_end >= 0).all()) or limit >= steps:
            break
        limit = int(padding.max()) + 4 * (limit - int(padding.max()))
    horizons = torch.where(from_end >= 0, (from_end.cpu() - padding).clamp_min(0), -1).tolist()
    reached = sorted(h for h in horizons if h >= 0)
    if not reached:
        text = f"‖∂h_T/∂h_(T−ℓ)‖ stays above {eps:g} over all lags in every sequence: no vanishing here."
        value = None
    else:
        value = float(reached[len(reached) // 2])
        text = (
            f"‖∂h_T/∂h_(T−ℓ)‖ falls below {eps:g} after ℓ = {value:.0f} steps (median of the {len(reached)} of "
            f"{len(horizons)} sequences where it does; range {reached[0]}–{reached[-1]}; T = {steps})."
        )
    return Finding("horizon", rec.name, text, value, {"eps": eps, "horizon": horizons})


def _local_finding(trace: Trace, layer: int | None, direction: str | None) -> Finding:
    result = local_gradients(trace, layer=layer, direction=direction)
    largest, overall = result.largest, result.summary()["all"]
    text = (
        f"the largest local gradient is ‖∂⁺h_k/∂{largest['block']}‖ = {largest['value']:.3g} at step index "
        f"{largest['step']} of sequence {largest['sequence']}; over all blocks the median per step is "
        f"{overall['median']:.3g} (p95 {overall['p95']:.3g})."
    )
    return Finding("local gradients", result.recurrence, text, largest["value"], {"largest": largest, "all": overall})


def _lyapunov_finding(trace: Trace, layer: int | None, direction: str | None) -> Finding:
    result = lyapunov(trace, k=1, layer=layer, direction=direction)
    per_sequence = result.largest.tolist()
    exponents = sorted(per_sequence)
    median = exponents[len(exponents) // 2]  # the upper median: one singular sequence does not decide it
    if median == -math.inf:
        meaning = "some step maps every perturbation to zero (an exactly singular Jacobian)"
    elif median < 0:
        meaning = f"perturbations of the state shrink by e every {-1 / median:.1f} steps"
    elif median > 0:
        meaning = f"perturbations grow by e every {1 / median:.1f} steps (chaotic or exploding)"
    else:
        meaning = "perturbations neither grow nor shrink"
    spread = f" (median over sequences; range {exponents[0]:.3g} to {exponents[-1]:.3g})" if len(exponents) > 1 else ""
    text = f"the top Lyapunov exponent is λ₁ = {median:.3g} per step{spread}: {meaning}."
    details = {
        "per_sequence": [json_number(v) for v in per_sequence],
        "stderr": [json_number(v) for v in result.stderr[:, 0].tolist()],
    }
    return Finding("lyapunov", result.recurrence, text, median, details)


def _blocking_findings(result: Blocking, dtype: str) -> list[Finding]:
    if not result.events:
        text = f"no Jacobian row falls below {result.tol:g} at any step: nothing blocks the flow."
        return [Finding("blocking", "all", text, 0.0, {"tol": result.tol})]
    event = result.events[0]
    losses = []
    for loss in result.losses:
        parts = event.parts[loss]
        if event.underflow[loss]:
            losses.append(
                f"{loss}: the later losses' adjoint underflows to 0 in {dtype} before it reaches the step; trace in "
                "float64 (model.to(torch.float64)) to see what crosses it"
            )
            continue
        if math.isnan(event.transmission[loss]):
            losses.append(f"{loss}: no loss lies at or after it, so it cuts nothing")
            continue
        across = max(_across_share(value) for value in parts.values())
        smallest = min(parts, key=lambda block: parts[block]["total"])
        remain = (
            f"the gradients remain (smallest ‖∂L/∂{smallest}‖ = {parts[smallest]['total']:.3g})"
            if parts[smallest]["total"] > 0
            else f"{smallest} gets no gradient from this sequence at all"
        )
        losses.append(
            f"{loss}: the later losses' adjoint crosses it with gain {event.transmission[loss]:.2g}, the credit it "
            f"carries to earlier steps is at most {across:.2g} of any weight's gradient, and {remain}"
        )
    text = (
        f"{result.total_events} step(s) have Jacobian rows below {result.tol:g}. The most severe, step index "
        f"{event.step} of sequence {event.sequence} ({len(event.rows)} row(s), ‖J‖_F = {event.jacobian_norm:.2g}): "
        + "; ".join(losses)
        + "."
    )
    return [Finding("blocking", event.recurrence, text, float(result.total_events), result.to_dict())]


def _across_share(parts: dict[str, float]) -> float:
    """‖G_across‖ / ‖G‖ for one block (0 for a block without gradient)."""
    return parts["across"] / parts["total"] if parts["total"] > 0 else 0.0
