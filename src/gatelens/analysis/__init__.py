"""Analyses written once against the Cell protocol; nothing here branches on the architecture."""

from gatelens.analysis.credit import CreditMap, credit
from gatelens.analysis.propagation import Propagation, propagation

__all__ = ["CreditMap", "Propagation", "credit", "propagation"]
