"""Cells: the only place where an architecture's math lives."""

from gatelens.cells.base import Cell, Covectors, Factor, FactorEnergy, NormBounds
from gatelens.cells.elman import Elman
from gatelens.cells.gru import GRU
from gatelens.cells.lstm import LSTM
from gatelens.cells.stack import Stack

__all__ = ["Cell", "Covectors", "Factor", "FactorEnergy", "NormBounds", "Elman", "GRU", "LSTM", "Stack"]
