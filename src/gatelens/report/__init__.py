"""Figures (matplotlib, one function each) and the self-contained HTML report, usable from Python:

from gatelens.report import regime_map, to_png
regime_map(gl.regimes(trace)).savefig("regimes.png")
"""

from gatelens.report.figures import (
    credit_heatmap,
    jacobian_figure,
    lag_profile,
    local_gradients_figure,
    lyapunov_spectrum,
    regime_map,
    to_png,
    unit_timescales,
)
from gatelens.report.html import ReportFigure, render_report, write_report

__all__ = [
    "ReportFigure",
    "credit_heatmap",
    "jacobian_figure",
    "lag_profile",
    "local_gradients_figure",
    "lyapunov_spectrum",
    "regime_map",
    "render_report",
    "to_png",
    "unit_timescales",
    "write_report",
]
