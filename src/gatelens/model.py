"""A Model is a list of recurrent layers, laid out as a PyTorch RNN module lays them out, that records traces.

Layer l reads x (l = 0) or the concatenated outputs of every direction of layer l − 1. A layer has one direction,
or two (forward, reverse) when the model is bidirectional; each direction is its own recurrence. A unidirectional
model may read every sequence backwards (``reverse=True``, as an ONNX node with direction="reverse"). Inference only:
dropout between layers is a training-time operation and is not applied.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gatelens._validation import (
    FLOAT64_ADVICE,
    as_float_tensor,
    as_lengths,
    check_finite,
    check_shape,
    first_non_finite,
)
from gatelens.cells.base import Cell, Clamp, cache_tensors, preallocated_cache
from gatelens.cells.stack import Stack
from gatelens.trace import Recurrence, Trace, gather_time


class LayoutWarning(UserWarning):
    """The input's layout may not be the one the model reads it in."""


InitialState = Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor] | None
FinalState = Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]
StepClamps = Mapping[str, Clamp]  # recurrence name ↦ gate ↦ (value, where), each (T, B, U) in processing order


def _layers_from(spec: Cell | Sequence[Cell | Sequence[Cell]]) -> tuple[tuple[Cell, ...], ...]:
    """Normalise a cell, a stack or a list of layers (a cell, or a (forward, reverse) pair each)."""
    if isinstance(spec, Stack):
        return tuple((cell,) for cell in spec.cells)
    if isinstance(spec, Cell):
        return ((spec,),)
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise TypeError(f"a Model is built from a cell or a non-empty list of layers, got {type(spec).__name__}")
    layers = []
    for index, layer in enumerate(spec):
        directions = (layer,) if isinstance(layer, Cell) else tuple(layer)
        if not 1 <= len(directions) <= 2 or not all(
            isinstance(c, Cell) and not isinstance(c, Stack) for c in directions
        ):
            raise TypeError(f"layer {index} must be a cell or a (forward, reverse) pair of cells, got {layer!r}")
        layers.append(directions)
    return tuple(layers)


