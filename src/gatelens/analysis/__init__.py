"""Analyses written once against the Cell protocol; nothing here branches on the architecture."""

from gatelens.analysis.blocking import Blocking, BlockingEvent, blocking, probe_credits
from gatelens.analysis.credit import CreditMap, credit
from gatelens.analysis.dataset import DatasetAnalysis, analyze_dataset
from gatelens.analysis.explain import Explanation, Finding
from gatelens.analysis.influence import InputInfluence, input_influence
from gatelens.analysis.local import LocalGradients, local_gradients
from gatelens.analysis.lyapunov import Lyapunov, lyapunov
from gatelens.analysis.pipeline import Analysis, Settings, analyze, explain
from gatelens.analysis.propagation import Propagation, propagation
from gatelens.analysis.regimes import Regimes, regimes
from gatelens.analysis.whatif import what_if

__all__ = [
    "Analysis",
    "Blocking",
    "BlockingEvent",
    "CreditMap",
    "DatasetAnalysis",
    "Explanation",
    "Finding",
    "InputInfluence",
    "LocalGradients",
    "Lyapunov",
    "Propagation",
    "Regimes",
    "Settings",
    "analyze",
    "analyze_dataset",
    "blocking",
    "credit",
    "explain",
    "input_influence",
    "local_gradients",
    "lyapunov",
    "probe_credits",
    "propagation",
    "regimes",
    "what_if",
]
