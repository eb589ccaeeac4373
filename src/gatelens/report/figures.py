"""Figures of the analyses: one function per figure, each taking analysis results and returning a matplotlib Figure.

Figures are built with ``Figure(...)`` directly (no pyplot: no global state, no display needed); :func:`to_png`
renders one to PNG bytes. They are 9 inches wide, 900 pixels at the default 100 dpi. Time axes are in the steps
of docs/notation.md, t = 1..T (array index i + 1; a reverse direction in its own processing order), lags in steps,
Lyapunov exponents in nats per step.

    jacobian_figure          top: ‖J_t‖₂ = σ_max(∂h_t/∂h_{t−1}) per step, the median over the sequences and the band
                             between their 10th and 90th percentiles (padded steps left out); bottom: each path's
                             share ‖P_p‖_F / Σ_q ‖P_q‖_F of J_t = Σ_p P_p, the mean over the sequences, stacked; at
                             every step, or at JACOBIAN_STEPS evenly spaced steps of a longer trace (fewer, at least
                             8, where their matrices would exceed JACOBIAN_ELEMENTS entries; the title says so)
    credit_heatmap           ‖C(t, k)‖_F, C(t, k) = g_t J_t ⋯ J_{k+1} ∂⁺h_k/∂θ, loss step t (rows) × source step k
                             (columns), one panel per weight block on one log colour scale spanning at most
                             DYNAMIC_RANGE; zero entries (every k > t among them) are left blank
    lag_profile              left: ‖Σ_{t−k=τ} C(t, k)‖_F per block against the lag τ (log scale); right, with a
                             Propagation: ln‖∂h_t/∂h_{t−ℓ}‖₂ against ℓ per anchor t (median and 10–90 % band over the
                             sequences), the line ln ε, and the horizon: the first lag at which the median is below it
    regime_map               the regime of every memory unit (rows) at every step (columns) of one sequence: carry
                             c > hi, blocked c < lo and a < lo, elman c < lo and a > hi, mixed otherwise
    unit_timescales          τ_j = 1 / (1 − c̄_j) per unit, sorted, coloured by kind, with the long-term (τ ≥ long_term)
                             and short-term (τ ≤ short_term) bounds
    local_gradients_figure   per model, the largest ‖∂⁺h_k/∂θ‖_F over the sequences at every step k (θ: all weight
                             blocks together, ``LocalGradients.total``), and the distribution of that norm over every
                             valid (step, sequence)
    lyapunov_spectrum        per model, λ_1 ≥ λ_2 ≥ … : each sequence's exponents sorted, then averaged over the
                             sequences weighted by their counted steps n_b, with ± the standard error
                             √(Σ_b (n_b/N)² se_b²), N = Σ_b n_b; a line at 0

Value axes are logarithmic where the values span at least a decade (a credit heatmap's colours always are). The
two figures that compare models take a mapping from names to results (or one result, named by its recurrence).
Every function checks its arguments once and raises a TypeError or ValueError naming what it expected.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from torch import Tensor

from gatelens.analysis.credit import CreditMap
from gatelens.analysis.local import LocalGradients
from gatelens.analysis.lyapunov import Lyapunov
from gatelens.analysis.norms import spectral_norm, starting_basis
from gatelens.analysis.propagation import Propagation
from gatelens.analysis.regimes import PADDING, REGIMES, UNIT_KINDS, Regimes
from gatelens.trace import Recurrence, Trace

WIDTH = 9.0  # inches: 900 px at DPI
DPI = 100
BAND = (0.1, 0.9)  # quantiles over the sequences shaded around the median
DYNAMIC_RANGE = 1e10  # a credit heatmap's colours span at most this ratio; smaller entries take the lowest colour
LABELLED_UNITS = 48  # up to this many units, the unit axes name every unit
CHUNK_ELEMENTS = 1 << 24  # elements of Jacobian paths formed at once (64 MiB in float32)
JACOBIAN_STEPS = 64  # steps of a longer trace at which jacobian_figure forms the Jacobians, evenly spaced
JACOBIAN_ELEMENTS = 1 << 31  # entries of Jacobians and paths it forms in all, at most (fewer steps for large states)
JACOBIAN_STEPS_AT_LEAST = 8
ZERO_PRODUCT = -1e300  # ln‖∂h_t/∂h_(t−ℓ)‖₂ of an exactly zero product (−inf), for the propagation quantiles

PALETTE = [*matplotlib.colormaps["tab20"].colors[0::2], *matplotlib.colormaps["tab20"].colors[1::2]]
LINESTYLES = ("-", "--", ":", "-.")
REGIME_COLOURS = {"carry": "#1f77b4", "blocked": "#d62728", "elman": "#ff7f0e", "mixed": "#c7c7c7"}
PADDING_COLOUR = "#ffffff"
KIND_COLOURS = {"long-term": "#1f77b4", "short-term": "#ff7f0e", "mixed": "#7f7f7f"}


# ---------------------------------------------------------------------------------------------------------------
# The figures.


def jacobian_figure(trace: Trace, *, layer: int | None = None, direction: str | None = None) -> Figure:
    """‖J_t‖₂ over the steps (median and 10–90 % band over the sequences), and each path's share of J_t, stacked.

    The share of path p at step t is ‖P_p‖_F / Σ_q ‖P_q‖_F (J_t = Σ_p P_p), averaged over the sequences. Padded
    steps (past a sequence's end) are left out of both panels, and steps whose Jacobian is 0 out of the shares.
    layer/direction choose the recurrence as in :meth:`Trace.recurrence`. On a trace longer than JACOBIAN_STEPS, the
    Jacobians of that many evenly spaced steps are drawn, fewer for a large state (:func:`drawn_steps`): forming all
    T would cost T · B · S² memory traffic and an S × S spectral norm each. ‖J_t‖₂ comes from
    :func:`~gatelens.analysis.norms.spectral_norm` (1e-6 relative), each sequence starting from its basis of the
    step drawn before.
    """
    _require(trace, Trace, "jacobian_figure", "a Trace (from model.trace(x))")
    rec = trace.recurrence(layer, direction)
    drawn = drawn_steps(rec)
    norms, shares = _jacobian_norms(rec, drawn)
    steps = drawn + 1
    figure = Figure(figsize=(WIDTH, 6.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)

    low, median, high = _quantiles(norms)
    top.fill_between(steps, low, high, color=PALETTE[0], alpha=0.25, linewidth=0, label="10–90 % of sequences")
    top.plot(steps, median, color=PALETTE[0], label="median over sequences")
    top.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="‖J_t‖₂ = 1")
    _log_scale(top, "y", norms)
    top.set_ylabel("‖∂h_t/∂h_(t−1)‖₂")
    at = f", at {len(drawn)} evenly spaced steps" if len(drawn) < rec.steps else ""
    top.set_title(f"Step Jacobians of {rec.name}{at}: spectral norm (below 1, the step shrinks every gradient)")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")

    names = list(shares)
    colours = _fill_colours(names)
    bottom.stackplot(steps, *(_mean_valid(shares[name]) for name in names), labels=names, colors=colours)
    bottom.set_ylim(0.0, 1.0)
    bottom.set_ylabel("share ‖P_p‖_F / Σ_q ‖P_q‖_F")
    bottom.set_xlabel(_step_label(rec.name))
    bottom.set_title("Share of each Jacobian path, mean over sequences")
    handles, labels = bottom.get_legend_handles_labels()  # top of the stack first, as it is drawn
    bottom.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    bottom.set_xlim(0.5, rec.steps + 0.5)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def credit_heatmap(credit_map: CreditMap, *, blocks: str | Sequence[str] | None = None) -> Figure:
    """‖C(t, k)‖_F for loss step t (rows) and source step k (columns), one panel per weight block.

    blocks: the block names to show (``"l0.W_iz"``, …; default: every block of the model). All panels share one
    log colour scale from the largest entry down to at most DYNAMIC_RANGE below it; zero entries are blank. A
    reverse direction's blocks are indexed in its own processing order, as the credit map holds them. A map
    restricted to some loss steps (``CreditMap.at_loss_steps``) draws those rows alone, each stretched over the
    steps around it (evenly spaced steps give even bands); on a reverse direction, whose rows are in processing
    order, the rows with any credit are drawn.
    """
    _require(credit_map, CreditMap, "credit_heatmap", "a CreditMap (from gl.credit)")
    chosen = _blocks(credit_map, blocks, "credit_heatmap")
    steps = len(credit_map.out_grads)
    rows_of = {name: credit_map.norm_rows[name] for name in chosen}
    drawn = np.arange(steps)
    if credit_map.loss_steps is not None:  # the rows kept, or on a reverse direction the rows it reaches
        drawn = np.unique(np.concatenate([_numpy(loss_steps) for loss_steps, _ in rows_of.values()]))
        drawn = drawn if drawn.size else np.arange(steps)
    position = {int(step): index for index, step in enumerate(drawn)}
    maps = {}
    for name, (loss_steps, values) in rows_of.items():
        maps[name] = np.zeros((drawn.size, steps))
        for step, row in zip(loss_steps.tolist(), _numpy(values)):
            maps[name][position[step]] = row
    spacing = (drawn[-1] - drawn[0]) / (drawn.size - 1) if drawn.size > 1 else 1.0
    top, bottom = drawn[0] + 1 - spacing / 2, drawn[-1] + 1 + spacing / 2  # 1-based steps, as on the axes
    rows = math.ceil(len(chosen) / 4)
    columns = math.ceil(len(chosen) / rows)
    figure = Figure(figsize=(WIDTH, rows * min(3.0, 8.0 / columns) + 0.9), layout="constrained")
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    axes = list(grid.flat[: len(chosen)])
    for extra in grid.flat[len(chosen) :]:
        extra.remove()

    positive = np.concatenate([values[values > 0] for values in maps.values()])
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(positive.min()), vmax / DYNAMIC_RANGE) if positive.size else vmax / 10
    norm = LogNorm(vmin=min(vmin, vmax / 10), vmax=vmax)  # at least one decade: a colour bar with ticks
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=PADDING_COLOUR)
    image = None
    for index, (ax, (name, values)) in enumerate(zip(axes, maps.items())):
        image = ax.imshow(
            np.ma.masked_where(~(values > 0), values),  # zero (and NaN) entries: blank, not log(0)
            norm=norm,
            cmap=cmap,
            interpolation="nearest",
            extent=(0.5, steps + 0.5, bottom, top),
            aspect="auto" if drawn.size < steps else "equal",
        )
        ax.set_title(name, fontsize="medium")
        outer_x, outer_y = index + columns >= len(chosen), index % columns == 0  # no panel below, or to the left
        ax.tick_params(labelbottom=outer_x, labelleft=outer_y)
        ax.set_xlabel("source step k" if outer_x else "")
        ax.set_ylabel("loss step t" if outer_y else "")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if not (values > 0).any():
            ax.text(0.5, 0.5, "no credit", transform=ax.transAxes, ha="center", va="center", color="grey")
    extend = "min" if positive.size and float(positive.min()) < norm.vmin else "neither"
    figure.colorbar(image, ax=axes, label="‖C(t, k)‖_F", extend=extend, shrink=0.9)
    reverse = any(name.split(".")[0].endswith("_reverse") for name in chosen)
    own_order = "\n(steps of a reverse direction in its own processing order)" if reverse else ""
    figure.suptitle(f"Credit map: contribution of source step k to the loss at step t, per weight block{own_order}")
    return figure


def lag_profile(
    credit_map: CreditMap,
    propagation: Propagation | None = None,
    *,
    blocks: str | Sequence[str] | None = None,
    eps: float = 1e-3,
) -> Figure:
    """‖Σ_{t−k=τ} C(t, k)‖_F per block against the lag τ; with ``propagation``, ln‖∂h_t/∂h_{t−ℓ}‖₂ against ℓ.

    blocks: as for :func:`credit_heatmap` (default: every block). The horizon marked on the right is the first lag
    at which the median over the sequences of ‖∂h_t/∂h_{t−ℓ}‖₂ falls below eps (0 < eps < inf); an exactly zero
    product (ln = −inf, e.g. across a step whose gates are clamped shut) counts as below every eps and is not drawn.
    """
    _require(credit_map, CreditMap, "lag_profile", "a CreditMap (from gl.credit)")
    if propagation is not None:
        _require(propagation, Propagation, "lag_profile", "a Propagation (from gl.propagation) or None")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    chosen = _blocks(credit_map, blocks, "lag_profile")
    figure = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2) if propagation is not None else (figure.subplots(), None)

    profiles = {name: _numpy(credit_map.by_lag[name]) for name in chosen}
    for name, (colour, group) in zip(chosen, _line_styles(chosen)):
        values = profiles[name]
        left.plot(np.arange(values.size), np.where(values > 0, values, np.nan), color=colour, label=name, **group)
    _log_scale(left, "y", *profiles.values())
    left.set_xlabel("lag τ = t − k (steps)")
    left.set_ylabel("‖Σ_(t−k=τ) C(t, k)‖_F")
    left.set_title("Credit by time lag, per weight block", fontsize="medium")
    left.legend(fontsize="x-small", ncols=1 if len(chosen) <= 8 else 2)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    if right is not None:
        _propagation_panel(right, propagation, eps)  # type: ignore[arg-type]
    return figure


def regime_map(regimes: Regimes, *, sequence: int = 0) -> Figure:
    """The regime of every memory unit (rows) at every step (columns) of one sequence, in categorical colours.

    The legend gives each regime's share of this sequence's valid unit-steps; steps past its end are white.
    """
    _require(regimes, Regimes, "regime_map", "a Regimes (from gl.regimes)")
    batch = regimes.codes.shape[1]
    if isinstance(sequence, (bool, np.bool_)) or not isinstance(sequence, (int, np.integer)):
        raise TypeError(f"sequence must be an int, got {sequence!r}")
    if not 0 <= sequence < batch:
        raise ValueError(f"sequence must lie in 0..{batch - 1} (the batch has {batch} sequences), got {sequence}")
    codes = regimes.codes[:, int(sequence), :].T.cpu().numpy().astype(np.int16)  # (U, T)
    units, steps = codes.shape
    figure = Figure(figsize=(WIDTH, min(9.0, max(3.0, 1.4 + 0.2 * units))), layout="constrained")
    ax = figure.subplots()
    colours = [PADDING_COLOUR, *(REGIME_COLOURS[name] for name in REGIMES)]  # codes −1 (padding), 0..3
    ax.imshow(
        codes,
        cmap=ListedColormap(colours),
        norm=BoundaryNorm(np.arange(PADDING - 0.5, len(REGIMES)), len(colours)),
        interpolation="nearest",
        aspect="auto",
        extent=(0.5, steps + 0.5, units - 0.5, -0.5),
    )
    valid = max(int((codes != PADDING).sum()), 1)
    handles = [
        Patch(facecolor=REGIME_COLOURS[name], edgecolor="grey", label=f"{name} ({(codes == code).sum() / valid:.0%})")
        for code, name in enumerate(REGIMES)
    ]
    if (codes == PADDING).any():
        handles.append(Patch(facecolor=PADDING_COLOUR, edgecolor="grey", label="past the end"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="regime")
    _unit_axis(ax.yaxis, regimes.unit_labels)
    ax.set_ylabel("memory unit")
    ax.set_xlabel(_step_label(regimes.recurrence))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = regimes.thresholds
    ax.set_title(
        f"Gate regimes of {regimes.recurrence}, sequence {sequence} (carry c > {hi:g}; blocked c, a < {lo:g}; "
        f"elman c < {lo:g}, a > {hi:g})",
        fontsize="medium",
    )
    return figure


def unit_timescales(regimes: Regimes) -> Figure:
    """τ_j = 1 / (1 − c̄_j) per unit, sorted from the longest, coloured by kind, with the two label bounds.

    Units with τ = ∞ (c̄ = 1) are marked by triangles at the top of the axes.
    """
    _require(regimes, Regimes, "unit_timescales", "a Regimes (from gl.regimes)")
    tau = _numpy(regimes.timescale)
    order = np.argsort(-tau, kind="stable")  # infinite first
    ranks = np.arange(1, tau.size + 1)
    kinds = np.array(regimes.unit_kind)[order]
    sorted_tau = tau[order]
    figure = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = figure.subplots()
    finite = np.isfinite(sorted_tau)
    for kind in UNIT_KINDS:
        chosen = (kinds == kind) & finite
        if chosen.any():
            label = f"{kind} ({int((kinds == kind).sum())})"
            ax.plot(ranks[chosen], sorted_tau[chosen], "o", color=KIND_COLOURS[kind], label=label)
    if not finite.all():
        ax.plot(
            ranks[~finite],
            np.full(int((~finite).sum()), 0.97),
            "^",
            color=KIND_COLOURS["long-term"],
            transform=ax.get_xaxis_transform(),  # x in data, y in axes coordinates: at the top
            label=f"τ = ∞ ({int((~finite).sum())})",
        )
    for bound, style, kind in ((regimes.long_term, "--", "long"), (regimes.short_term, ":", "short")):
        ax.axhline(bound, color="black", linestyle=style, linewidth=0.8, label=f"{kind}-term bound τ = {bound:g}")
    ax.set_yscale("log")
    top = 2.0 * max([regimes.long_term, *sorted_tau[finite].tolist()])
    ax.set_ylim(0.8, top)  # τ ≥ 1 always
    if top < 800:
        _plain_ticks(ax.yaxis)
    ax.set_xlim(0.3, tau.size + 0.7)
    _unit_axis(ax.xaxis, [regimes.unit_labels[j] for j in order], positions=ranks)
    ax.set_xlabel("memory unit, sorted by τ")
    ax.set_ylabel("τ = 1 / (1 − mean carry) (steps)")
    ax.set_title(
        f"Unit timescales of {regimes.recurrence}: long-term τ ≥ {regimes.long_term:g}, short-term τ ≤ "
        f"{regimes.short_term:g}",
        fontsize="medium",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="kind (units)")
    return figure


def local_gradients_figure(named: Mapping[str, LocalGradients] | LocalGradients) -> Figure:
    """Per model, the largest ‖∂⁺h_k/∂θ‖_F over the sequences at every step k, and its distribution.

    θ is every weight block together (``LocalGradients.total``). named: results by model name (one or several),
    or one result. The distribution is over every valid (step, sequence), on bins shared by the models
    (logarithmic where the values span a decade); zeros are not binned but counted in the legend.
    """
    models = _named(named, LocalGradients, "local_gradients_figure", "LocalGradients (from gl.local_gradients)")
    totals = {name: _numpy(result.total) for name, result in models.items()}  # (T, B), NaN on padded steps
    figure = Figure(figsize=(WIDTH, 4.0), layout="constrained")
    over_time, spread = figure.subplots(1, 2, width_ratios=(3, 2))
    values = {name: total[~np.isnan(total)] for name, total in totals.items()}
    positive = np.concatenate([v[v > 0] for v in values.values()])
    edges = _bins(positive)
    for index, (name, total) in enumerate(totals.items()):
        colour = PALETTE[index % len(PALETTE)]
        over_time.plot(np.arange(1, total.shape[0] + 1), _max_valid(total), color=colour, label=name)
        if edges is not None:
            shown = values[name][values[name] > 0]
            zeros = values[name].size - shown.size
            shares = np.histogram(shown, bins=edges)[0] / max(values[name].size, 1)
            label = f"{name} ({zeros} zero)" if zeros else name
            spread.stairs(shares, edges, color=colour, linewidth=1.5, label=label)
    _log_scale(over_time, "y", *totals.values())
    over_time.set_xlabel("step k")
    over_time.set_ylabel("max over sequences of ‖∂⁺h_k/∂θ‖_F")
    over_time.set_title("Largest local gradient per step", fontsize="medium")
    over_time.legend(fontsize="small")
    over_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    if edges is not None:
        _log_scale(spread, "x", edges)
        spread.legend(fontsize="small")
    else:
        spread.text(0.5, 0.5, "no positive local gradient", transform=spread.transAxes, ha="center", va="center")
    spread.set_xlabel("‖∂⁺h_k/∂θ‖_F")
    spread.set_ylabel("share of (step, sequence) pairs")
    spread.set_title("Distribution over steps and sequences", fontsize="medium")
    return figure


def lyapunov_spectrum(named: Mapping[str, Lyapunov] | Lyapunov) -> Figure:
    """Per model, the exponents λ_1 ≥ λ_2 ≥ … in nats per step, with ± one standard error, and a line at 0.

    Each sequence's exponents are sorted, then averaged over the sequences weighted by their counted steps n_b;
    the bar is √(Σ_b (n_b/N)² se_b²), N = Σ_b n_b (no bar where a sequence's standard error is undefined: fewer
    than two windows).
    An exponent of −∞ (a singular Jacobian) cannot be drawn and is counted in the legend. named: results by model
    name (one or several), or one result.
    """
    models = _named(named, Lyapunov, "lyapunov_spectrum", "Lyapunov results (from gl.lyapunov)")
    figure = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = figure.subplots()
    widest = 1
    for index, (name, result) in enumerate(models.items()):
        mean, error = _spectrum(result)
        finite = np.isfinite(mean)
        label = name if finite.all() else f"{name} ({int((~finite).sum())} at −∞)"
        ax.errorbar(
            np.arange(1, mean.size + 1),
            np.where(finite, mean, np.nan),
            yerr=error,  # NaN: no bar
            color=PALETTE[index % len(PALETTE)],
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.2,
            label=label,
        )
        widest = max(widest, mean.size)
    ax.set_xlim(0.5, widest + 0.5)
    exponent_axes(
        ax, "index j (exponents sorted, largest first)",
        "Lyapunov spectrum (below 0: perturbations and gradients decay at that rate)",
    )  # fmt: skip
    return figure


def exponent_axes(ax: Any, xlabel: str, title: str) -> None:
    """The frame of a Lyapunov figure: the zero line, integer exponent indices, the labels and the legend."""
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("λ_j (nats/step)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")


def to_png(figure: Figure, dpi: float = DPI) -> bytes:
    """The figure rendered to PNG bytes with matplotlib's Agg renderer (9-inch figures: 900 px at 100 dpi)."""
    _require(figure, Figure, "to_png", "a matplotlib Figure")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float, np.integer, np.floating)) or not 0 < dpi < math.inf:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# What the figures compute.


