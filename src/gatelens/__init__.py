"""gatelens: exact gradient flow through time in GRUs, Elman RNNs and LSTMs.

import gatelens as gl
model = gl.load(torch.nn.GRU(3, 16, num_layers=2))
trace = model.trace(x)                      # x: (T, B, I)
J = trace.jacobians(layer=0)                # (T, B, S, S); J[i] = ∂h_{i+1}/∂h_i
paths = trace.jacobian_paths(layer=0)       # {"carry", "update", "candidate", "reset"}, summing to J
cm = gl.credit(trace, loss="last", head=head, targets=y)   # cm.total, cm.by_source, cm.by_lag, cm.norms
pr = gl.propagation(trace)                  # log‖∂h_T/∂h_{T−ℓ}‖ for every lag ℓ; pr.horizon(eps=1e-3)
rg = gl.regimes(trace)                      # carry / blocked / Elman-like / mixed per unit and step; timescales
an = gl.analyze(trace)                      # every analysis once: an.recurrences, an.credit, an.blocking
ds = gl.analyze_dataset(model, x_all, batch_size=64)   # N sequences in batches, statistics pooled exactly
print(an.explanation)                       # findings in plain language, each with its number
"""

from gatelens.analysis import (
    Analysis,
    Blocking,
    CreditMap,
    DatasetAnalysis,
    Explanation,
    InputInfluence,
    LocalGradients,
    Lyapunov,
    Propagation,
    Regimes,
    Settings,
    analyze,
    analyze_dataset,
    blocking,
    credit,
    explain,
    input_influence,
    local_gradients,
    lyapunov,
    probe_credits,
    propagation,
    regimes,
    what_if,
)
from gatelens.cells import GRU, LSTM, Cell, Elman, Stack
from gatelens.experiments.monitor import Monitor
from gatelens.io import load
from gatelens.model import LayoutWarning, Model
from gatelens.sweep import sweep
from gatelens.trace import Recurrence, Trace

__all__ = [
    "GRU",
    "LSTM",
    "Analysis",
    "Blocking",
    "Cell",
    "CreditMap",
    "DatasetAnalysis",
    "Elman",
    "Explanation",
    "InputInfluence",
    "LayoutWarning",
    "LocalGradients",
    "Lyapunov",
    "Model",
    "Monitor",
    "Propagation",
    "Recurrence",
    "Regimes",
    "Settings",
    "Stack",
    "Trace",
    "analyze",
    "analyze_dataset",
    "blocking",
    "credit",
    "explain",
    "input_influence",
    "load",
    "local_gradients",
    "lyapunov",
    "probe_credits",
    "propagation",
    "regimes",
    "sweep",
    "what_if",
]
__version__ = "0.1.0"
