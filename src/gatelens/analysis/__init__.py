"""Analyses written once against the Cell protocol; nothing here branches on the architecture."""

from gatelens.analysis.credit import CreditMap, credit
from gatelens.analysis.local import LocalGradients, local_gradients
from gatelens.analysis.lyapunov import Lyapunov, lyapunov
from gatelens.analysis.propagation import Propagation, propagation
from gatelens.analysis.regimes import Regimes, regimes
from gatelens.analysis.whatif import what_if

__all__ = [
    "CreditMap",
    "LocalGradients",
    "Lyapunov",
    "Propagation",
    "Regimes",
    "credit",
    "local_gradients",
    "lyapunov",
    "propagation",
    "regimes",
    "what_if",
]
