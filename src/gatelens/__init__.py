"""gatelens: exact gradient flow through time in GRUs, Elman RNNs and LSTMs.

import gatelens as gl
model = gl.load(torch.nn.GRU(3, 16, num_layers=2))
trace = model.trace(x)                      # x: (T, B, I)
J = trace.jacobians(layer=0)                # (T, B, S, S); J[i] = ∂h_{i+1}/∂h_i
paths = trace.jacobian_paths(layer=0)       # {"carry", "update", "candidate", "reset"}, summing to J
"""

from gatelens.cells import GRU, LSTM, Cell, Elman, Stack
from gatelens.io import load
from gatelens.model import Model
from gatelens.trace import Recurrence, Trace

__all__ = ["GRU", "LSTM", "Cell", "Elman", "Stack", "Model", "Recurrence", "Trace", "load"]
__version__ = "0.1.0"
