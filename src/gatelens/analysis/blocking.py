"""Blocking events: steps where rows of the Jacobian collapse, and what that does to each weight's gradient.

Row j of J_m = ∂h_m/∂h_{m−1} *collapses* when ‖J_m[j, :]‖₂ < tol: almost nothing of the previous state reaches
unit j at step m (a GRU with z_j ≈ r_j ≈ 0, an LSTM with f_j ≈ i_j ≈ 0, a dead ReLU unit). An *event* is a step
of one sequence with at least one collapsed row.

What an event does to the gradient follows from eq. (8). For a loss L (a credit map) and the event's sequence,
every weight block's gradient G = ∂L/∂θ splits exactly into three parts by loss step t and source step k:

    G_before = Σ_{t<m} Σ_{k≤t} C(t, k)     losses before the event: they never pass through J_m
    G_across = Σ_{t≥m} Σ_{k<m} C(t, k)     credit carried across J_m to earlier source steps: cut when J_m ≈ 0
    G_after  = Σ_{t≥m} Σ_{k≥m} C(t, k)     later source steps (k = m included): untouched by J_m

With one loss at the last step (many-to-one) G_before = 0, so after a full block G ≈ G_after: the gradient of every
weight, W_iz included, still arrives from the steps at and after the block; only credit to earlier steps is cut.
With a loss at every step (many-to-many) G_before survives as well. ``transmission`` is the share of the later
losses' adjoint that crosses the step, ‖ā J_m‖ / ‖ā‖ with ā = ∂(Σ_{t≥m} L_t)/∂h_m.

The parts are computed from the credit map's own adjoints: one extra BPTT sweep for all the events of a
recurrence, each event a column holding its sequence, gives ā for the losses t ≥ m and for those t < m; the
parameter factors of the first summed over k ≥ m and k < m give G_after and G_across, those of the second G_before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.analysis.credit import FACTOR_TEMPORARIES, CreditMap, credit, step_chunks, summed_adjoints
from gatelens.analysis.norms import flushes_subnormals, frobenius
from gatelens.cells.base import NormBounds, map_cache
from gatelens.trace import Recurrence, Trace

CHUNK_ELEMENTS = 1 << 24  # elements of Jacobians fetched at once (64 MiB in float32)
ROW_TEMPORARIES = 16  # (B, S) tensors that a cell's row bounds, or a one-hot's VJP, form per step at once, about
PARTS = ("before", "across", "after")


@dataclass(frozen=True)
class BlockingEvent:
    """One step (0-based index ``step``, i.e. J_{step+1}) of one sequence with collapsed rows.

    parts[loss][block] holds the Frobenius norms of G_before, G_across, G_after and of G itself ("total") for that
    sequence; transmission[loss] = ‖ā J‖ / ‖ā‖, NaN where ā = 0: no loss lies at or after the step, a later step cuts
    all of the later losses' credit exactly (a zero Jacobian product), or (``underflow[loss]``) the later losses'
    adjoint is not zero but has underflowed to 0 in the trace's dtype before reaching it — told apart by carrying
    that adjoint as (unit vector, log-scale), which reads zero only when it is exactly zero.
    """

    recurrence: str
    step: int
    sequence: int
    rows: list[str]
    jacobian_norm: float
    transmission: dict[str, float]
    underflow: dict[str, bool]
    parts: dict[str, dict[str, dict[str, float]]]

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "recurrence": self.recurrence,
            "step": self.step,
            "sequence": self.sequence,
            "rows": self.rows,
            "jacobian_norm": self.jacobian_norm,
            "transmission": {loss: number(value) for loss, value in self.transmission.items()},
            "underflow": self.underflow,
            "parts": self.parts,
        }


@dataclass(frozen=True, eq=False)
class Blocking:
    """Blocking events of a trace; build with :func:`blocking`.

    ``collapsed[name]`` (T, B) counts the collapsed rows of every step of recurrence ``name``; ``events`` details
    the ``max_events`` most severe events (most rows collapsed, then smallest ‖J‖_F) out of ``total_events``.
    """

    tol: float
    losses: list[str]
    collapsed: dict[str, Tensor]
    total_events: int
    events: list[BlockingEvent]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tol": self.tol,
            "losses": self.losses,
            "total_events": self.total_events,
            "steps_with_events": {name: (counts > 0).sum(0).tolist() for name, counts in self.collapsed.items()},
            "events": [event.to_dict() for event in self.events],
        }


@flushes_subnormals
def blocking(
    trace: Trace,
    credits: CreditMap | Mapping[str, CreditMap] | None = None,
    *,
    tol: float = 0.1,
    max_events: int = 20,
    seed: int = 0,
) -> Blocking:
    """Find the steps whose Jacobian rows collapse (‖J[j, :]‖₂ < tol) and split each weight's gradient around the
    most severe of them (module docstring), in every recurrence of the model.

    credits: a credit map of the trace, or several by name; default: :func:`probe_credits` (a many-to-one and a
    many-to-many probe loss drawn from ``seed``).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"blocking needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.number)) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if isinstance(max_events, (bool, np.bool_)) or not isinstance(max_events, (int, np.integer)) or max_events < 0:
        raise ValueError(f"max_events must be an int ≥ 0, got {max_events!r}")
    max_events = int(max_events)
    maps = _credit_maps(trace, credits, seed)
    streams = {rec.name: rec for rec, _ in next(iter(maps.values())).streams}
    collapsed, candidates = {}, []
    below_by_name = {}
    for name, rec in streams.items():
        below_by_name[name], norms = _collapsed_rows(rec, tol)
        collapsed[name] = below_by_name[name].sum(-1)
        for step, sequence in torch.nonzero(collapsed[name]).tolist():
            bounds = (float(norms.lower[step, sequence]), float(norms.upper[step, sequence]))
            candidates.append(Candidate(name, step, sequence, int(collapsed[name][step, sequence]), *bounds))
    chosen = []
    for event, norm in _most_severe(candidates, max_events, streams):
        labels = streams[event.recurrence].cell.state_labels()
        below = below_by_name[event.recurrence][event.step, event.sequence]
        rows = [labels[j] for j in torch.nonzero(below).flatten().tolist()]
        chosen.append((event.recurrence, event.step, event.sequence, rows, norm))
    effects = {loss: _effects(cm, streams, chosen) for loss, cm in maps.items()}
    events = [
        BlockingEvent(
            recurrence=name,
            step=step,
            sequence=sequence,
            rows=labels,
            jacobian_norm=norm,
            transmission={loss: effects[loss][index][0] for loss in maps},
            underflow={loss: effects[loss][index][1] for loss in maps},
            parts={loss: effects[loss][index][2] for loss in maps},
        )
        for index, (name, step, sequence, labels, norm) in enumerate(chosen)
    ]
    return Blocking(tol=float(tol), losses=list(maps), collapsed=collapsed, total_events=len(candidates), events=events)


