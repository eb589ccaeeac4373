"""Lyapunov exponents of a recurrence driven by its inputs: the average growth rates of ∂h_t/∂h_0.

The standard QR method (Benettin et al. 1980; Pascanu et al. 2013 use the largest exponent for RNNs) carries k
orthonormal directions Q through the Jacobians and re-orthonormalises them at every step:

    Q_0 = I[:, :k],      J_i Q_{i−1} = Q_i R_i   (QR),      λ_j = (1 / n) Σ_i log |R_i[j, j]|

over the n counted steps (those at or after ``warmup``, inside the sequence). Warm-up steps still turn Q towards
the dominant directions; they are only left out of the averages. λ_1 ≥ λ_2 ≥ … as n grows (the order is the
order of the columns, not sorted). Exponents are in nats per step: a product of Jacobians grows like e^{λ_1 ℓ}
over ℓ steps, so λ_1 < 0 means gradients vanish at the rate −λ_1, and λ_1 ≈ 0 that they are carried.

J_i Q_{i−1} is the cell's forward product (``state_jvp``) of Q's k columns at once, without forming J_i: k products
with the recurrent weights per step and sequence, where forming J_i costs about S of them, and a stack's block
K^1 J^0 a product of two layer-sized matrices (J_i is formed only at the rare steps described below).

Numerical rank. Where J_i Q_{i−1} is rank-deficient, the R_i[j, j] beyond its rank are roundoff, and their log
(−37 in float64, say) is no growth rate: the exact value is log 0 = −inf. A diagonal entry counts as zero when

    |R_i[j, j]| ≤ S · eps · ‖J_i‖_F          (S the state size, eps the machine epsilon of the dtype)

(Householder QR's backward error is bounded in the Frobenius norm; as ‖J‖_F ≥ ‖J‖₂ this is at least numpy's
matrix_rank tolerance S · eps · σ_max, and J Q has ‖J Q‖_F ≤ ‖J‖_F). Such a column is dead at that
step: λ_j = −inf if it happens at a counted step (once the volume of P e_1, …, P e_j is 0 it stays 0). Its direction
is then arbitrary, so the step's QR is redone with the dead columns moved behind the live ones (each group in its
own order), and they stay behind at later steps: a dead column's arbitrary direction takes no growth from the live
columns, whose exponents are those of the live frame alone. ``rank`` is the number of exponents that are not
−inf, per sequence: the numerical rank of the product of the counted steps' Jacobians within the k directions
followed.

Finite-time exponents are the same averages over consecutive windows of the counted steps; their spread gives a
standard error for λ (the batch-means method), and ``running`` holds the estimate after every step, so whether
the exponents have converged can be read off both.

The test needs ‖J_i‖_F without J_i. The cell bounds it from its structure, L_i ≤ ‖J_i‖_F ≤ U_i
(:meth:`~gatelens.Cell.jacobian_norm_bounds`): L = U = the norm itself where that is cheap (Elman, GRU with reset
"after", LSTM without projection, from each row's Gram matrix of weight rows); a stack, a GRU with reset "before" and a
projected LSTM give bounds (a stack's from ‖AB‖_F ≤ ‖A‖_F ‖B‖_F over its blocks). Widened by a relative S · eps for
their own rounding, they decide a column wherever they can: |R_jj| > S · eps · U_i is certainly alive and
|R_jj| ≤ S · eps · L_i certainly dead. Only at a step where some |R_jj| falls between the two is J_i formed and the
test made with its norm, exactly as stated above. Nothing is stored beyond Q and the bounds of a chunk of steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.norms import flushes_subnormals
from gatelens.analysis.serialize import json_list
from gatelens.model import InitialState, Model
from gatelens.trace import Recurrence, Trace

CHUNK_ELEMENTS = 1 << 20  # (step, sequence, state entry) triples whose norm bounds are computed at once
DEFAULT_WINDOWS = 10
DEFAULT_EXPONENTS = 8  # λ_1 and enough more to see a rank deficit; k = None follows all S


@dataclass(frozen=True, eq=False)
class Lyapunov:
    """Lyapunov exponents per sequence; build one with :func:`lyapunov`.

    exponents (B, k), −inf beyond the numerical rank (module docstring); finite_time (W, B, k), window w covering
    step indices window_edges[w]..window_edges[w+1]−1; stderr (B, k): the standard error of the mean of the
    finite-time exponents (NaN for −inf); running (T − warmup, B, k): the estimate after each step; counted (B,):
    steps averaged per sequence; rank (B,): exponents that are not −inf.
    """

    recurrence: str
    warmup: int
    exponents: Tensor
    finite_time: Tensor
    window_edges: list[int]
    stderr: Tensor
    running: Tensor
    counted: Tensor
    rank: Tensor

    @property
    def largest(self) -> Tensor:
        """max_j λ_j per sequence (B,)."""
        return self.exponents.max(-1).values

    def to_dict(self, running: bool = False) -> dict[str, Any]:
        """Exponents, finite-time exponents and standard errors, ready for JSON (None for NaN and ±inf: ``rank``
        says how many exponents per sequence are finite); with ``running=True`` also the estimate after every
        step."""
        return ({"running": json_list(self.running)} if running else {}) | {
            "recurrence": self.recurrence,
            "warmup": self.warmup,
            "exponents": json_list(self.exponents),
            "stderr": json_list(self.stderr),
            "finite_time": json_list(self.finite_time),
            "window_edges": self.window_edges,
            "counted": self.counted.tolist(),
            "rank": self.rank.tolist(),
        }


@flushes_subnormals
def lyapunov(
    source: Model | Trace,
    x: Any = None,
    *,
    h0: InitialState = None,
    lengths: Any = None,
    k: int | None = DEFAULT_EXPONENTS,
    warmup: int = 0,
    windows: int | None = None,
    layer: int | None = None,
    direction: str | None = None,
) -> Lyapunov:
    """The first k Lyapunov exponents of one recurrence (module docstring): k = 8 by default (all S on a smaller
    state), any k in 1..S, or None for all S.

    ``lyapunov(model, x, h0=, lengths=)`` traces x first; ``lyapunov(trace)`` uses a trace already recorded.
    layer/direction choose the recurrence as in :meth:`Trace.recurrence`. ``windows`` consecutive windows of the
    counted steps give the finite-time exponents (default: 10, or one per counted step when there are fewer).
    """
    trace = traced(source, x, h0, lengths, "lyapunov")
    rec = trace.recurrence(layer, direction)
    steps, batch = rec.input_index.shape
    size = rec.cell.state_size
    if k is None:
        k = size
    else:  # the default 8 is cut to S on a smaller state; any other k must lie in 1..S
        k = min(size, _count("k", k, 1, max(size, DEFAULT_EXPONENTS) if k == DEFAULT_EXPONENTS else size))
    warmup = _count("warmup", warmup, 0, steps - 1)
    windows = min(DEFAULT_WINDOWS, steps - warmup) if windows is None else _count("windows", windows, 1, steps - warmup)
    dtype, device = rec.states.dtype, rec.states.device
    scale = size * torch.finfo(dtype).eps  # the rank tolerance is S · eps · ‖J_i‖_F
    directions = torch.eye(k, size, dtype=dtype, device=device)[:, None].expand(k, batch, size)  # Q_0's columns
    order: Tensor | None = None  # (B, k): the column each position of ``directions`` follows, once one has moved
    log_growth = torch.empty(steps, batch, k, dtype=dtype, device=device)
    chunk = max(1, CHUNK_ELEMENTS // (batch * size))
    for start in range(0, steps, chunk):
        bounds = rec.jacobian_norm_bounds(steps=slice(start, min(steps, start + chunk)))
        # S · eps times the bounds, widened by a relative S · eps for their own rounding
        lows, highs = (scale * (1 - scale) * bounds.lower)[..., None], (scale * (1 + scale) * bounds.upper)[..., None]
        for step, low, high in zip(range(start, steps), lows, highs):
            tolerance = _Tolerance(low, high, functools.partial(_formed_tolerance, rec, step, scale))
            product = rec.state_jvp(directions, steps=step).permute(1, 2, 0)  # J_i Q_{i−1}, (B, S, k)
            q, order, growth = _qr_step(product, tolerance, order)
            directions = q.permute(2, 0, 1).contiguous()  # (k, B, S), each direction's entries together
            log_growth[step] = growth if order is None else growth.scatter(-1, order, growth)
    counted = (torch.arange(steps, device=device)[:, None] >= warmup).expand(steps, batch)
    if rec.mask is not None:
        counted = counted & rec.mask
    log_growth = torch.where(counted[..., None], log_growth, 0.0)[warmup:]
    counted = counted[warmup:]
    counts = counted.sum(0)
    edges = np.linspace(0, steps - warmup, windows + 1).round().astype(int).tolist()
    finite_time = torch.stack([_mean(log_growth[a:b], counted[a:b]) for a, b in zip(edges, edges[1:])])
    running = log_growth.cumsum(0) / counted.cumsum(0)[..., None]
    return Lyapunov(
        recurrence=rec.name,
        warmup=warmup,
        exponents=_mean(log_growth, counted),
        finite_time=finite_time,
        window_edges=[warmup + edge for edge in edges],
        stderr=_standard_error(finite_time),
        running=running,
        counted=counts,
        rank=k - log_growth.isneginf().any(0).sum(-1),
    )


class _Tolerance:
    """The rank tolerance S · eps · ‖J_i‖_F of one step, per sequence (B, 1): known to lie between ``low`` and ``high``
    (from the cell's bounds) until a diagonal entry falls between them; then J_i is formed, once, and the tolerance
    is its own."""

    def __init__(self, low: Tensor, high: Tensor, formed: Callable[[], Tensor]) -> None:
        self.low, self.high, self.formed = low, high, formed

    def dead(self, diagonal: Tensor) -> Tensor:
        """|R_jj| ≤ S · eps · ‖J_i‖_F for diagonal (B, k) = |R_jj|."""
        if bool(((diagonal > self.low) & (diagonal <= self.high)).any()):
            self.low = self.high = self.formed()
        return diagonal <= self.low


def _formed_tolerance(rec: Recurrence, step: int, scale: float) -> Tensor:
    """S · eps · ‖J_i‖_F per sequence (B, 1) from J_i itself, formed for this step only (``scale`` = S · eps)."""
    return scale * torch.linalg.matrix_norm(rec.jacobians(steps=step))[:, None]


def _qr_step(product: Tensor, tolerance: _Tolerance, order: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """J Q = Q' R for product = J Q (B, S, k); log|R_jj| per position, −inf where |R_jj| ≤ S · eps · ‖J‖_F. Where a
    dead position lies before a live one, the columns are reordered (live first, each group in its own order) and
    the QR is redone; ``order`` (None: the identity) follows the columns through every reordering."""
    q, r = torch.linalg.qr(product)
    diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
    dead = tolerance.dead(diagonal)
    if product.shape[-1] > 1 and bool((dead[..., :-1] & ~dead[..., 1:]).any()):
        moved = torch.sort(dead.to(torch.int8), dim=-1, stable=True).indices
        order = moved if order is None else order.gather(-1, moved)
        q, r = torch.linalg.qr(product.gather(-1, moved[..., None, :].expand_as(product)))
        diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
        dead = dead.gather(-1, moved) | tolerance.dead(diagonal)
    return q, order, torch.where(dead, -math.inf, diagonal.log())


def traced(source: Any, x: Any, h0: InitialState, lengths: Any, caller: str) -> Trace:
    """The trace ``caller`` analyses: ``source`` itself, or ``source.trace(x, h0, lengths=lengths)`` for a Model."""
    if isinstance(source, Trace):
        if x is not None or h0 is not None or lengths is not None:
            raise TypeError(f"{caller}(trace) takes no x, h0 or lengths: the trace already holds them")
        return source
    if isinstance(source, Model):
        if x is None:
            raise TypeError(f"{caller}(model, x) needs the inputs x to drive the model")
        return source.trace(x, h0, lengths=lengths)
    raise TypeError(f"{caller} needs a gatelens Model with inputs x, or a Trace; got {type(source).__name__}")


def _count(name: str, value: Any, low: int, high: int) -> int:
    """An int in low..high (not bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high} for this trace, got {value!r}")
    return int(value)


def _mean(log_growth: Tensor, counted: Tensor) -> Tensor:
    """Σ log|R_jj| / (counted steps) per sequence and direction; NaN for a sequence with no counted step."""
    return log_growth.sum(0) / counted.sum(0)[..., None]


def _standard_error(finite_time: Tensor) -> Tensor:
    """std(finite-time exponents over windows) / √(windows), ignoring NaN windows; NaN with fewer than 2."""
    valid = ~finite_time.isnan()
    n = valid.sum(0)
    values = torch.where(valid, finite_time, 0.0)
    mean = values.sum(0) / n
    spread = torch.where(valid, finite_time - mean, 0.0).square().sum(0) / (n - 1)
    return torch.where(n >= 2, (spread / n).sqrt(), math.nan)
