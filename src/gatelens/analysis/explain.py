"""A plain-language account of one model on one batch: a short list of findings, each with its number.

:func:`explanation_of` turns the results of :func:`gatelens.analyze` into findings (``gl.explain(trace)`` runs
the analyses and returns them):

    regimes          share of unit-steps that carry, are blocked, are Elman-like or mixed      (regimes)
    timescales       long-term and short-term units by τ = 1 / (1 − c̄)                         (regimes)
    horizon          the lag at which ‖∂h_T/∂h_{T−ℓ}‖₂ falls below eps, or not within max_lag  (propagation)
    blocking         steps with collapsed Jacobian rows, and what survives of each gradient    (blocking, credit)
    local gradients  the largest ‖∂⁺h_k/∂θ‖_F of one block θ beside θ's own median, and the   (local_gradients)
                     norm over all blocks together with its own median, p95 and max
    lyapunov         λ₁ (median over sequences, and how many are positive or negative), the    (lyapunov)
                     e-folding time it implies, and the exponents that are −inf (rank)

Estimates over fewer than SHORT_TRACE = 100 steps are called short in the text: the Lyapunov exponents are
averaged from h_0 with no warm-up, so over a few dozen steps the transient from the initial state is part of them,
and a horizon that is not reached within T steps says nothing about longer lags. The Lyapunov finding follows the
top min(S, k) exponents the analysis computed, so a rank deficit shows where the rank is below that number.

A whole data set (:func:`gatelens.analyze_dataset`, :func:`dataset_explanation_of`) has the same topics but blocking,
from its pooled statistics: regimes, timescales and local gradients as above (the largest local gradient's sequence
is its index in the data set); the horizon as the distribution of every sequence's own horizon (median and
quantiles with the unreached sequences counted as longer than any lag, and how many reach eps); λ₁ as its mean ±
standard error over the sequences and over the batches, with the count of positive and negative ones.

A unidirectional model is explained as one recurrence (all layers together); a bidirectional one per layer and
direction. A stage that was not run has no finding. Each finding keeps its supporting numbers in ``details``;
``to_dict`` gives JSON and ``render`` text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gatelens.analysis.blocking import Blocking
from gatelens.analysis.local import LocalGradients
from gatelens.analysis.lyapunov import Lyapunov
from gatelens.analysis.propagation import Propagation
from gatelens.analysis.regimes import REGIMES
from gatelens.analysis.serialize import json_number
from gatelens.trace import Trace

if TYPE_CHECKING:
    from gatelens.analysis.dataset import DatasetAnalysis, PooledHorizons, PooledLyapunov
    from gatelens.analysis.pipeline import Analysis

SHORT_TRACE = 100  # fewer steps than this: the Lyapunov estimate and an unreached horizon are called short
CANCELLATION = 1e-6  # ‖G_across‖/‖G‖ above 1 + this is a cancellation, not a ratio of equal norms with round-off


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


def explanation_of(analysis: Analysis) -> Explanation:
    """The findings of one :class:`~gatelens.analysis.pipeline.Analysis`, in the order of the module docstring."""
    trace = analysis.trace
    dtype = str(trace.output.dtype).removeprefix("torch.")
    findings = [] if analysis.blocking is None else _blocking_findings(analysis.blocking, dtype)
    for part in analysis.recurrences:
        if part.regimes is not None:
            findings += [_regime_finding(part.regimes), _timescale_finding(part.regimes)]
        if part.propagation is not None:
            findings.append(_horizon_finding(trace, part.propagation, analysis.settings.eps))
        if part.local is not None:
            findings.append(_local_finding(part.local))
        if part.lyapunov is not None:
            findings.append(_lyapunov_finding(part.lyapunov, trace.recurrence(part.layer, part.direction).cell))
    order = ["regimes", "timescales", "horizon", "blocking", "local gradients", "lyapunov"]
    findings.sort(key=lambda f: order.index(f.topic))
    return Explanation(model=repr(trace.model), findings=findings)


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


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _steps(value: float) -> str:
    return "∞ steps" if math.isinf(value) else f"{value:.1f} steps"


def _horizon_finding(trace: Trace, result: Propagation, eps: float) -> Finding:
    """The horizon from each sequence's own last step L_b (0 < eps < 1).

    Steps past a sequence's end are identities, so from the last step T the first T − L_b lags of sequence b are
    identity lags: its own horizon is the one from T minus T − L_b, and one anchor serves every sequence. The
    lags computed are those of ``result`` (up to max_lag past the longest padding, or until all are below eps).
    """
    steps, batch = result.log_frobenius.shape[1] - 1, result.log_frobenius.shape[2]
    padding = steps - trace.lengths.cpu() if trace.lengths is not None else torch.zeros(batch, dtype=torch.long)
    lags = int((~result.log_frobenius[0].isnan()).any(dim=1).sum()) - 1 - int(padding.max())
    from_end = result.horizon(eps)[0].cpu()
    horizons = torch.where(from_end >= 0, (from_end - padding).clamp_min(0), -1).tolist()
    reached = sorted(h for h in horizons if h >= 0)
    if not reached:
        within = (
            f"within {_count(steps, 'step')}"
            if lags >= steps - int(padding.max())
            else f"within the {_count(lags, 'lag')} computed (the cap max_lag; later lags were not computed)"
        )
        text = (
            f"‖∂h_T/∂h_(T−ℓ)‖ stays above {eps:g} at every lag of every sequence (T = {steps}): no vanishing {within}"
        )
        if steps < SHORT_TRACE:
            text += f"; with fewer than {SHORT_TRACE} steps the trace is too short to say whether it vanishes later"
        text += "."
        value = None
    else:
        value = float(reached[len(reached) // 2])
        text = (
            f"‖∂h_T/∂h_(T−ℓ)‖ falls below {eps:g} after ℓ = {value:.0f} steps (median of the {len(reached)} of "
            f"{len(horizons)} sequences where it does; range {reached[0]}–{reached[-1]}; T = {steps})."
        )
    return Finding("horizon", result.recurrence, text, value, {"eps": eps, "horizon": horizons})


def _local_finding(result: LocalGradients) -> Finding:
    """The largest ‖∂⁺h_k/∂θ‖_F of one block θ beside the same block's median and p95 over steps, and the norm over
    all blocks together, ‖∂⁺h_k/∂θ_all‖_F = (Σ_θ ‖∂⁺h_k/∂θ‖_F²)^½, with its own median, p95 and max."""
    summary = result.summary()
    largest, overall = result.largest, summary["all"]
    block = summary[largest["block"]]
    text = (
        f"the largest local gradient of a single weight block is ‖∂⁺h_k/∂{largest['block']}‖_F = "
        f"{largest['value']:.3g} at step index {largest['step']} of sequence {largest['sequence']}; that block's "
        f"median per step is {block['median']:.3g} (p95 {block['p95']:.3g}). Over all blocks together, "
        f"‖∂⁺h_k/∂θ‖_F has median {overall['median']:.3g} per step (p95 {overall['p95']:.3g}, max "
        f"{overall['max']:.3g})."
    )
    details = {"largest": largest, "block": block, "all": overall}
    return Finding("local gradients", result.recurrence, text, largest["value"], details)


def _lyapunov_finding(result: Lyapunov, cell: Any) -> Finding:
    """λ₁ per sequence (the exponent of the first direction, Q_0 e_1 = e_1, as with k = 1), its upper median and
    how many sequences have λ₁ > 0 and < 0; the rank (exponents not −inf) among the k exponents followed; and
    whether the estimate is short (fewer than SHORT_TRACE steps, from h_0, no warm-up)."""
    size, k = cell.state_size, result.exponents.shape[-1]
    per_sequence, ranks = result.exponents[:, 0].tolist(), result.rank.tolist()
    exponents, count = sorted(per_sequence), len(per_sequence)
    median = exponents[count // 2]  # the upper median: one singular sequence does not decide it
    positive, negative = sum(v > 0 for v in per_sequence), sum(v < 0 for v in per_sequence)
    meaning = _lyapunov_meaning(median, sorted(ranks)[count // 2])
    if count > 1:
        text = (
            f"the top Lyapunov exponent λ₁ has median {median:.3g} per step over {count} sequences: at the median, "
            f"{meaning}; {positive} of {count} sequences have λ₁ > 0 (perturbations grow), {negative} have λ₁ < 0 "
            + (
                f"(range {exponents[0]:.3g} to {exponents[-1]:.3g})."
                if exponents[0] != exponents[-1]
                else "(all equal)."
            )
        )
    else:
        text = f"the top Lyapunov exponent is λ₁ = {median:.3g} per step: {meaning}."
    counted = result.counted.tolist()
    steps, fewest = int(max(counted)), int(min(counted))
    short = fewest < SHORT_TRACE
    over = _count(steps, "step") if fewest == steps else f"{fewest} to {steps} steps per sequence"
    text += f" Estimated over {over} from h_0 with no warm-up" + (
        f": a short estimate (under {SHORT_TRACE} steps), so the transient from the initial state is part of it; "
        "read it as indicative."
        if short
        else "."
    )
    deficient = sorted(rank for rank in ranks if rank < k)
    if deficient:
        on = f"On {len(deficient)} of {count} sequences the" if count > 1 else "The"
        finite, other = _span(deficient[0], deficient[-1]), _span(k - deficient[-1], k - deficient[0])
        followed = f"exponents followed (of {size})" if k < size else "exponents"
        text += (
            f" {on} Jacobians are numerically rank-deficient: only {finite} of the {k} {followed} are finite and the "
            f"other {other} {'is' if other == '1' else 'are'} −inf: directions that some step maps to zero within "
            "roundoff (|R_jj| ≤ S·eps·‖J_t‖_F)."
        )
    details = {
        "per_sequence": [json_number(v) for v in per_sequence],
        "stderr": [json_number(v) for v in result.stderr[:, 0].tolist()],
        "positive": positive,
        "negative": negative,
        "steps": steps,
        "short": short,
        "rank": ranks,
        "exponents_followed": k,
    }
    return Finding("lyapunov", result.recurrence, text, median, details)


def _lyapunov_meaning(exponent: float, rank: int) -> str:
    """What λ₁ says about perturbations of the state (e-folding time 1/|λ₁|)."""
    if exponent == -math.inf:
        if rank == 0:
            return "some step maps every perturbation to zero, within roundoff (a zero Jacobian product)"
        return "some step maps the first direction followed to zero, within roundoff (a singular Jacobian)"
    if exponent < 0:
        return f"perturbations of the state shrink by a factor e every {-1 / exponent:.1f} steps"
    if exponent > 0:
        return f"perturbations grow by a factor e every {1 / exponent:.1f} steps (chaotic or exploding)"
    return "perturbations neither grow nor shrink"


def _span(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low} to {high}"


def _blocking_findings(result: Blocking, dtype: str) -> list[Finding]:
    """The most severe event, per loss: the gain ‖ā J‖/‖ā‖ of the later losses' adjoint, the largest share
    ‖G_across‖/‖G‖ over the blocks (a ratio of norms, above 1 when G_across and G − G_across partly cancel), and
    the smallest ‖G‖."""
    if not result.events:
        text = f"no Jacobian row falls below {result.tol:g} at any step: nothing blocks the flow."
        return [Finding("blocking", "all", text, 0.0, {"tol": result.tol})]
    event = result.events[0]
    losses, shares = [], False
    for loss in result.losses:
        parts = event.parts[loss]
        if event.underflow[loss]:
            losses.append(
                f"{loss}: the later losses' adjoint underflows to 0 in {dtype} before it reaches the step; trace in "
                "float64 (model.to(torch.float64)) to see what crosses it"
            )
            continue
        if math.isnan(event.transmission[loss]):
            losses.append(
                f"{loss}: no credit from later losses reaches it (no loss lies at or after it, or a later step "
                "already cuts all of it), so it cuts nothing more"
            )
            continue
        widest = max(parts, key=lambda block: _across_share(parts[block]))
        across = _across_share(parts[widest])
        cancel = (
            " — above 1, as that part and the rest of the gradient partly cancel" if across > 1 + CANCELLATION else ""
        )
        shares, smallest = True, min(parts, key=lambda block: parts[block]["total"])
        remain = (
            f"the gradients remain (smallest ‖∂L/∂{smallest}‖ = {parts[smallest]['total']:.3g})"
            if parts[smallest]["total"] > 0
            else f"{smallest} gets no gradient from this sequence at all"
        )
        losses.append(
            f"{loss}: the later losses' adjoint crosses it with gain {event.transmission[loss]:.2g}; the credit it "
            f"carries to earlier source steps is at most ‖G_across‖/‖G‖ = {across:.2g} (for {widest}){cancel}; and "
            f"{remain}"
        )
    text = (
        f"{_count(result.total_events, 'step')} (counted once per sequence) have Jacobian rows below "
        f"{result.tol:g}. The most severe, step index "
        f"{event.step} of sequence {event.sequence} ({len(event.rows)} row(s), ‖J‖_F = {event.jacobian_norm:.2g}): "
        + "; ".join(losses)
        + "."
    )
    if shares:
        text += (
            " ‖G_across‖/‖G‖ is a ratio of norms: the part of a block's gradient that credits source steps before "
            "that step, over the whole gradient."
        )
    return [Finding("blocking", event.recurrence, text, float(result.total_events), result.to_dict())]


def _across_share(parts: dict[str, float]) -> float:
    """‖G_across‖ / ‖G‖ for one block (0 for a block without gradient)."""
    return parts["across"] / parts["total"] if parts["total"] > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# A whole data set


def dataset_explanation_of(dataset: DatasetAnalysis) -> Explanation:
    """The findings about a whole data set from its pooled statistics (module docstring), in the order of one
    batch's findings."""
    findings = []
    for part in dataset.recurrences:
        if part.regimes is not None:
            findings += [_regime_finding(part.regimes), _timescale_finding(part.regimes)]
        if part.horizons is not None:
            findings.append(_horizon_distribution_finding(part.horizons, dataset.steps))
        if part.local is not None:
            findings.append(_local_finding(part.local))
        if part.lyapunov is not None:
            findings.append(_lyapunov_mean_finding(part.lyapunov))
    order = ["regimes", "timescales", "horizon", "local gradients", "lyapunov"]
    findings.sort(key=lambda f: order.index(f.topic))
    return Explanation(model=dataset.model, findings=findings)