def probe_credits(trace: Trace, seed: int = 0) -> dict[str, CreditMap]:
    """Credit maps of two probe losses with a fixed random readout w_t ~ N(0, I) drawn from ``seed``:

    many-to-one   L = ⟨w, h_n⟩: each direction's output at its last processed step (time L_b for a forward
                  direction, time 1 for a reverse one), the final state a many-to-one head reads
    many-to-many  L = Σ_t ⟨w_t, y_t⟩ at every step

    They stand in for a task's loss when none is given: what they show about blocking (which parts of eq. (8)
    survive) holds for any readout, only the magnitudes differ.
    """
    output = trace.output
    unbatched, batch_first = output.dim() == 2, output.dim() == 3 and trace.model.batch_first
    steps, batch = (
        (output.shape[1], output.shape[0]) if batch_first else (output.shape[0], 1 if unbatched else output.shape[1])
    )
    generator = torch.Generator().manual_seed(seed)
    shape = (steps, batch, output.shape[-1])  # drawn time-major, so the readout does not depend on the layout
    time_major = torch.randn(shape, generator=generator, dtype=torch.float64).to(output.dtype).to(output.device)
    lengths = trace.lengths if trace.lengths is not None else torch.full((batch,), steps, device=output.device)
    time = torch.arange(steps, device=output.device)[:, None]
    final = torch.zeros_like(time_major, dtype=torch.bool)  # each direction's last processed step, as h_n holds it
    top = trace.model.layers[-1]
    for index, recurrence in enumerate(trace.model.names()[-len(top) :]):
        last = time == 0 if recurrence.endswith("_reverse") else time == (lengths - 1)[None, :]
        width = top[index].output_size
        final[..., index * width : (index + 1) * width] = last[..., None]
    last_only = torch.where(final, time_major, 0.0)

    def as_output(values: Tensor) -> Tensor:
        return values.squeeze(1) if unbatched else values.transpose(0, 1) if batch_first else values

    return {"many-to-one": credit(trace, as_output(last_only)), "many-to-many": credit(trace, as_output(time_major))}


