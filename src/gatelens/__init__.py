"""gatelens: exact gradient flow through time in GRUs, Elman RNNs and LSTMs.

import gatelens as gl
model = gl.load(torch.nn.GRU(3, 16, num_layers=2))
trace = model.trace(x)                      # x: (T, B, I)
J = trace.jacobians(layer=0)                # (T, B, S, S); J[i] = ∂h_{i+1}/∂h_i
paths = trace.jacobian_paths(layer=0)       # {"carry", "update", "candidate", "reset"}, summing to J
cm = gl.credit(trace, loss="last", head=head, targets=y)   # cm.total, cm.by_source, cm.by_lag, cm.norms
pr = gl.propagation(trace)                  # log‖∂h_T/∂h_{T−ℓ}‖ for every lag ℓ; pr.horizon(eps=1e-3)
"""

from gatelens.analysis import CreditMap, Propagation, credit, propagation
from gatelens.cells import GRU, LSTM, Cell, Elman, Stack
from gatelens.io import load
from gatelens.model import Model
from gatelens.trace import Recurrence, Trace

__all__ = [
    "GRU",
    "LSTM",
    "Cell",
    "CreditMap",
    "Elman",
    "Model",
    "Propagation",
    "Recurrence",
    "Stack",
    "Trace",
    "credit",
    "load",
    "propagation",
]
__version__ = "0.1.0"