def _horizon_distribution_finding(result: PooledHorizons, steps: int) -> Finding:
    """The median horizon over the sequences, its 5–95 % and quartile range, and how many sequences reach eps;
    a quantile beyond the sequences that reach eps is "longer than any lag computed" (∞)."""
    summary = result.summary()
    count, reached, eps = summary["sequences"], summary["reached"], result.eps
    within = f"within max_lag = {result.max_lag} lags of their own last step (or their length, if shorter)"
    if reached == 0:
        text = f"‖∂h_T/∂h_(T−ℓ)‖ stays above {eps:g} at every lag of all {count} sequences {within}: no vanishing"
        if steps < SHORT_TRACE:
            text += f"; with fewer than {SHORT_TRACE} steps the trace is too short to say whether it vanishes later"
        return Finding("horizon", result.recurrence, text + ".", None, {"eps": eps, **_json_summary(summary)})

    def lag(value: float) -> str:
        return f"> {result.max_lag}" if math.isinf(value) else f"{value:.0f}"

    median = summary["median"]
    if math.isinf(median):
        text = (
            f"fewer than half of the {count} sequences ({reached}) have ‖∂h_T/∂h_(T−ℓ)‖ fall below {eps:g} {within}: "
            f"the median horizon is longer than that"
        )
    else:
        text = (
            f"‖∂h_T/∂h_(T−ℓ)‖ falls below {eps:g} after a median of ℓ = {median:.0f} steps from each sequence's own "
            f"last step, over {count} sequences (quartiles {lag(summary['p25'])}–{lag(summary['p75'])}, 5–95 % "
            f"{lag(summary['p05'])}–{lag(summary['p95'])}); {reached} of {count} reach it {within}"
        )
    value = None if math.isinf(median) else median
    return Finding("horizon", result.recurrence, text + ".", value, {"eps": eps, **_json_summary(summary)})


