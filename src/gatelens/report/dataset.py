"""The report of a whole data set (:func:`gatelens.analyze_dataset`): ``results.json``, one PNG per figure and
``report.html``, the findings first; the figures read the pooled statistics only (no per-step array survives the
batches):

    timescales        per recurrence, τ_j = 1 / (1 − c̄_j) per unit from the pooled gate means, sorted, coloured by
                      kind, with the long- and short-term bounds; beside it the regime census by unit
    horizons          per recurrence, the histogram of the sequences' own horizons h_b, one bar per lag, the
                      sequences that do not reach eps in one bar at the right, and the median
    local-gradients   per recurrence and weight block (and all blocks together), the median, p95 and max of
                      ‖∂⁺h_k/∂θ‖_F over every valid step of every sequence
    lyapunov          per recurrence, mean_j ± stderr_j over the sequences for each exponent j followed (the
                      columns of the QR method), and the batch means μ_ij as small dots
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gatelens.analysis.dataset import (
    DatasetAnalysis,
    PooledHorizons,
    PooledLocalGradients,
    PooledLyapunov,
    PooledRegimes,
)
from gatelens.analysis.regimes import REGIMES, UNIT_KINDS
from gatelens.report.figures import KIND_COLOURS, PALETTE, REGIME_COLOURS, WIDTH, exponent_axes, to_png
from gatelens.report.folder import write_results_and_figures
from gatelens.report.html import ReportFigure, write_report


def write_dataset_report(
    out: Path, dataset: DatasetAnalysis, *, results: dict[str, Any], title: str, notes: Sequence[str] = ()
) -> list[Path]:
    """Write ``results`` as results.json, the figures and report.html into ``out``; returns the files written."""
    entries = dataset_figures(dataset)
    files = write_results_and_figures(out, results, entries)
    summary = [
        ("data set", dataset.describe()),
        ("stages", ", ".join(dataset.stages) + " (credit and blocking are per batch: not pooled)"),
    ]
    files.append(
        write_report(
            out / "report.html",
            title=title,
            findings={dataset.name: dataset.explanation},
            figures=entries,
            summary=summary,
            notes=notes,
        )
    )
    return files


def dataset_figures(dataset: DatasetAnalysis) -> list[ReportFigure]:
    """Every figure of the data set's report whose stage was run, named, titled and captioned."""
    entries: list[ReportFigure] = []
    several = len(dataset.recurrences) > 1
    for part in dataset.recurrences:
        where = f" ({part.label})" if several else ""
        stem = f"{part.label}-" if several else ""

        def add(name: str, title: str, caption: str, figure: Figure) -> None:
            entries.append(ReportFigure(f"{stem}{name}", f"{title}{where}", caption, to_png(figure)))

        if part.regimes is not None:
            add(
                "timescales",
                "unit timescales and regimes over the data set",
                "Left: τ = 1/(1 − mean carry) per unit over every valid step of every sequence, sorted. Right: the "
                "share of steps each unit spends in each regime.",
                pooled_timescales(part.regimes),
            )
        if part.horizons is not None:
            add(
                "horizons",
                "gradient horizons of the sequences",
                "How many sequences have ‖∂h_T/∂h_(T−ℓ)‖₂ fall below eps first at each lag ℓ from their own last "
                "step; the right bar counts those that never do within the lags computed.",
                horizon_histogram(part.horizons),
            )
        if part.local is not None:
            add(
                "local-gradients",
                "local gradients over the data set",
                "Per weight block (and all together): the median, p95 and largest ‖∂⁺h_k/∂θ‖_F over every valid "
                "step of every sequence.",
                pooled_local_gradients(part.local),
            )
        if part.lyapunov is not None:
            add(
                "lyapunov",
                "Lyapunov exponents over the data set",
                "Each exponent's mean over the sequences ± its standard error; the dots are the batch means.",
                pooled_lyapunov(part.lyapunov),
            )
    return entries