def _credit_maps(trace: Trace, credits: Any, seed: int) -> dict[str, CreditMap]:
    """The credit maps by name, each checked to belong to ``trace``."""
    if credits is None:
        return probe_credits(trace, seed)
    maps = {"loss": credits} if isinstance(credits, CreditMap) else credits
    if not isinstance(maps, Mapping) or not maps or not all(isinstance(cm, CreditMap) for cm in maps.values()):
        raise TypeError(f"credits must be a CreditMap or a non-empty dict of them, got {credits!r:.80}")
    if any(cm.trace is not trace for cm in maps.values()):
        raise ValueError("every credit map must be computed from this trace (gl.credit(trace, …))")
    return dict(maps)


def _collapsed_rows(rec: Recurrence, tol: float) -> tuple[Tensor, NormBounds]:
    """Which rows collapse, ‖J_{i+1}[j, :]‖₂ < tol, (T, B, S), and bounds on ‖J_{i+1}‖_F, (T, B), without forming J.

    The cell's row bounds (:meth:`Recurrence.jacobian_row_bounds`, O(S) per step) settle every row whose bounds lie
    on one side of tol; a row they leave open is computed exactly, ‖e_j J‖ from one state VJP (:func:`_exact_rows`).
    Padded steps (J = I) never collapse.
    """
    size = rec.cell.state_size
    chunk = max(1, CHUNK_ELEMENTS // (rec.states.shape[1] * size * ROW_TEMPORARIES))
    parts = [rec.jacobian_row_bounds(steps=slice(start, start + chunk)) for start in range(0, rec.steps, chunk)]
    lower, upper = (torch.cat(list(bounds)) for bounds in zip(*parts))
    valid = torch.ones_like(lower[..., 0], dtype=torch.bool) if rec.mask is None else rec.mask
    open_rows = (lower < tol) & (upper >= tol) & valid[..., None]
    if bool(open_rows.any()):
        exact = _exact_rows(rec, torch.nonzero(open_rows))  # in the order of the mask's True entries
        lower[open_rows] = exact
        upper[open_rows] = exact
    collapsed = (upper < tol) & valid[..., None]
    return collapsed, NormBounds(*(frobenius(rows, dims=1) for rows in (lower, upper)))


def _exact_rows(rec: Recurrence, where: Tensor) -> Tensor:
    """‖e_j J_{i+1}‖₂ for every (step i, sequence b, row j) of ``where`` (N, 3): the one-hot e_j sent through the
    cache of step i and sequence b by one state VJP, a chunk of rows at a time."""
    size = rec.cell.state_size
    chunk = max(1, CHUNK_ELEMENTS // (size * ROW_TEMPORARIES))
    norms = []
    for part in where.split(chunk):
        cache = map_cache(lambda tensor: tensor[part[:, 0], part[:, 1]], rec.cache)  # (rows, ·): one step each
        one_hots = torch.nn.functional.one_hot(part[:, 2], size).to(rec.states.dtype)
        norms.append(frobenius(rec.cell.state_vjp(cache, one_hots), dims=1))
    return torch.cat(norms)


@dataclass(frozen=True)
class Candidate:
    """A step of one sequence with ``count`` collapsed rows, and lower ≤ ‖J‖_F ≤ upper there."""

    recurrence: str
    step: int
    sequence: int
    count: int
    lower: float
    upper: float

    def key(self, norm: float) -> tuple[int, bool, float]:
        """Severity order: most rows first; at step index 0 nothing lies before the step, so such an event cuts
        nothing: after the others; then the smallest ‖J‖_F."""
        return (-self.count, self.step == 0, norm)


def _most_severe(
    candidates: list[Candidate], max_events: int, streams: dict[str, Recurrence]
) -> list[tuple[Candidate, float]]:
    """The ``max_events`` most severe candidates in order (:meth:`Candidate.key`), each with its exact ‖J‖_F.

    Only the candidates that can rank among them are formed: those whose key with their lower bound is at most the
    max_events-th smallest key with the upper bounds (any other is outranked by that many candidates)."""
    if not candidates or not max_events:
        return []
    by_upper = sorted(candidate.key(candidate.upper) for candidate in candidates)
    cutoff = by_upper[min(max_events, len(by_upper)) - 1]
    contenders = [candidate for candidate in candidates if candidate.key(candidate.lower) <= cutoff]
    norms = []
    for name in dict.fromkeys(candidate.recurrence for candidate in contenders):
        mine = [candidate for candidate in contenders if candidate.recurrence == name]
        exact = _exact_norms(streams[name], [(candidate.step, candidate.sequence) for candidate in mine])
        norms += list(zip(mine, exact.tolist()))
    return sorted(norms, key=lambda pair: pair[0].key(pair[1]))[:max_events]


def _exact_norms(rec: Recurrence, pairs: list[tuple[int, int]]) -> Tensor:
    """‖J_{i+1}‖_F for every (step i, sequence b) of ``pairs``, J formed for those alone, a chunk at a time."""
    where = torch.tensor(pairs, dtype=torch.long, device=rec.states.device)
    chunk = max(1, CHUNK_ELEMENTS // rec.cell.state_size**2)
    norms = []
    for part in where.split(chunk):
        cache = map_cache(lambda tensor: tensor[part[:, 0], part[:, 1]], rec.cache)
        norms.append(frobenius(rec.cell.jacobian(cache), dims=2))
    return torch.cat(norms)


Effect = tuple[float, bool, dict[str, dict[str, float]]]  # transmission, underflow, parts


def _effects(cm: CreditMap, streams: dict[str, Recurrence], events: list[tuple[Any, ...]]) -> list[Effect]:
    """(transmission, underflow, parts by block) of each event under one credit map: one sweep per recurrence for all
    of its events at once, each event a column of its own (its sequence's caches, :func:`_columns`)."""
    gradients = {rec.name: g for rec, g in cm.streams}
    results: dict[int, Effect] = {}
    by_recurrence: dict[str, list[int]] = {}
    for index, (name, *_) in enumerate(events):
        by_recurrence.setdefault(name, []).append(index)
    for name, members in by_recurrence.items():
        sequences = [events[index][2] for index in members]
        rec = _columns(streams[name], sequences)
        g, adjoint = gradients[name][:, sequences], cm.adjoints[name][:, sequences]
        for index, effect in zip(members, _split(rec, g, adjoint, [events[index][1] for index in members])):
            results[index] = effect
    return [results[index] for index in range(len(events))]


def _columns(rec: Recurrence, sequences: list[int]) -> Recurrence:
    """The recurrence over the listed sequences, in that order, as its batch (a sequence may appear more than once)."""
    index = torch.tensor(sequences, dtype=torch.long, device=rec.states.device)
    return Recurrence(
        name=rec.name,
        cell=rec.cell,
        states=rec.states[:, index],
        cache=map_cache(lambda tensor: tensor[:, index], rec.cache),
        mask=None if rec.mask is None else rec.mask[:, index],
        input_index=rec.input_index[:, index],
    )


def _log_adjoint_norm(rec: Recurrence, g: Tensor, start: int) -> float:
    """log ‖ā_start‖ for the one-sequence loss gradient g (T, 1, S), with ā carried as exp(s) · u, ‖u‖ = 1, from the
    last step back to ``start``: ā_i = g_i + ā_{i+1} J_{i+1}, so it is −inf only where ā is exactly zero, never by
    underflow."""
    unit, scale = torch.zeros_like(g[0]), -math.inf
    for step in reversed(range(start, rec.steps)):
        if step + 1 < rec.steps and scale > -math.inf:
            unit = rec.state_vjp(unit, steps=step + 1)
        size = float(frobenius(g[step], dims=2))
        if size == 0 and scale == -math.inf:
            continue
        if size == 0:  # renormalise what the Jacobian left of the unit vector
            combined, top = unit, scale
        else:  # exp(s) u + g = exp(top) (exp(s − top) u + g / ‖g‖ · exp(log‖g‖ − top)), both terms at most 1
            top = max(scale, math.log(size))
            combined = unit * math.exp(scale - top) + (g[step] / size) * math.exp(math.log(size) - top)
        norm = float(frobenius(combined, dims=2))
        unit, scale = (combined / norm, top + math.log(norm)) if norm > 0 else (torch.zeros_like(unit), -math.inf)
    return scale


def _split(rec: Recurrence, g: Tensor, adjoint: Tensor, steps: list[int]) -> list[Effect]:
    """For events at step indices ``steps``, event e in column e of the recurrence, with loss gradient g (T, E, S) and
    summed adjoint ā (T, E, S): the transmission and the norms of G_before, G_across, G_after, G per block."""
    count = len(steps)
    device = g.device
    starts = torch.tensor(steps, device=device)
    columns = torch.arange(count, device=device)
    later = (torch.arange(rec.steps, device=device)[:, None] >= starts[None, :])[..., None]  # (T, E, 1)
    later_g = torch.where(later, g, 0.0)
    # ā for the losses t ≥ m and for those t < m, every event in one BPTT sweep
    later_adjoint, earlier_adjoint = summed_adjoints(rec, torch.stack([later_g, torch.where(later, 0.0, g)]))
    at_event = later_adjoint[starts, columns]  # (E, S)
    crossing = rec.cell.state_vjp(map_cache(lambda tensor: tensor[starts, columns], rec.cache), at_event)
    at_event_norm = frobenius(at_event, dims=1)
    transmission = frobenius(crossing, dims=1) / at_event_norm
    underflow = [
        bool(at_event_norm[e] == 0)
        and math.isfinite(_log_adjoint_norm(_columns(rec, [e]), later_g[:, e : e + 1], steps[e]))
        for e in range(count)
    ]
    sums: dict[str, dict[str, Tensor]] = {}
    for window in step_chunks(rec, per_step=3 * FACTOR_TEMPORARIES * count * rec.cell.state_size):
        adjoints = torch.stack([adjoint[window], later_adjoint[window], earlier_adjoint[window]])
        kept = later[window]
        for name, (delta, inputs) in rec.param_factors(adjoints, steps=window).items():
            parts = {  # δ is linear in the adjoint: each part contracts its own adjoint, never a difference of two
                "total": delta[0],
                "before": delta[2],
                "across": torch.where(kept, 0.0, delta[1]),
                "after": torch.where(kept, delta[1], 0.0),
            }
            for part, value in parts.items():
                column_sums = _per_column(value, inputs)
                block = sums.setdefault(name, {})
                block[part] = block[part] + column_sums if part in block else column_sums
    norms = {
        name: {part: frobenius(value, dims=value.dim() - 1).tolist() for part, value in parts.items()}
        for name, parts in sums.items()
    }
    return [
        (
            float(transmission[e]),
            underflow[e],
            {name: {part: norms[name][part][e] for part in (*PARTS, "total")} for name in norms},
        )
        for e in range(count)
    ]


def _per_column(adjoint: Tensor, inputs: Tensor | None) -> Tensor:
    """Σ_t δ_{t,e}ᵀ ⊗ u_{t,e} for every column e (a bias: Σ_t δ_{t,e}): adjoint (T, E, rows), inputs (T, E, cols) ↦
    (E, rows, cols), or (E, rows)."""
    if inputs is None:
        return adjoint.sum(0)
    return torch.einsum("ter,tec->erc", adjoint, inputs)