def _json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {name: json_number(value) if isinstance(value, float) else value for name, value in summary.items()}


def _lyapunov_mean_finding(result: PooledLyapunov) -> Finding:
    """λ₁ (the first direction's exponent) as mean ± standard error over the sequences where it is finite, and over
    the batches; how many sequences have λ₁ > 0 and < 0, their range, whether the estimate is short, and how many
    sequences have −inf exponents among the k followed."""
    largest = result.exponents[:, 0]
    count, batches, k = len(largest), len(result.batch_edges) - 1, result.exponents.shape[1]
    mean, stderr = float(result.mean[0]), float(result.stderr[0])
    positive, negative = int((largest > 0).sum()), int((largest < 0).sum())
    if math.isnan(mean):
        text = f"λ₁ is −inf on all {count} sequences: {_lyapunov_meaning(-math.inf, int(result.rank.max()))}."
    else:
        spread = f" ± {stderr:.2g}" if not math.isnan(stderr) else ""
        over_batches = ""
        if batches > 1:
            batch_error = float(result.batch_stderr[0])
            error = f" ± {batch_error:.2g}" if not math.isnan(batch_error) else ""
            over_batches = f"; over the {batches} batches {float(result.batch_mean[0]):.3g}{error}"
        finite = largest[largest.isfinite()]
        text = (
            f"the top Lyapunov exponent λ₁ is {mean:.3g}{spread} per step (mean ± standard error over {count} "
            f"sequences{over_batches}): at the mean, {_lyapunov_meaning(mean, k)}; {positive} of {count} sequences "
            f"have λ₁ > 0, {negative} have λ₁ < 0 (range {float(finite.min()):.3g} to {float(finite.max()):.3g})."
        )
    counted = result.counted
    fewest, most = int(counted.min()), int(counted.max())
    short = fewest < SHORT_TRACE
    over = _count(most, "step") if fewest == most else f"{fewest} to {most} steps per sequence"
    text += f" Estimated over {over} from h_0 with no warm-up" + (
        f": a short estimate (under {SHORT_TRACE} steps) that includes the transient from the initial state." if short
        else "."
    )  # fmt: skip
    deficient = int((result.rank < k).sum())
    if deficient:
        text += (
            f" On {deficient} of {count} sequences some of the {k} exponents followed are −inf: directions that some "
            "step maps to zero within roundoff (|R_jj| ≤ S·eps·‖J_t‖_F)."
        )
    details = {
        "mean": json_number(mean),
        "stderr": json_number(stderr),
        "batch_mean": json_number(float(result.batch_mean[0])),
        "batch_stderr": json_number(float(result.batch_stderr[0])),
        "sequences": count,
        "batches": batches,
        "positive": positive,
        "negative": negative,
        "rank_deficient": deficient,
        "exponents_followed": k,
        "short": short,
    }
    return Finding("lyapunov", result.recurrence, text, json_number(mean), details)
