"""What-if: re-run a trace with chosen gates clamped to constants on chosen units and steps.

A clamped gate is replaced by the constant in the forward pass and is a constant for every derivative (its slope
is 0 there), so the new trace is the exact trace of the modified network: its Jacobians, credit maps and every
other analysis can be compared with the original's. For example, with a GRU (reset "after", update "keep"),
clamping z = r = 0 on every unit at step m makes J_m = 0 exactly: no credit crosses step m.

Gates are named as in the cell: a GRU has "r" and "z", an LSTM "i", "f" and "o"; an Elman RNN has none. Steps are
0-based indices into the recurrence's own steps (index i is step i+1; a reverse direction counts in its own
processing order, as :meth:`Trace.jacobians` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.cells.base import Clamp
from gatelens.trace import DIRECTIONS, Recurrence, Steps, Trace

Units = int | Sequence[int] | Tensor | None


def what_if(
    trace: Trace,
    clamp: Mapping[str, Any],
    *,
    units: Units = None,
    steps: Steps = None,
    layer: int | None = None,
    direction: str | None = None,
) -> Trace:
    """The trace of the same inputs and initial state with ``clamp`` applied; ``clamp={}`` gives an equal trace.
    Clamps add up: on a trace that was itself clamped, the earlier clamps stay and the new ones take over where both
    fix the same gate of the same unit and step.

    clamp: gate name ↦ value in [0, 1], a number or anything broadcastable to (steps chosen, B, units chosen).
    units: memory-unit indices within each chosen layer (default: all); steps: 0-based step indices, a slice or a
    list (default: all);
    layer/direction: the recurrences to clamp (default: every layer, every direction).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"what_if needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    if not isinstance(clamp, Mapping):
        raise TypeError(f"clamp must be a dict of gate name ↦ value, e.g. {{'z': 0.0}}, got {type(clamp).__name__}")
    clamps = dict(trace.clamps)
    if clamp:
        for rec in _chosen(trace, layer, direction):
            clamps[rec.name] = _merged(clamps.get(rec.name, {}), _clamp(rec, clamp, units, steps))
    inputs, unbatched = trace.inputs, trace.inputs.dim() == 2
    h0 = {name: rec.states[0, 0] if unbatched else rec.states[0] for name, rec in trace.recurrences.items()}
    return trace.model.trace(inputs, h0, lengths=trace.lengths, clamps=clamps)


def _merged(earlier: Clamp, later: Clamp) -> Clamp:
    """Clamps of a trace that was itself clamped, with the new ones taking over where both fix a gate."""
    merged = dict(earlier)
    for gate, (values, where) in later.items():
        if gate in merged:
            old_values, old_where = merged[gate]
            values, where = torch.where(where, values, old_values), where | old_where
        merged[gate] = (values, where)
    return merged


def _chosen(trace: Trace, layer: int | None, direction: str | None) -> list[Recurrence]:
    """The recurrences of the chosen layer(s) and direction(s)."""
    model = trace.model
    layers = range(model.num_layers) if layer is None else [layer]
    if direction is None:
        directions: Sequence[str | None] = DIRECTIONS if model.bidirectional else [None]
    else:
        directions = [direction]
    return [trace.recurrence(l, d) for l in layers for d in directions]


def _clamp(rec: Recurrence, clamp: Mapping[str, Any], units: Units, steps: Steps) -> Clamp:
    """Per gate, (value, where) over (T, B, U) for one recurrence."""
    cell = rec.cell
    unknown = sorted(set(clamp) - set(cell.gate_names))
    if unknown:
        has = f"its gates are {', '.join(map(repr, cell.gate_names))}" if cell.gate_names else "it has no gates"
        raise ValueError(f"clamp names gate(s) {unknown} that the {cell.kind} cell of {rec.name} lacks; {has}")
    dtype, device = rec.states.dtype, rec.states.device
    count = len(cell.unit_labels())
    chosen_steps = rec.step_index(slice(None) if steps is None else steps)
    step_index = torch.arange(rec.steps, device=device)[chosen_steps].reshape(-1)
    unit_index = _unit_index(units, count, rec.name).to(device)
    batch = rec.input_index.shape[1]
    where = torch.zeros(rec.steps, batch, count, dtype=torch.bool, device=device)
    where[step_index[:, None], :, unit_index[None, :]] = True
    result = {}
    for gate, value in clamp.items():
        chosen = _values(gate, value, (step_index.numel(), batch, unit_index.numel()), dtype, device)
        values = torch.zeros(rec.steps, batch, count, dtype=dtype, device=device)
        values[step_index[:, None], :, unit_index[None, :]] = chosen.permute(0, 2, 1)
        result[gate] = (values, where)
    return result


def _unit_index(units: Units, count: int, name: str) -> Tensor:
    """Unit indices as a 1-D long tensor, each in 0..count−1 (the units of recurrence ``name``)."""
    if units is None:
        return torch.arange(count)
    expected = f"units must be an int or a list of ints in 0..{count - 1} (the units of {name}), got {units!r:.80}"
    if isinstance(units, (bool, np.bool_, str, bytes)):
        raise TypeError(expected)
    try:
        index = torch.as_tensor(units).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(expected) from None
    if index.numel() == 0:
        return index.long()  # no unit chosen: nothing is clamped
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(expected)
    if int(index.min()) < 0 or int(index.max()) >= count:
        raise ValueError(f"units must lie in 0..{count - 1} (the units of {name}), got {index.tolist()}")
    return index.long()


def _values(gate: str, value: Any, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A clamp value as a (steps, B, units) tensor in [0, 1]."""
    try:
        values = torch.as_tensor(value, dtype=dtype, device=device)
        values = torch.broadcast_to(values, shape)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"clamp[{gate!r}] must be a number in [0, 1] or broadcast to (steps, batch, units) = {shape}, "
            f"got {value!r:.80}"
        ) from None
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any() | (values > 1).any()):
        raise ValueError(f"clamp[{gate!r}] must lie in [0, 1] (a gate's range), got {value!r:.80}")
    return values