def pooled_timescales(regimes: PooledRegimes) -> Figure:
    """τ_j per unit, sorted from the longest and coloured by kind, with the two label bounds; and the census by
    unit as stacked bars in the same order."""
    tau = regimes.timescale.numpy()
    order = np.argsort(-tau, kind="stable")
    kinds = np.array(regimes.unit_kind)[order]
    ranks = np.arange(1, tau.size + 1)
    figure = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    shown = np.where(np.isfinite(tau[order]), tau[order], np.nan)
    for kind in UNIT_KINDS:
        chosen = kinds == kind
        if chosen.any():
            left.plot(ranks[chosen], shown[chosen], "o", color=KIND_COLOURS[kind], label=f"{kind} ({chosen.sum()})")
    for bound, style in ((regimes.long_term, "--"), (regimes.short_term, ":")):
        left.axhline(bound, color="black", linestyle=style, linewidth=0.8)
    left.set_yscale("log")
    left.set_xlabel("memory unit, sorted by τ (∞ not drawn)")
    left.set_ylabel("τ = 1 / (1 − mean carry) (steps)")
    left.set_title(f"Timescales over {regimes.valid} valid steps", fontsize="medium")
    left.legend(fontsize="small")
    census = regimes.census_by_unit.numpy()[order]
    bottom = np.zeros(tau.size)
    for column, regime in enumerate(REGIMES):
        right.bar(ranks, census[:, column], bottom=bottom, width=1.0, color=REGIME_COLOURS[regime], label=regime)
        bottom += census[:, column]
    right.set_ylim(0, 1)
    right.set_xlabel("memory unit, in the same order")
    right.set_ylabel("share of valid steps")
    right.set_title("Regimes by unit", fontsize="medium")
    right.legend(fontsize="small")
    return figure


def horizon_histogram(horizons: PooledHorizons) -> Figure:
    """Sequences per horizon lag, the unreached ones in a bar at the right, and a line at the median."""
    counts = horizons.histogram.numpy()
    last = int(np.flatnonzero(counts).max()) if counts.any() else 0
    unreached = horizons.sequences - horizons.reached
    figure = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = figure.subplots()
    ax.bar(np.arange(last + 1), counts[: last + 1], width=1.0, color=PALETTE[0], label="reach eps at lag ℓ")
    if unreached:
        ax.bar(
            [last + 2], [unreached], width=1.0, color=PALETTE[3], label=f"not within the lags computed ({unreached})"
        )
    median = horizons.quantile(0.5)
    if np.isfinite(median):
        ax.axvline(median, color="black", linestyle="--", linewidth=0.8, label=f"median {median:.0f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("horizon ℓ from each sequence's own last step (steps)")
    ax.set_ylabel("sequences")
    ax.set_title(
        f"First lag with ‖∂h_T/∂h_(T−ℓ)‖₂ < {horizons.eps:g}, over {horizons.sequences} sequences", fontsize="medium"
    )
    ax.legend(fontsize="small")
    return figure


def pooled_local_gradients(local: PooledLocalGradients) -> Figure:
    """Median, p95 and max of the pooled local gradients per block and for all blocks together (log scale where
    they span a decade)."""
    summary = local.summary()
    names = list(summary)
    figure = Figure(figsize=(WIDTH, 0.8 + 0.32 * len(names) + 1.2), layout="constrained")
    ax = figure.subplots()
    rows = np.arange(len(names))[::-1]
    for statistic, marker, colour in (("median", "o", PALETTE[0]), ("p95", "s", PALETTE[1]), ("max", "^", PALETTE[3])):
        ax.plot([summary[name][statistic] for name in names], rows, marker, color=colour, label=statistic)
    values = np.array([summary[name][key] for name in names for key in ("median", "max")])
    positive = values[values > 0]
    if positive.size and positive.max() >= 10 * positive.min():
        ax.set_xscale("log")
    ax.set_yticks(rows, names, fontsize="small")
    ax.set_xlabel("‖∂⁺h_k/∂θ‖_F over every valid step of every sequence")
    ax.set_title(f"Local gradients over {len(local.values['all'])} steps", fontsize="medium")
    ax.legend(fontsize="small")
    return figure


def pooled_lyapunov(lyapunov: PooledLyapunov) -> Figure:
    """mean_j ± stderr_j over the sequences for each exponent j, the batch means as dots, a line at 0."""
    k = lyapunov.exponents.shape[1]
    index = np.arange(1, k + 1)
    figure = Figure(figsize=(WIDTH, 4.0), layout="constrained")
    ax = figure.subplots()
    means = lyapunov.batch_means.numpy()
    for row in means:
        ax.plot(index, row, ".", color=PALETTE[1], markersize=3, alpha=0.5)
    ax.plot([], [], ".", color=PALETTE[1], label=f"batch means ({len(means)})")
    ax.errorbar(
        index, lyapunov.mean.numpy(), yerr=lyapunov.stderr.numpy(), color=PALETTE[0], marker="o", capsize=3,
        label=f"mean ± s.e. over {len(lyapunov.exponents)} sequences",
    )  # fmt: skip
    exponent_axes(
        ax, "exponent j (column of the QR method)", "Lyapunov exponents (below 0: perturbations and gradients decay)"
    )
    return figure
