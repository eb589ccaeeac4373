"""A report folder: ``results.json``, one PNG per figure, and ``report.html`` with the findings first.

One or several models (the demo's GRU and Elman RNN) share one folder: per model and recurrence the Jacobian,
regime and timescale figures, per model the credit map and lag profile, and one local-gradient and one Lyapunov
figure comparing all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gatelens.analysis import Analysis, CreditMap
from gatelens.report import figures
from gatelens.report.html import ReportFigure, write_report


def write_results_and_figures(out: Path, results: dict[str, Any], entries: Sequence[ReportFigure]) -> list[Path]:
    """Write ``results`` as results.json and each figure as NAME.png into ``out``; returns the files written."""
    files = [out / "results.json"]
    files[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for entry in entries:
        path = out / f"{entry.name}.png"
        path.write_bytes(entry.png)
        files.append(path)
    return files


def write_report_folder(
    out: Path,
    analyses: Sequence[Analysis],
    *,
    results: dict[str, Any],
    title: str,
    summary: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write ``results`` as results.json, the figures and report.html into ``out``; returns the files written."""
    entries = report_figures(analyses)
    files = write_results_and_figures(out, results, entries)
    findings = {item.name: item.explanation for item in analyses}
    loss = {f"{item.name}: credit maps of" if len(analyses) > 1 else "credit maps of": item.loss for item in analyses}
    files.append(
        write_report(
            out / "report.html",
            title=title,
            findings=findings,
            figures=entries,
            summary=[*summary, *loss.items()],
            notes=notes,
        )
    )
    return files


def report_figures(analyses: Sequence[Analysis]) -> list[ReportFigure]:
    """Every figure of the report whose analyses were run, named, titled and captioned."""
    entries: list[ReportFigure] = []
    several = len(analyses) > 1

    def add(stem: str, owner: str, title: str, caption: str, figure: Figure) -> None:
        name = _slug(f"{owner}-{stem}" if owner else stem)
        entries.append(ReportFigure(name=name, title=title, caption=caption, png=figures.to_png(figure)))

    for item in analyses:
        owner = item.name if several else ""
        prefix = f"{item.name}: " if several else ""
        for part in item.recurrences:
            where = f" ({part.label})" if len(item.recurrences) > 1 else ""
            own = f"{owner}-{part.label}" if len(item.recurrences) > 1 else owner
            add(
                "jacobian",
                own,
                f"{prefix}step Jacobians ∂h_t/∂h_(t−1){where}",
                "Top: the spectral norm of each step's Jacobian (below 1: that step shrinks the gradient). Bottom: "
                "each path's share of the Jacobian, step by step.",
                figures.jacobian_figure(item.trace, layer=part.layer, direction=part.direction),
            )
            if part.regimes is not None:
                add(
                    "regimes",
                    own,
                    f"{prefix}gate regimes{where}",
                    "Each unit (row) at each step (column) of the first sequence: carry keeps its value, blocked lets "
                    "nothing through, Elman-like is overwritten every step.",
                    figures.regime_map(part.regimes),
                )
                add(
                    "timescales",
                    own,
                    f"{prefix}unit timescales{where}",
                    "τ = 1/(1 − mean carry) per unit, sorted: units above the upper line are long-term memory, below "
                    "the lower line short-term.",
                    figures.unit_timescales(part.regimes),
                )
        if item.credit_rows is not None and item.credit is not None:
            by_step = item.credit_rows
            probe = (
                " (a probe loss at every step: the chosen loss has few loss steps)" if item.credit_rows_probe else ""
            )
            add(
                "credit",
                owner,
                f"{prefix}credit map per weight matrix{probe}",
                "How much of each weight's gradient the loss at step t (rows) takes from the input at step k "
                "(columns), ‖C(t, k)‖ on a log colour scale: mass far left of the diagonal is long-range credit. "
                f"At most {item.settings.heatmap_rows} loss steps, evenly spaced, are computed; each row of the "
                "image is the loss step at its centre.",
                figures.credit_heatmap(by_step, blocks=weights(by_step)),
            )
            add(
                "lags",
                owner,
                f"{prefix}credit by time lag and gradient propagation",
                "Left: the size of each weight matrix's gradient by lag t − k. Right: log‖∂h_T/∂h_(T−ℓ)‖ over ℓ; "
                "the gradient horizon is where it falls below the dashed line.",
                figures.lag_profile(
                    item.credit,
                    item.recurrences[0].propagation,
                    blocks=weights(item.credit),
                    eps=item.settings.eps,
                ),
            )
    locals_, exponents = {}, {}
    for item in analyses:
        for part in item.recurrences:
            label = " ".join(filter(None, (item.name if several else "", part.label)))
            if part.local is not None:
                locals_[label] = part.local
            if part.lyapunov is not None:
                exponents[label] = part.lyapunov
    if locals_:
        add(
            "local-gradients",
            "",
            "local gradients",
            "The largest ‖∂⁺h_k/∂θ‖_F at each step, per model: the size of the gradient a weight gets from one "
            "step before any propagation through time.",
            figures.local_gradients_figure(locals_),
        )
    if exponents:
        add(
            "lyapunov",
            "",
            "Lyapunov spectrum",
            "The top exponents of the state's trajectory, largest first (nats per step): all below 0 means every "
            "perturbation, and so every gradient, decays exponentially.",
            figures.lyapunov_spectrum(exponents),
        )
    return entries


def weights(credit_map: CreditMap) -> list[str]:
    """The weight matrices among the credit map's blocks (l0.W_hz, …; not the biases)."""
    return [name for name in credit_map.total if name.split(".")[-1].startswith("W_")]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