def drawn_steps(rec: Recurrence) -> np.ndarray:
    """The steps :func:`jacobian_figure` forms: all, or JACOBIAN_STEPS evenly spaced ones, fewer (at least
    JACOBIAN_STEPS_AT_LEAST) where the Jacobians and paths of that many, B · S² · (paths + 1) entries each, would
    exceed JACOBIAN_ELEMENTS: 11 steps for a 2-layer LSTM with H = 256 and B = 16, 64 for the GRU of that size."""
    batch, size = rec.states.shape[1:]
    per_step = batch * size * size * (len(rec.cell.path_names) + 1)
    count = min(rec.steps, max(JACOBIAN_STEPS_AT_LEAST, min(JACOBIAN_STEPS, JACOBIAN_ELEMENTS // per_step)))
    return np.unique(np.linspace(0, rec.steps - 1, count).round().astype(int))


def _jacobian_norms(rec: Recurrence, drawn: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """‖J_t‖₂ (steps, B) and each path's share ‖P_p‖_F / Σ_q ‖P_q‖_F (steps, B) at the step indices ``drawn``,
    float64; NaN on padded steps, and the shares also where J_t = 0. A chunk of steps at a time, so the paths of
    all of them are never held at once."""
    batch, size = rec.states.shape[1:]
    names = rec.cell.path_names
    chunk = max(1, CHUNK_ELEMENTS // (batch * size * size * (len(names) + 2)))
    basis = starting_basis(size, rec.states.dtype, rec.states.device)
    norms, flows = [], []
    for first in range(0, len(drawn), chunk):
        window = torch.as_tensor(drawn[first : first + chunk])
        norm, reached = spectral_norm(rec.jacobians(steps=window), basis)
        basis = reached[-1]  # each sequence's next steps start from its last one's basis: their J are alike
        norms.append(norm)
        paths = rec.jacobian_paths(steps=window)  # its "padding" path is not read: padded steps are left out
        flows.append(torch.stack([torch.linalg.matrix_norm(paths[name]) for name in names]))  # (P, C, B)
    norm, flow = _numpy(torch.cat(norms)), _numpy(torch.cat(flows, dim=1))
    total = flow.sum(0)
    valid = np.ones(norm.shape, dtype=bool) if rec.mask is None else rec.mask.cpu().numpy()[drawn]
    shares = np.divide(flow, total, out=np.full_like(flow, np.nan), where=valid & (total > 0))
    return np.where(valid, norm, np.nan), dict(zip(names, shares))


def _spectrum(result: Lyapunov) -> tuple[np.ndarray, np.ndarray]:
    """The exponents :func:`lyapunov_spectrum` draws for one result: (mean, standard error), (k,) each, float64."""
    exponents, stderr = _numpy(result.exponents), _numpy(result.stderr)  # (B, k)
    order = np.argsort(-exponents, axis=1, kind="stable")
    exponents = np.take_along_axis(exponents, order, axis=1)
    stderr = np.take_along_axis(stderr, order, axis=1)
    counted = result.counted.cpu().numpy().astype(np.float64)
    weights = counted / counted.sum() if counted.sum() > 0 else counted
    used = weights > 0  # a sequence with no counted step has NaN exponents
    mean = (weights[used, None] * exponents[used]).sum(0) if used.any() else np.full(exponents.shape[1], np.nan)
    error = np.sqrt((weights[used, None] ** 2 * stderr[used] ** 2).sum(0)) if used.any() else mean
    return mean, error


def _propagation_panel(ax: Axes, propagation: Propagation, eps: float) -> None:
    """ln‖∂h_t/∂h_{t−ℓ}‖₂ against ℓ per anchor (median and band over the sequences), ln ε and the horizons."""
    log_norm = _numpy(propagation.log_norm)  # (A, T+1, B): −inf for an exactly zero product
    lags = np.arange(log_norm.shape[1])
    threshold = math.log(eps)
    for index, anchor in enumerate(propagation.anchors.tolist()):
        colour = PALETTE[index % len(PALETTE)]
        # −inf stands in as ZERO_PRODUCT, so quantiles stay defined; what falls that low is not drawn
        low, median, high = _quantiles(np.where(np.isneginf(log_norm[index]), ZERO_PRODUCT, log_norm[index]))
        low, shown, high = (np.where(q > ZERO_PRODUCT / 10, q, np.nan) for q in (low, median, high))
        ax.fill_between(lags, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.plot(lags, shown, color=colour, label=f"median, t = {anchor + 1}")
        below = np.flatnonzero(median < threshold)  # NaN (no such lag) compares False
        if below.size:
            ax.axvline(below[0], color=colour, linestyle=":", label=f"horizon ℓ = {below[0]} (t = {anchor + 1})")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"ln ε (ε = {eps:g})")
    ax.set_xlabel("lag ℓ (steps)")
    ax.set_ylabel("ln ‖∂h_t/∂h_(t−ℓ)‖₂")
    ax.set_title(f"Propagation in {propagation.recurrence} (band: 10–90 % of sequences)", fontsize="medium")
    ax.legend(fontsize="x-small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _quantiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The BAND quantiles and the median over the sequences of (T, B) values, ignoring NaN: (T,) each, NaN for a
    step with no value (torch's nanquantile, which unlike numpy's does not warn there)."""
    quantiles = torch.tensor([BAND[0], 0.5, BAND[1]], dtype=torch.float64)
    low, median, high = torch.nanquantile(torch.from_numpy(values), quantiles, dim=1).numpy()
    return low, median, high


def _mean_valid(values: np.ndarray) -> np.ndarray:
    """Mean over the sequences of (T, B) values, ignoring NaN; NaN for a step with no value."""
    valid = ~np.isnan(values)
    count = valid.sum(1)
    return np.divide(np.where(valid, values, 0.0).sum(1), count, out=np.full(count.shape, np.nan), where=count > 0)


def _max_valid(values: np.ndarray) -> np.ndarray:
    """Max over the sequences of (T, B) values, ignoring NaN; NaN for a step with no value."""
    largest = np.where(np.isnan(values), -np.inf, values).max(1)
    return np.where(np.isneginf(largest), np.nan, largest)


def _bins(values: np.ndarray, bins: int = 30) -> np.ndarray | None:
    """Bin edges from the least to the largest of positive values, logarithmic if they span a decade (as the axis
    :func:`_log_scale` gives them), else linear; None if there are no values."""
    if not values.size:
        return None
    low, high = float(values.min()), float(values.max())
    if high <= low * 1.0001:
        low, high = low / 1.5, high * 1.5
    return (np.geomspace if high >= 10 * low else np.linspace)(low, high, bins + 1)


# ---------------------------------------------------------------------------------------------------------------
# Checks and drawing helpers.


def _require(value: Any, kind: type, function: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{function} needs {expected}, got {type(value).__name__}")


def _named(named: Any, kind: type, function: str, expected: str) -> dict[str, Any]:
    """``{name: result}`` from a mapping of results (non-empty, string keys) or one result (named by recurrence)."""
    if isinstance(named, kind):
        return {named.recurrence: named}
    if not isinstance(named, Mapping):
        raise TypeError(f"{function} needs a mapping from model names to {expected}, got {type(named).__name__}")
    if not named:
        raise ValueError(f"{function} needs at least one model: a mapping from names to {expected}, got an empty one")
    for name, value in named.items():
        if not isinstance(name, str):
            raise TypeError(f"{function} needs model names that are strings, got {name!r}")
        if not isinstance(value, kind):
            raise TypeError(f"{function} needs {expected} for every model; {name!r} is a {type(value).__name__}")
    return dict(named)


def _blocks(credit_map: CreditMap, blocks: Any, function: str) -> list[str]:
    """The chosen block names, checked against the model's (default: all of them, in the model's order)."""
    available = list(credit_map.trace.model.weights)
    if blocks is None:
        return available
    chosen = [blocks] if isinstance(blocks, str) else blocks
    if not isinstance(chosen, Sequence) or not all(isinstance(name, str) for name in chosen):
        raise TypeError(f"{function}: blocks must be a block name or a list of them, got {blocks!r:.80}")
    if not chosen:
        raise ValueError(f"{function}: blocks is empty; choose from {', '.join(available)}")
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(
            f"{function}: unknown weight block {', '.join(map(repr, unknown))}; this model's blocks are "
            f"{', '.join(available)}"
        )
    return list(dict.fromkeys(chosen))


def _numpy(values: Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array (exact for float32 values)."""
    return values.detach().to("cpu", torch.float64).numpy()


def _log_scale(ax: Axes, which: str, *values: np.ndarray) -> None:
    """A log scale on axis ``which`` ("x" or "y") for values spanning at least a decade, with plain 1-2-5 tick
    labels up to three decades; linear for a narrower span, or when nothing is positive (matplotlib warns on a log
    axis with nothing to show)."""
    positive = np.concatenate([v[(v > 0) & np.isfinite(v)] for v in values])
    if not positive.size or positive.max() < 10 * positive.min():
        return
    getattr(ax, f"set_{which}scale")("log")
    if positive.max() < 1000 * positive.min():
        _plain_ticks(ax.xaxis if which == "x" else ax.yaxis)


def _plain_ticks(axis: Any) -> None:
    """Log-axis ticks at 1, 2 and 5 times powers of ten, labelled as plain numbers (0.2, 5, 10)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _step_label(recurrence: str) -> str:
    own_order = " (the reverse direction's processing order)" if recurrence.endswith("_reverse") else ""
    return f"step t{own_order}"


def _unit_axis(axis: Any, labels: list[str], positions: np.ndarray | None = None) -> None:
    """Name every unit on the axis when there are few enough, else integer ticks."""
    if len(labels) > LABELLED_UNITS:
        axis.set_major_locator(MaxNLocator(integer=True))
        return
    ticks = np.arange(len(labels)) if positions is None else positions
    axis.set_ticks(ticks, labels, fontsize="x-small" if len(labels) > 16 else "small")
    if positions is not None and len(labels) > 16:
        axis.set_tick_params(rotation=90)


def _groups(names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Per name, the index of its base (after the last "."; carry, W_hz, …) and of its prefix (l0, l1, …)."""
    prefixes, bases = zip(*(name.rpartition(".")[::2] for name in names))
    base_index = {base: index for index, base in enumerate(dict.fromkeys(bases))}
    prefix_index = {prefix: index for index, prefix in enumerate(dict.fromkeys(prefixes))}
    return [base_index[base] for base in bases], [prefix_index[prefix] for prefix in prefixes]


def _fill_colours(names: Sequence[str]) -> list[tuple[float, float, float]]:
    """A colour per base name, lighter for each later prefix (layer) of a stack."""
    bases, prefixes = _groups(names)
    layers = max(prefixes) + 1
    colours = []
    for base, prefix in zip(bases, prefixes):
        colour = np.array(to_rgb(PALETTE[base % len(PALETTE)]))
        colours.append(tuple(colour + (1 - colour) * 0.55 * prefix / max(layers - 1, 1)))
    return colours


def _line_styles(names: Sequence[str]) -> list[tuple[Any, dict[str, str]]]:
    """A colour per base name and a line style per prefix (layer, direction)."""
    bases, prefixes = _groups(names)
    return [
        (PALETTE[base % len(PALETTE)], {"linestyle": LINESTYLES[prefix % len(LINESTYLES)]})
        for base, prefix in zip(bases, prefixes)
    ]