@dataclass(frozen=True, eq=False, init=False)
class Model:
    """Recurrent layers that record :class:`~gatelens.Trace` objects.

    Traces are the deterministic (eval-mode) forward pass: dropout between layers is not applied.

    ``layers[l][d]`` is the cell of layer l in direction d (0 forward, 1 reverse). Block names are qualified by
    layer and direction as in PyTorch: ``l0.W_hz``, ``l1.W_hz``, ``l0_reverse.W_hz``. With ``reverse=True`` a
    unidirectional model reads each sequence from its last step to its first, and its layers are named
    ``l0_reverse``, ``l1_reverse``, ….

    ``batch_first=None`` says the layout was not recorded (a PyTorch state_dict does not hold it): inputs are read
    as (T, B, I), and :meth:`trace` warns (:class:`LayoutWarning`) when x's first axis is shorter than its second,
    which is what a (B, T, I) batch of long sequences looks like.
    """

    layers: tuple[tuple[Cell, ...], ...]
    batch_first: bool | None
    source: str
    reverse: bool

    def __init__(
        self,
        layers: Cell | Sequence[Cell | Sequence[Cell]],
        *,
        batch_first: bool | None = False,
        source: str = "",
        reverse: bool = False,
    ) -> None:
        normalised = _layers_from(layers)
        directions = {len(layer) for layer in normalised}
        if len(directions) > 1:
            raise ValueError("every layer must have the same number of directions (1, or 2 when bidirectional)")
        width = len(normalised[0])
        for index, layer in enumerate(normalised):
            if len({(c.input_size, c.state_size, c.output_size) for c in layer}) > 1:
                raise ValueError(f"layer {index}: both directions must have the same sizes")
            if index and layer[0].input_size != width * normalised[index - 1][0].output_size:
                raise ValueError(
                    f"layer {index} expects {layer[0].input_size} input features, but layer {index - 1} "
                    f"outputs {width * normalised[index - 1][0].output_size} ({width} direction(s) × "
                    f"{normalised[index - 1][0].output_size})"
                )
        if len({(c.dtype, c.device) for layer in normalised for c in layer}) > 1:
            raise ValueError("all cells of a model must share one dtype and device")
        if reverse and width == 2:
            raise ValueError("reverse=True is for a unidirectional model; a bidirectional one already reads both ways")
        object.__setattr__(self, "layers", normalised)
        object.__setattr__(self, "reverse", bool(reverse))
        object.__setattr__(self, "batch_first", None if batch_first is None else bool(batch_first))
        object.__setattr__(self, "source", source)

    def __repr__(self) -> str:
        first = self.layers[0][0]
        return (
            f"Model({first!r}, num_layers={self.num_layers}, bidirectional={self.bidirectional}, "
            f"batch_first={self.batch_first}"
            + (", reverse=True" if self.reverse else "")
            + (f", source={self.source!r}" if self.source else "")
            + ")"
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bidirectional(self) -> bool:
        return len(self.layers[0]) == 2

    @property
    def input_size(self) -> int:
        return self.layers[0][0].input_size

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def names(self) -> list[str]:
        """Recurrence names in order: ``l0``, ``l0_reverse``, ``l1``, …"""
        return [
            f"l{l}" + ("_reverse" if d or self.reverse else "")
            for l, layer in enumerate(self.layers)
            for d in range(len(layer))
        ]

    def cells(self) -> dict[str, Cell]:
        """Every cell by recurrence name."""
        return dict(zip(self.names(), (cell for layer in self.layers for cell in layer)))

    @property
    def weights(self) -> dict[str, Tensor]:
        """Every weight block by qualified name (``l0.W_hz``, ``l0_reverse.b_in``, …)."""
        return {f"{name}.{block}": w for name, cell in self.cells().items() for block, w in cell.weights.items()}

    def to(self, *args: Any, **kwargs: Any) -> Model:
        """A copy with every weight converted by ``Tensor.to`` (e.g. ``model.to(torch.float64)``)."""
        layers = [tuple(cell.to(*args, **kwargs) for cell in layer) for layer in self.layers]
        return Model(layers, batch_first=self.batch_first, source=self.source, reverse=self.reverse)

    # -----------------------------------------------------------------------------------------------------------

    def trace(self, x: Any, h0: InitialState = None, *, lengths: Any = None, clamps: StepClamps | None = None) -> Trace:
        """Run the model on x and record every state and gate.

        x: (T, B, I), or (B, T, I) for a batch-first model, or (T, I) unbatched. The model moves to x's device.
        h0: as for the PyTorch module — (L·D, B, H_out), for an LSTM the pair (h0, c0) — or a dict mapping
            recurrence names (``"l0"``, …) to full states (B, S), or (S,) unbatched; zeros when omitted.
        lengths: (B,) true lengths for padded batches; steps past a sequence's end are the identity.
        clamps: gates fixed to constants: recurrence name ↦ gate ↦ (values, where), both (T, B, U) in the
            recurrence's processing order (``where`` boolean); usually built by :func:`gatelens.what_if`.

        Inputs and initial states are detached: a trace records values, not an autograd graph.
        """
        model = self
        if isinstance(x, Tensor) and x.device != self.device:
            model = self.to(x.device)
        given = inputs = as_float_tensor(x, "x", model.dtype, model.device).detach()
        unbatched = inputs.dim() == 2
        if inputs.dim() not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(
                f"x must be {layout} or unbatched (T, I), got a {inputs.dim()}-D tensor of shape {tuple(inputs.shape)}"
            )
        if unbatched:
            inputs = inputs.unsqueeze(1)
        elif self.batch_first:
            inputs = inputs.transpose(0, 1)
        steps, batch, features = inputs.shape
        if features != self.input_size:
            raise ValueError(f"x has {features} input features, expected {self.input_size}")
        if steps == 0 or batch == 0:
            raise ValueError(f"x must have at least one step and one sequence, got shape {tuple(x.shape)}")
        if self.batch_first is None and not unbatched and steps < batch:
            warnings.warn(
                f"x of shape {tuple(inputs.shape)} is read as (T, B, I) = {steps} steps of {batch} sequences, since "
                f"the model's source ({self.source or 'unknown'}) does not record the layout; if x is (B, T, I), "
                f"load the model with batch_first=True (--batch-first on the command line)",
                LayoutWarning,
                stacklevel=2,
            )
        check_finite(inputs, "x")
        mask = length = None
        if lengths is not None:
            length = as_lengths(lengths, batch, steps, model.device)
            mask = torch.arange(steps, device=model.device)[:, None] < length[None, :]
        initial = {name: state.detach() for name, state in model._initial_states(h0, batch, unbatched).items()}
        clamps = model._check_clamps(clamps or {}, steps, batch)

        recurrences: dict[str, Recurrence] = {}
        orders = [
            _time_order(steps, batch, mask, model.device, reverse=bool(d) or self.reverse)
            for d in range(len(model.layers[0]))
        ]
        layer_input = inputs
        names = iter(model.names())
        for layer in model.layers:
            outputs = []
            for cell, order in zip(layer, orders):
                name = next(names)
                clamp = clamps.get(name)
                rec = _record(name, cell, gather_time(layer_input, order), initial[name], mask, order, clamp)
                recurrences[name] = rec
                out = gather_time(cell.output(rec.states[1:]), order)  # back to the inputs' time order
                outputs.append(out if mask is None else torch.where(mask[..., None], out, 0.0))
            layer_input = torch.cat(outputs, dim=-1)

        output = (
            layer_input.squeeze(1) if unbatched else layer_input.transpose(0, 1) if self.batch_first else layer_input
        )
        final = model._final_state([rec.states[-1] for rec in recurrences.values()], unbatched)
        return Trace(
            model=model,
            inputs=given,
            output=output,
            final_state=final,
            recurrences=recurrences,
            lengths=length,
            clamps=clamps,
        )

    def _check_clamps(self, clamps: StepClamps, steps: int, batch: int) -> dict[str, Clamp]:
        """Clamps checked against the recurrences, their cells' gates and the (T, B, U) shape, as a plain dict."""
        cells = self.cells()
        if not isinstance(clamps, Mapping):
            raise TypeError(f"clamps must be a dict of recurrence name ↦ gate ↦ (values, where), got {clamps!r:.80}")
        unknown = sorted(set(clamps) - set(cells))
        if unknown:
            raise ValueError(f"clamps name recurrence(s) {unknown}; this model has {list(cells)}")
        checked: dict[str, Clamp] = {}
        for name, clamp in clamps.items():
            cell = cells[name]
            units = len(cell.unit_labels())
            gates = sorted(set(clamp) - set(cell.gate_names))
            if gates:
                raise ValueError(f"clamps[{name!r}] names gate(s) {gates}; the {cell.kind} cell has {cell.gate_names}")
            for gate, pair in clamp.items():
                values, where = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
                if not (isinstance(values, Tensor) and isinstance(where, Tensor) and where.dtype == torch.bool) or (
                    values.shape != (steps, batch, units) or where.shape != (steps, batch, units)
                ):
                    raise ValueError(
                        f"clamps[{name!r}][{gate!r}] must be a pair (values, where) of tensors of shape "
                        f"({steps}, {batch}, {units}) (steps, batch, units), where boolean"
                    )
            checked[name] = {
                gate: (v.to(self.dtype).to(self.device), w.to(self.device)) for gate, (v, w) in clamp.items()
            }
        return checked

    def _uniform(self) -> bool:
        """Whether every cell has the same state and output sizes, as in a PyTorch module (h0/h_n as tensors)."""
        sizes = {(c.state_size, c.output_size) for layer in self.layers for c in layer}
        return len(sizes) == 1

    def _initial_states(self, h0: InitialState, batch: int, unbatched: bool) -> dict[str, Tensor]:
        """Each recurrence's initial state (B, S) from h0 in any accepted form."""
        cells = self.cells()
        if h0 is None:
            return {
                name: torch.zeros(batch, c.state_size, dtype=self.dtype, device=self.device)
                for name, c in cells.items()
            }
        if isinstance(h0, Mapping):
            if set(h0) != set(cells):
                raise ValueError(f"h0 as a dict needs exactly the keys {list(cells)}, got {sorted(h0)}")
            states = {}
            for name, cell in cells.items():
                state = as_float_tensor(h0[name], f"h0[{name!r}]", self.dtype, self.device)
                check_shape(state, (cell.state_size,) if unbatched else (batch, cell.state_size), f"h0[{name!r}]")
                state = state.reshape(batch, cell.state_size)
                check_finite(state, f"h0[{name!r}]")
                states[name] = state
            return states
        first = next(iter(cells.values()))
        if not self._uniform():
            raise ValueError("layers of different sizes take h0 as a dict of states by recurrence name")
        extra = first.state_size - first.output_size  # the LSTM's cell state
        parts = h0 if isinstance(h0, tuple) else (h0,)
        names = ("h0", "c0")[: len(parts)]
        if len(parts) != (2 if extra else 1):
            expected = "a pair (h0, c0)" if extra else "one tensor"
            raise ValueError(f"h0 for a {first.kind} model must be {expected}, got {len(parts)} tensor(s)")
        tensors = []
        for name, part, width in zip(names, parts, (first.output_size, extra)):
            part = as_float_tensor(part, name, self.dtype, self.device)
            expected = (len(cells), width) if unbatched else (len(cells), batch, width)
            check_shape(part, expected, name, "num_layers × directions, batch, features")
            check_finite(part, name)
            tensors.append(part.unsqueeze(1) if unbatched else part)
        full = torch.cat(tensors, dim=-1)
        return {name: full[index] for index, name in enumerate(cells)}

    def _final_state(self, finals: list[Tensor], unbatched: bool) -> FinalState:
        """h_n (L·D, B, H_out), or (h_n, c_n) for an LSTM, as the PyTorch module returns them; for layers of
        different sizes, the final states by recurrence name."""
        first = self.layers[0][0]
        if not self._uniform():
            return {name: final.squeeze(0) if unbatched else final for name, final in zip(self.names(), finals)}
        stacked = torch.stack(finals)
        if unbatched:
            stacked = stacked.squeeze(1)
        h_n = stacked[..., : first.output_size]
        return (h_n, stacked[..., first.output_size :]) if first.state_size > first.output_size else h_n


def _time_order(steps: int, batch: int, mask: Tensor | None, device: torch.device, *, reverse: bool) -> Tensor:
    """(T, B) index of the input each step reads: i for forward; L_b − 1 − i for reverse (i past L_b: i)."""
    i = torch.arange(steps, device=device)[:, None].expand(steps, batch)
    if not reverse:
        return i
    if mask is None:
        return steps - 1 - i
    lengths = mask.sum(0)
    return torch.where(mask, lengths - 1 - i, i)


def _record(
    name: str, cell: Cell, inputs: Tensor, state: Tensor, mask: Tensor | None, order: Tensor, clamp: Clamp | None
) -> Recurrence:
    """Run one recurrence step by step, keeping every state and the gates of every step; ``clamp`` holds (T, B, U)
    values and masks per gate. A state that overflows (inf or NaN) is refused: see :func:`_check_states`."""
    steps = inputs.shape[0]
    states = state.new_empty((steps + 1, *state.shape))
    states[0] = state
    caches: Any = None
    for step in range(steps):
        step_clamp = None if clamp is None else {gate: (v[step], w[step]) for gate, (v, w) in clamp.items()}
        new_state, cache = cell.step(inputs[step], state, step_clamp)
        if mask is not None:  # past a sequence's end the state is carried unchanged
            new_state = torch.where(mask[step, :, None], new_state, state)
        states[step + 1] = new_state
        caches = preallocated_cache(cache, steps) if caches is None else caches
        for stored, value in zip(cache_tensors(caches), cache_tensors(cache)):
            stored[step] = value
        state = new_state
    _check_states(name, states, order)
    return Recurrence(name=name, cell=cell, states=states, cache=caches, mask=mask, input_index=order)


def _check_states(name: str, states: Tensor, order: Tensor) -> None:
    """Refuse a forward pass whose states stop being finite, naming the first such step and its sequence.

    Every analysis reads the states and the gates computed from them: past an overflow its Jacobians are 0 or NaN,
    which would read as a gradient that vanished. So a trace is only ever made of finite states.
    """
    found = first_non_finite(states)
    if found is None:
        return
    state, sequence = found
    step = state - 1  # states[i] is h_i, made by step index i − 1
    time = int(order[step, sequence])
    where = f"step index {step} (0-based)" + (f", which reads the input at time index {time}," if time != step else "")
    advice = "scale the weights or the inputs down" + (
        f", or {FLOAT64_ADVICE}" if states.dtype != torch.float64 else ""
    )
    raise ValueError(
        f"the forward pass overflowed: the state of {name} is not finite (inf or NaN) at {where} of sequence "
        f"{sequence}, with finite weights and inputs; gatelens does not analyse a diverging network, whose "
        f"derivatives past that step would read as vanishing; {advice}"
    )
