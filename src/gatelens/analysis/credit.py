"""Credit maps: eq. (8) split by loss step, source step and lag, for every weight block.

For a loss L over the outputs and a weight block θ (docs/notation.md, 0-based: index i is step i+1):

    ∂L/∂θ = Σ_t Σ_{k≤t} C(t, k),      C(t, k) = g_t · J_t J_{t−1} ⋯ J_{k+1} · ∂⁺h_k/∂θ

where g_t is the gradient entering the state h_t through the output at step t (∂L_t/∂h_t for L = Σ_t L_t),
J_i = ∂h_i/∂h_{i−1}, and ∂⁺h_k/∂θ holds h_{k−1} fixed. C(t, k) is the *contribution* of source step k to loss step
t; t − k is its lag. A credit map holds, for every block:

    total        Σ_{t,k} C(t, k)  = ∂L/∂θ
    by_source    Σ_{t≥k} C(t, k), one per source step k          (T, *shape)
    by_lag       ‖Σ_{t−k=τ} C(t, k)‖_F, one per lag τ            (T,)
    norms        ‖C(t, k)‖_F, rows t, columns k (0 for k > t)    (T, T)
    path_shares  per step i and path p of J_{i+1}: ‖ā_{i+1} P_p‖ / Σ_q ‖ā_{i+1} P_q‖, ā_{i+1} = ∂L/∂h_{i+1}

``total`` and ``by_source`` need only the summed adjoint ā_k = Σ_{t≥k} g_t J_t ⋯ J_{k+1}, i.e. BPTT. ``by_lag`` and
``norms`` need every chain a_{t,k} = g_t J_t ⋯ J_{k+1} on its own: one backward sweep over time carries the chains
of every loss step reached so far, stacked into one tensor, so moving them costs one batched product per step; a
window of steps at a time, their chains are laid out by lag and their contributions contracted in a few large
products (``by_lag``: one GEMM per group of blocks; ``norms``: projections by the SVD of each step's inputs), see
:func:`chain_sweep`. Memory stays O(chains·B·S) per window plus the results; no Jacobian is kept beyond its window.
Norms are scaled before squaring, so no contribution representable in the dtype reads as 0. Each property is
computed on first access; :meth:`CreditMap.compute` computes several at once, ``by_lag`` and ``norms`` from one sweep.

Models. A stack of unidirectional layers is one recurrence, so t is the true loss step for every layer. In a
bidirectional model every direction of every layer is its own recurrence, indexed in its own processing order (a
reverse direction's step i reads the input at time L_b − 1 − i, so its chains run forward in the inputs' time).
Below the top layer of a bidirectional model, the "loss step" t of a contribution is the step at which the exact
adjoint enters the layer from the layer above.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import pad

from gatelens._validation import FLOAT64_ADVICE, as_float_tensor, check_finite, check_shape, first_non_finite
from gatelens.analysis.norms import SAFE_RANGE, flushes_subnormals, frobenius, plain_range
from gatelens.cells.base import Factor, check_choice, wide_dtype
from gatelens.trace import DIRECTIONS, Recurrence, Trace

LOSSES = ("last", "all")
FIELDS = ("adjoints", "total", "by_source", "by_lag", "norms", "norm_rows", "path_shares")  # what a map computes
CHUNK_ELEMENTS = 1 << 24  # elements per buffered chunk of work (64 MiB in float32)
FACTOR_TEMPORARIES = 16  # (steps, B, S) tensors that param_factors forms at once, about
WINDOW_STEPS = 8  # steps a window of the all-chains sweep holds at least, memory permitting
WINDOW_ELEMENTS = 1 << 20  # elements of chains a window holds beyond WINDOW_STEPS steps (its work stays in cache)
SCALE_FREE = 30  # chains within 2^±SCALE_FREE of 1 are not rescaled for the pair norms
PAIR_TEMPORARIES = 8  # tensors the size of a window's chains (lags, steps, B, S) that chain_sweep forms at once, about


@dataclass(frozen=True, eq=False)
class CreditMap:
    """Contributions C(t, k) of every source step k to every loss step t, for every weight block.

    Build one with :func:`credit`. ``out_grads`` is the gradient at the model's outputs, time-major (T, B, F) and
    zero past each sequence's end; ``streams`` pairs each recurrence with the gradient g entering its states
    (T, B, S). Results are keyed by block name (``l0.W_iz``) and computed on first access.
    """

    trace: Trace
    out_grads: Tensor
    streams: tuple[tuple[Recurrence, Tensor], ...]
    loss_steps: Tensor | None = None  # the loss steps kept by :meth:`at_loss_steps` (None: the loss as given)

    @cached_property
    @flushes_subnormals
    def adjoints(self) -> dict[str, Tensor]:
        """ā_{i+1} = ∂L/∂h_{i+1} per recurrence name, (T, B, S): the summed adjoint of BPTT."""
        return {rec.name: summed_adjoints(rec, g) for rec, g in self.streams}

    @cached_property
    @flushes_subnormals
    def total(self) -> dict[str, Tensor]:
        """∂L/∂θ = Σ_{t,k} C(t, k) for every block, a chunk of source steps at a time (each chunk's steps and
        sequences contracted at once: no (T, *shape) intermediate)."""
        totals: dict[str, Tensor] = {}
        for rec, _ in self.streams:
            for window in step_chunks(rec):
                for name, factor in rec.param_factors(self.adjoints[rec.name][window], steps=window).items():
                    part = factor.contract(batch_dims=2)
                    totals[name] = totals[name] + part if name in totals else part
        return totals

    @cached_property
    @flushes_subnormals
    def by_source(self) -> dict[str, Tensor]:
        """Σ_{t≥k} C(t, k) for every source step k: (T, *shape) per block."""
        return {name: grad for rec, _ in self.streams for name, grad in rec.param_vjp(self.adjoints[rec.name]).items()}

    @cached_property
    @flushes_subnormals
    def by_lag(self) -> dict[str, Tensor]:
        """‖Σ_{t−k=τ} C(t, k)‖_F for every lag τ = 0..T−1: (T,) per block.

        A recurrence whose loss sits at one step t₀ alone (many-to-one) has one contribution per lag, and the BPTT
        adjoint is its only chain, so the lag profile is ‖C(t₀, t₀ − τ)‖_F = ‖by_source[t₀ − τ]‖_F, formed a chunk
        of source steps at a time: O(T) memory per block. Otherwise the lag sums Σ_{t−k=τ} C(t, k) are
        accumulated, O(T · |θ|) per block."""
        return self._lag_profiles(lambda rec, g: chain_sweep(rec, g, lag_sums=True))

    @cached_property
    @flushes_subnormals
    def norms(self) -> dict[str, Tensor]:
        """‖C(t, k)‖_F for every loss step t (rows) and source step k (columns): (T, T) per block."""
        norms: dict[str, Tensor] = {}
        for name, (loss_steps, rows) in self.norm_rows.items():
            norms[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
            norms[name][loss_steps] = rows
        return norms

    @cached_property
    @flushes_subnormals
    def norm_rows(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The rows of :attr:`norms` that can be nonzero, per block: the loss steps t of its recurrence (L,), in its
        own step order, and ‖C(t, k)‖_F for those t and every k, (L, T): O(L · T) memory instead of O(T²)."""
        return self._norm_rows(lambda rec, g: chain_sweep(rec, g, pair_norms=True))

    @flushes_subnormals
    def compute(self, *fields: str) -> CreditMap:
        """Compute ``fields`` now (default: total, by_source, by_lag and norms) and return the map.

        ``by_lag`` and ``norms`` (or ``norm_rows``) asked for together share one all-chains sweep per recurrence
        (:func:`chain_sweep`), where computing them one after the other runs two, and the BPTT adjoints behind
        ``total`` and ``by_source`` are summed from its chains, ā_k = Σ_{t≥k} a_{t,k} (equal to a BPTT sweep's to
        rounding), unless they were computed before.
        """
        fields = fields or ("total", "by_source", "by_lag", "norms")
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"CreditMap.compute: unknown field(s) {unknown}; expected some of {', '.join(FIELDS)}")
        pending = not {"by_lag", "norm_rows"} & set(self.__dict__)
        if pending and "by_lag" in fields and {"norms", "norm_rows"} & set(fields):
            profiles: dict[str, Tensor] = {}
            rows: dict[str, tuple[Tensor, Tensor]] = {}
            adjoints: dict[str, Tensor] = {}
            for rec, g in self.streams:
                done = chain_sweep(rec, g, lag_sums=len(_loss_steps(g)) > 1, pair_norms=True, adjoints=True)
                adjoints[rec.name] = self.__dict__.get("adjoints", {}).get(rec.name, done.adjoints)
                profiles |= self._lag_profile(rec, g, lambda *_, done=done: done, adjoints[rec.name])
                rows |= {name: (done.loss_steps, values) for name, values in done.pair_norms.items()}
            self.__dict__.setdefault("adjoints", adjoints)  # the cached properties' values
            self.__dict__["by_lag"] = self._every_block(profiles, self.out_grads.shape[:1])
            self.__dict__["norm_rows"] = self._ordered_rows(rows)
        for field in fields:
            getattr(self, field)
        return self

    def _lag_profiles(self, sweep: Callable[[Recurrence, Tensor], ChainSweep]) -> dict[str, Tensor]:
        """:attr:`by_lag`, with the lag sums of a recurrence reached at many loss steps from ``sweep``."""
        profiles: dict[str, Tensor] = {}
        for rec, g in self.streams:
            profiles |= self._lag_profile(rec, g, sweep)
        return self._every_block(profiles, self.out_grads.shape[:1])

    def _lag_profile(
        self,
        rec: Recurrence,
        g: Tensor,
        sweep: Callable[[Recurrence, Tensor], ChainSweep],
        adjoint: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The lag profiles of one recurrence's blocks: from its BPTT ``adjoint`` (default: :attr:`adjoints`) for a
        loss at one step, else from the lag sums of ``sweep``."""
        loss_steps = _loss_steps(g)
        if len(loss_steps) == 1:
            adjoint = self.adjoints[rec.name] if adjoint is None else adjoint
            return {
                name: _by_lag_of_one_row(row, int(loss_steps[0])) for name, row in _source_norms(rec, adjoint).items()
            }
        sums = sweep(rec, g).lag_sums  # the lags reached: the rest are 0
        return {name: pad(frobenius(part, part.dim() - 1), (0, rec.steps - len(part))) for name, part in sums.items()}

    def _norm_rows(self, sweep: Callable[[Recurrence, Tensor], ChainSweep]) -> dict[str, tuple[Tensor, Tensor]]:
        """:attr:`norm_rows` from ``sweep``."""
        rows: dict[str, tuple[Tensor, Tensor]] = {}
        for rec, g in self.streams:
            done = sweep(rec, g)
            rows |= {name: (done.loss_steps, values) for name, values in done.pair_norms.items()}
        return self._ordered_rows(rows)

    def _ordered_rows(self, rows: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """Norm rows in the model's block order, none for the blocks of a recurrence no loss step reaches."""
        steps = len(self.out_grads)
        none = (torch.zeros(0, dtype=torch.long, device=self.out_grads.device), self.out_grads.new_zeros(0, steps))
        ordered = self._every_block(rows, (0,))  # checks the names, in the model's block order
        return {name: rows.get(name, none) for name in ordered}

    def _every_block(self, results: dict[str, Tensor], shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Every block of the model in its order, zeros for the blocks of a recurrence no loss step reaches.

        A name that matches no block of the model, or a block of a reached recurrence without a result, is a bug:
        it raises rather than reading as zero credit.
        """
        unreached = {
            name for rec, g in self.streams if not bool(g.any()) for name in rec.qualify(dict(rec.cell.weights))
        }
        expected = set(self.trace.model.weights)
        unknown, missing = sorted(set(results) - expected), sorted(expected - set(results) - unreached)
        if unknown or missing:
            raise RuntimeError(
                f"credit map: results for blocks {unknown} that the model does not have, and none for {missing}; "
                f"the model's blocks are {sorted(expected)}"
            )
        zeros = self.out_grads.new_zeros(shape)
        return {name: results[name] if name in results else zeros for name in self.trace.model.weights}

    @cached_property
    @flushes_subnormals
    def path_shares(self) -> dict[str, Tensor]:
        """Share of ∂L/∂h_{i+1} flowing back through each path of J_{i+1}: (T,) per path, summing to 1."""
        shares: dict[str, Tensor] = {}
        for rec, _ in self.streams:
            shares |= path_shares(rec, self.adjoints[rec.name])
        return shares

    def at_loss_steps(self, steps: Tensor) -> CreditMap:
        """The credit map of the same loss kept at the loss steps ``steps`` (0-based, in the outputs' time) alone:
        its rows t of ``norms`` are this map's rows, exactly, since C(t, k) depends on g_t alone."""
        kept = torch.zeros_like(self.out_grads)
        kept[steps] = self.out_grads[steps]
        streams = tuple(_streams(self.trace, kept))
        return CreditMap(trace=self.trace, out_grads=kept, streams=streams, loss_steps=torch.unique(steps.cpu()))

    def to_dict(self) -> dict[str, Any]:
        """The results computed so far (``total`` always) as nested lists, ready for JSON."""
        computed = {"total": self.total} | {
            field: self.__dict__[field]
            for field in ("by_source", "by_lag", "norms", "path_shares")
            if field in self.__dict__
        }
        return {
            field: {name: value.detach().cpu().tolist() for name, value in results.items()}
            for field, results in computed.items()
        }


def credit(
    trace: Trace,
    out_grads: Any = None,
    *,
    loss: str | None = None,
    head: Callable[[Tensor], Tensor] | None = None,
    targets: Any = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> CreditMap:
    """The credit map of a loss on a trace; see the module docstring for what it holds.

    Either ``out_grads`` = ∂L/∂(output), shaped like ``trace.output`` (batch-first if the model is), or a loss:
    ``loss="last"`` applies ``head`` to the final state's output h_n, the many-to-one readout — each direction's
    output at the last step it processes: time L_b − 1 (the sequence's length − 1) for a forward direction, time 0
    for a reverse one (so for a bidirectional model [forward h at L_b − 1, reverse h at 0], not ``output[-1]``,
    whose reverse half has read x at L_b − 1 alone; pass ``out_grads`` for such a loss) — and ``loss="all"``
    to the outputs of every step; ``loss_fn(head(outputs), targets)`` must be a scalar (default ``head``: the
    identity; default ``loss_fn``: mean squared error). ``loss_fn`` receives the predictions as (N, C) and the
    targets as (N, C), or as integer class indices (N,), the layout torch's losses expect (N = sequences for
    "last", steps × sequences for "all"). Gradients at steps past a sequence's end are dropped: the model's output
    there is a constant zero.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"credit needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    gradients = _output_gradients(trace, out_grads, loss, head, targets, loss_fn)
    time_major = _time_major(trace, gradients)
    if trace.lengths is not None:
        mask = torch.arange(time_major.shape[0], device=time_major.device)[:, None] < trace.lengths[None, :]
        time_major = torch.where(mask[..., None], time_major, 0.0)
    return CreditMap(trace=trace, out_grads=time_major, streams=tuple(_streams(trace, time_major)))


# ---------------------------------------------------------------------------------------------------------------
# The loss's gradient at the outputs, and how it enters each recurrence.


def _time_major(trace: Trace, values: Tensor) -> Tensor:
    """A tensor laid out like ``trace.output`` as (T, B, F)."""
    if values.dim() == 2:
        return values.unsqueeze(1)
    return values.transpose(0, 1) if trace.model.batch_first else values


def _output_gradients(
    trace: Trace,
    out_grads: Any,
    loss: str | None,
    head: Callable[[Tensor], Tensor] | None,
    targets: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> Tensor:
    """∂L/∂(output), laid out like ``trace.output``, from out_grads or from (loss, head, targets, loss_fn)."""
    output = trace.output
    if out_grads is not None:
        options = {"loss": loss, "head": head, "targets": targets, "loss_fn": loss_fn}
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise TypeError(f"give either out_grads or loss= with targets=, not both (also given: {', '.join(given)})")
        gradients = as_float_tensor(out_grads, "out_grads", output.dtype, output.device)
        check_shape(gradients, output.shape, "out_grads", "the shape of trace.output")
        check_finite(gradients, "out_grads")
        return gradients
    if loss is None:
        raise TypeError("credit needs out_grads (shaped like trace.output), or loss='last' or 'all' with targets=")
    check_choice("loss", loss, LOSSES)
    if targets is None:
        raise TypeError(f"loss={loss!r} needs targets=")
    with torch.inference_mode(False), torch.enable_grad():  # the loss is differentiated whatever the caller's mode
        outputs = output.detach().clone().requires_grad_(True)
        predictions = _user_call("head", head or (lambda y: y), _loss_inputs(trace, outputs, loss))
        if not isinstance(predictions, Tensor) or predictions.dim() == 0:
            raise TypeError(f"head must return a tensor with a feature dimension, got {predictions!r:.80}")
        predictions, targets = _flat_for_loss(predictions, _as_targets(targets, predictions, loss))
        value = _user_call("loss_fn", loss_fn or torch.nn.functional.mse_loss, predictions, targets)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {value!r:.80}")
        if not value.requires_grad:
            raise ValueError("the loss does not depend on the model's outputs: check head and loss_fn")
        check_finite(value.detach(), "the loss")
        (gradients,) = torch.autograd.grad(value, outputs, allow_unused=True, materialize_grads=True)
    return gradients


def _loss_inputs(trace: Trace, outputs: Tensor, loss: str) -> Tensor:
    """What the head reads: every output ("all"), or the final state's output h_n ("last"): each direction's output at
    the last step it processes — time L_b − 1 for a forward direction, time 0 for a reverse one — side by side as in
    the output (for a forward model, the output at each sequence's last step)."""
    if loss == "all":
        return outputs
    time_major = _time_major(trace, outputs)
    steps, batch = time_major.shape[:2]
    sequences = torch.arange(batch, device=outputs.device)
    lengths = trace.lengths if trace.lengths is not None else torch.full((batch,), steps, device=outputs.device)
    top = trace.model.layers[-1]
    width = top[0].output_size
    parts = []
    for index, name in enumerate(trace.model.names()[-len(top) :]):
        time = torch.zeros_like(lengths) if name.endswith("_reverse") else lengths - 1
        parts.append(time_major[time, sequences, index * width : (index + 1) * width])
    last = torch.cat(parts, dim=-1)
    return last.squeeze(0) if outputs.dim() == 2 else last


def _user_call(name: str, function: Callable[..., Any], *args: Tensor) -> Any:
    """Call a user's head or loss_fn, reporting a failure with the shapes it was given."""
    try:
        return function(*args)
    except Exception as error:  # a user's function may raise anything: say what it was given
        given = ", ".join(f"shape {tuple(a.shape)} {a.dtype}" for a in args)
        raise ValueError(f"{name} failed on inputs of {given}: {error}") from None


def _as_targets(targets: Any, predictions: Tensor, loss: str) -> Tensor:
    """Targets as a tensor on the predictions' device: shaped like them, or integer class indices without the
    last (class) dimension."""
    try:
        targets = torch.as_tensor(targets, device=predictions.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"targets must be a tensor or a rectangular array of numbers, got {targets!r:.80}") from None
    indices = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    if targets.shape == predictions.shape or (indices and targets.shape == predictions.shape[:-1]):
        return targets
    raise ValueError(
        f"targets have shape {tuple(targets.shape)} ({targets.dtype}), but the head's predictions for loss={loss!r} "
        f"have shape {tuple(predictions.shape)}; expected targets of that shape, or integer class indices of shape "
        f"{tuple(predictions.shape[:-1])}"
    )


def _flat_for_loss(predictions: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(…, C) predictions as (N, C), and targets as (N, C) or class indices (N,), the layout torch's losses take."""
    flat_targets = targets.reshape(-1, targets.shape[-1]) if targets.shape == predictions.shape else targets.reshape(-1)
    return predictions.reshape(-1, predictions.shape[-1]), flat_targets


def _streams(trace: Trace, out_grads: Tensor) -> list[tuple[Recurrence, Tensor]]:
    """Each recurrence and the gradient entering its states (T, B, S) in its own step order.

    A unidirectional model is one recurrence (its stack). In a bidirectional model the top layer's directions
    take their halves of out_grads; each lower layer takes the exact adjoint at its output, which is the sum of
    the input VJPs of the layer above (BPTT through that layer), mapped back to the inputs' time order.
    """
    model = trace.model
    if not model.bidirectional:
        rec = trace.recurrence()  # a model with reverse=True runs in its own (reversed) step order
        return [(rec, rec.cell.output_vjp(rec.to_processing_order(out_grads)))]
    streams = []
    at_output = out_grads
    for layer in reversed(range(model.num_layers)):
        at_input: Tensor | int = 0
        for index, direction in enumerate(DIRECTIONS):
            rec = trace.recurrence(layer, direction)
            width = rec.cell.output_size
            g = rec.cell.output_vjp(rec.to_processing_order(at_output[..., index * width : (index + 1) * width]))
            streams.append((rec, g))
            if layer:
                at_input = at_input + rec.to_processing_order(rec.input_vjp(summed_adjoints(rec, g)))
        at_output = at_input  # type: ignore[assignment]
    order = model.names()
    return sorted(streams, key=lambda stream: order.index(stream[0].name))


# ---------------------------------------------------------------------------------------------------------------
# Sweeps over time.


@flushes_subnormals
def summed_adjoints(rec: Recurrence, g: Tensor) -> Tensor:
    """BPTT in 0-based arrays: ā[i] = g[i] + ā[i+1] · jacobians[i+1], from i = T−1 down; ā[i] = ∂L/∂h_{i+1}.

    g is (..., T, B, S): extra leading dimensions carry several losses through the same sweep.
    """
    adjoints = torch.empty_like(g)
    adjoint = g[..., -1, :, :]
    adjoints[..., -1, :, :] = adjoint
    for step in reversed(range(rec.steps - 1)):
        adjoint = g[..., step, :, :] + rec.state_vjp(adjoint, steps=step + 1)
        adjoints[..., step, :, :] = adjoint
    refuse_overflow(rec, adjoints.movedim((-3, -2), (0, 1)))  # (T, B, …, S)
    return adjoints


def refuse_overflow(rec: Recurrence, backward: Tensor) -> None:
    """Raise if a backward sweep through ``rec`` overflowed: ``backward`` (T, B, …) holds what it carried, or is the
    (T, B) mask of its finite steps; the error names the latest step that is not finite (where the sweep first
    overflowed) and its sequence.

    Gradients that grow beyond the dtype's range come back as inf or NaN, which would read as a missing or vanished
    gradient; the exact value is not representable, so this is refused rather than reported.
    """
    found = first_non_finite(backward, latest=True)
    if found is None:
        return
    step, sequence = found
    name = str(rec.states.dtype).removeprefix("torch.")
    advice = FLOAT64_ADVICE if rec.states.dtype != torch.float64 else "scale the loss down, or analyse fewer steps"
    raise ValueError(
        f"the gradient overflowed {name} flowing back through {rec.name}: it is not finite from step index {step} "
        f"(0-based) of sequence {sequence} backwards, because its true size exceeds the range of {name}; gatelens "
        f"does not report it, since inf and NaN would read as a missing gradient. To analyse it, {advice}"
    )


def step_chunks(rec: Recurrence, per_step: int = 0) -> list[slice]:
    """Consecutive slices of steps, each with at most CHUNK_ELEMENTS elements of the parameter factors' temporaries
    (FACTOR_TEMPORARIES tensors of (steps, B, S)) or of a (steps, per_step) tensor."""
    batch, size = rec.states.shape[1:]
    chunk = max(1, CHUNK_ELEMENTS // max(FACTOR_TEMPORARIES * batch * size, per_step))
    return [slice(start, min(start + chunk, rec.steps)) for start in range(0, rec.steps, chunk)]


def _source_norms(rec: Recurrence, adjoints: Tensor) -> dict[str, Tensor]:
    """‖Σ_b δ_bᵀ ⊗ u_b‖_F at every source step k, (T,) per block: the norms of by_source, as the pair norms of the
    one chain ā (:class:`PairSums`, by the inputs' SVD, without forming the (T, *shape) parts), a chunk at a time."""
    collected = PairSums(rec.steps, 1, lag_sums=False, pair_norms=True)
    for window in step_chunks(rec):
        chain = adjoints[window].unsqueeze(2)  # (steps, B, 1 chain, S)
        steps = torch.arange(window.start, window.stop, device=adjoints.device)
        zero = torch.zeros_like(steps)
        factors = rec.param_factors(chain.permute(2, 0, 1, 3), steps=window)
        collected.add(factors, chain.abs().amax(dim=-1).amax(dim=1), None, (zero, steps - window.start, zero, steps))
    return {name: norms[0] for name, norms in collected.pair_norms.items()}


def _loss_steps(g: Tensor) -> Tensor:
    """The steps i at which g (T, B, S) enters the states: g[i] ≠ 0."""
    return torch.nonzero(g.flatten(1).abs().amax(1) > 0).flatten()


def _by_lag_of_one_row(row: Tensor, step: int) -> Tensor:
    """The lag profile of a loss at one step: by_lag[τ] = row[step − τ] for τ ≤ step, 0 beyond."""
    profile = row.new_zeros(row.shape)
    profile[: step + 1] = row[: step + 1].flip(0)
    return profile


@dataclass(frozen=True)
class ChainSweep:
    """What one all-chains sweep collected: Σ_{t−k=τ} C(t, k) per lag reached (L ≤ T, *shape; the lags beyond have no
    contribution, their chains having vanished to exactly 0); ‖C(t, k)‖_F for the loss steps t
    (rows, ``loss_steps``) and every source step k: (loss steps, T); and the summed adjoints."""

    lag_sums: dict[str, Tensor]
    pair_norms: dict[str, Tensor]
    loss_steps: Tensor
    adjoints: Tensor | None = None  # Σ_{t≥k} a_{t,k} = ∂L/∂h_{k+1}, (T, B, S), where asked for


@flushes_subnormals
def chain_sweep(
    rec: Recurrence,
    g: Tensor,
    *,
    lag_sums: bool = False,
    pair_norms: bool = False,
    adjoints: bool = False,
    budget: int | None = None,
) -> ChainSweep:
    """One backward sweep carrying a chain a_{t,k} = g_t J_t ⋯ J_{k+1} for every loss step t with g_t ≠ 0.

    At each step k the chains of every t ≥ k move to k − 1 at once: through the state VJP (a cell forms the step's
    Jacobian when many chains make that cheaper), or, where every step of a window has at least S chains per sequence,
    through the window's Jacobians formed in one call (:func:`_formed_jacobians`). A chain that is exactly 0 stays 0,
    so the chains of the longest lags leave the sweep once they are (a vanishing gradient, flushed below the dtype's
    smallest normal number).

    Their contributions are taken a window of steps at a time. The window's chains are laid out in a tensor A, one row
    per lag, A[τ, k] = a_{k+τ,k} (zero where k + τ is no loss step), when lag sums are asked for, else one row per
    chain, A[t, k] = a_{t,k}; one call of the parameter VJP gives every adjoint δ in that layout, and the lag sums and
    pair norms are a few batched products per window (:class:`PairSums`). A window's temporaries (about
    PAIR_TEMPORARIES tensors the size of A) stay within ``budget`` elements (CHUNK_ELEMENTS by default), and at least
    half of A holds chains (:func:`_window`). With ``adjoints``, the chains of every step are also summed:
    ā_k = Σ_{t≥k} a_{t,k}, the BPTT adjoint.
    """
    loss_steps = _loss_steps(g)
    losses = loss_steps.tolist()
    ordered = np.asarray(losses)
    batch, size = g.shape[1:]
    collected = PairSums(rec.steps, len(losses), lag_sums=lag_sums, pair_norms=pair_norms)
    finite = torch.ones(rec.steps, batch, dtype=torch.bool, device=g.device)  # (T, B): every chain finite at step
    summed = torch.zeros_like(g) if adjoints else None
    budget = CHUNK_ELEMENTS if budget is None else budget
    moved = None  # the chains of the step after, moved to this step: (chains, B, S) in loss-step order
    alive = len(losses)  # the chains of the loss steps losses[:alive] are carried; later ones are exactly 0
    last = losses[-1] if losses else -1
    while last >= 0:
        first, low, high = _window(losses, alive, last, batch * size, budget, by_lag=lag_sums)
        start = bisect_left(losses, first)
        if lag_sums:  # every lag low..high where the loss steps are consecutive, else those the chains have
            consecutive = losses[alive - 1] - losses[start] == alive - 1 - start
            rows = np.arange(low, high + 1) if consecutive else _window_lags(ordered[:alive], first, last)
        else:
            consecutive, rows = True, ordered[start:alive]  # one row per loss step
        # A stored step-major, (steps, B, rows, S), so that every step's chains are one block and the adjoints come
        # out of the parameter VJP (elementwise in A) laid out alike: one matrix (steps·B, rows·adjoint rows).
        chains = g.new_zeros(last + 1 - first, batch, len(rows), size)
        jacobians = _formed_jacobians(rec, first, last, alive - bisect_left(losses, last))
        for step in range(last, first - 1, -1):
            index = bisect_left(losses, step)  # the chains of the loss steps losses[index:alive] are active
            column = chains[step - first].transpose(0, 1)  # (rows, B, S), a view
            if consecutive:  # the chains fill consecutive rows: a view of them
                active = column[losses[index] - step - low if lag_sums else index - start :][: alive - index]
                if losses[index] == step:
                    active[0] = g[step]
                if moved is not None:
                    active[len(active) - len(moved) :] = moved
            else:
                arriving = [g[step].unsqueeze(0)] if losses[index] == step else []
                active = torch.cat(arriving + ([] if moved is None else [moved]))  # moved is None after a gap
                column.index_copy_(0, _rows_of(rows, ordered[index:alive] - step, g.device), active)
            if step and jacobians is None:
                moved = rec.state_vjp(active, steps=step)
            elif step:
                moved = (active.transpose(0, 1) @ jacobians[step - first]).transpose(0, 1)
        largest = chains.abs().amax(dim=-1)  # (steps, B, rows): NaN or inf where a chain is not finite
        finite[first : last + 1] = torch.isfinite(largest.amax(dim=-1))
        if summed is not None:
            summed[first : last + 1] = chains.sum(dim=2)
        factors = rec.param_factors(chains.permute(2, 0, 1, 3), steps=slice(first, last + 1))
        cells = _pairs(ordered[:alive], first, last, rows, lag_sums, g.device)
        collected.add(factors, largest.amax(dim=1), rows if lag_sums else None, cells)
        if not first:
            break
        # A chain exactly 0 at the window's first step stays 0 (0 · J = 0, and flushed subnormals are 0): the
        # trailing ones (the longest lags, where gradients vanish) leave the sweep.
        at_first = ordered[start:alive] - first if lag_sums else ordered[start:alive]
        carried = torch.nonzero(largest[0].amax(dim=0)[_rows_of(rows, at_first, g.device)] != 0)  # NaN too
        alive = start + (int(carried.max()) + 1 if len(carried) else 0)
        if alive > start:
            moved, last = moved[: alive - start], first - 1
        else:  # none left: the next chains start at the latest loss step before the window
            moved, last = None, losses[start - 1] if start else -1
    refuse_overflow(rec, finite)
    if summed is not None:
        refuse_overflow(rec, summed)
    return ChainSweep(collected.lag_sums, collected.pair_norms, loss_steps, summed)


def _rows_of(rows: np.ndarray, keys: np.ndarray, device: torch.device) -> Tensor:
    """The positions of ``keys`` (lags, or loss steps) among a layout's ascending ``rows``."""
    return torch.from_numpy(np.searchsorted(rows, keys)).to(device)


def _formed_jacobians(rec: Recurrence, first: int, last: int, chains: int) -> Tensor | None:
    """J for the steps first..last at once, (steps, B, S, S), where every step has at least S chains per sequence to
    move (``chains`` at step ``last``, the fewest) and they fit in CHUNK_ELEMENTS; else None (the chains move by the
    state VJP). Forming a Jacobian costs about as much as the VJPs of its S rows, so moving S chains or more through
    it costs at most about twice the matrix-free way, whatever the cell, and one call for the window saves the
    per-step work of forming it a step at a time. (A cell that forms its Jacobian from fewer covectors, the GRU with
    reset "after" from FORM_FROM covectors on, still does so inside its state VJP.)"""
    batch, size = rec.states.shape[1:]
    if chains < size or (last + 1 - first) * batch * size * size > CHUNK_ELEMENTS:
        return None
    return rec.jacobians(steps=slice(first, last + 1))


def _window(
    losses: list[int], alive: int, last: int, per_cell: int, budget: int, *, by_lag: bool
) -> tuple[int, int, int]:
    """The window of the sweep that ends at step ``last``, whose chains belong to the loss steps losses[:alive]:
    (first step, lowest lag, highest lag) of the chains it holds.

    It grows backwards from ``last`` while at least half of its layout's cells (rows × steps: a row per lag from the
    lowest to the highest ``by_lag``, else per chain) hold a chain (sparse loss steps leave empty cells by lag) and
    while it has fewer than WINDOW_STEPS steps or its chains fit in WINDOW_ELEMENTS (``per_cell`` elements per cell),
    and never beyond ``budget`` elements of temporaries (PAIR_TEMPORARIES per element of the chains)."""
    latest = losses[alive - 1]
    first, low, filled = last, latest - last, 0
    while first >= 0:
        index = bisect_left(losses, first)
        lowest = min(low, losses[index] - first)
        cells = ((latest - first + 1 - lowest) if by_lag else alive - index) * (last - first + 1)
        sparse = cells > 2 * (filled + alive - index)
        large = last - first >= WINDOW_STEPS and cells * per_cell > WINDOW_ELEMENTS
        if first < last and (sparse or large or cells * per_cell * PAIR_TEMPORARIES > budget):
            break
        low, filled, first = lowest, filled + alive - index, first - 1
    return first + 1, low, latest - first - 1


def _window_lags(ordered: np.ndarray, first: int, last: int) -> np.ndarray:
    """The lags t − k of every chain of the steps k = first..last (loss steps t ≥ k), ascending, each once."""
    starts = np.searchsorted(ordered, np.arange(first, last + 1))
    return np.unique(np.concatenate([ordered[start:] - step for step, start in enumerate(starts, first)]))


def _pairs(
    ordered: np.ndarray, first: int, last: int, rows: np.ndarray, by_lag: bool, device: torch.device
) -> tuple[Tensor, ...]:
    """The pairs (t, k) of a window whose layout has the ascending ``rows`` (lags ``by_lag``, else loss steps) and the
    loss steps ``ordered``: for each, its cell of the layout (the row of lag t − k, or of t; the column k − first), the
    index of t among the loss steps and k; four (pairs,) long tensors."""
    steps = np.arange(first, last + 1)
    starts = np.searchsorted(ordered, steps)  # the first active chain of each step
    counts = len(ordered) - starts
    step_of = np.repeat(steps, counts)
    chain = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts - starts, counts)
    row = np.searchsorted(rows, ordered[chain] - step_of if by_lag else ordered[chain])
    return tuple(torch.from_numpy(a).to(device) for a in (row, step_of - first, chain, step_of))


Group = tuple[Tensor, list[tuple[str, Tensor | None]]]


def _grouped(factors: dict[str, Factor]) -> list[Group]:
    """Blocks grouped by their shared adjoint tensor (one pre-activation feeds several blocks)."""
    groups: dict[int, Group] = {}
    for name, factor in factors.items():
        groups.setdefault(id(factor.adjoint), (factor.adjoint, []))[1].append((name, factor.inputs))
    return list(groups.values())


class PairSums:
    """Σ_{t−k=τ} C(t, k) (per lag, (T, *shape)) and ‖C(t, k)‖_F (per pair, (loss steps, T)) for every block, from the
    factors of the sweep's windows: adjoints δ (lags, steps, B, rows) laid out by lag (stored step-major, as the chains
    are), inputs u (steps, B, cols).

    Lag sums: with D[(j, b), (τ, i)] = δ[τ, j, b, i] and U[(j, b)] = u_b at step j (a column of ones for a bias; the
    blocks that share an adjoint side by side), sums[τ]ᵀ += Uᵀ D[:, τ] for every lag of the window at once: one matrix
    product per group of blocks, contracting over the window's steps × sequences.

    Pair norms: with the thin SVD u = P diag(σ) Vᵀ of a step's inputs (B × cols), a contribution δᵀ u = δᵀ P diag(σ)
    Vᵀ has, V having orthonormal rows, the norm ‖diag(σ) Pᵀ δ‖_F (a bias: ‖1ᵀ δ‖): the rows σ_j p_jᵀ of every block
    of a group are stacked and applied to all its adjoints at once. Exact to rounding even when the sequences'
    contributions cancel (a Gram-matrix form would square them and lose half the digits). Each row's norm is summed
    plainly where that is exact (:func:`_row_norms`), the blocks' sums of squares in float64.
    """

    def __init__(self, steps: int, chains: int, *, lag_sums: bool, pair_norms: bool) -> None:
        self.steps, self.chains = steps, chains
        self.want_sums, self.want_norms = lag_sums, pair_norms
        self.members: list[list[tuple[str, Tensor | None]]] = []  # each group's blocks (names, inputs)
        self.group_sums: list[Tensor] = []  # per group: (Σ columns, lags held, rows), grown as lags are reached
        self.norms: Tensor | None = None  # (blocks, chains, T) in the order of the groups' blocks
        self.reads: Tensor | None = None  # (Σ projected rows, blocks): the rows each block sums, from the first window

    def add(
        self, factors: dict[str, Factor], largest: Tensor, lags: np.ndarray | None, pairs: tuple[Tensor, ...]
    ) -> None:
        """Add one window: the factors of its chains A (rows, steps, B, S), the largest |a| in each cell of A (steps,
        rows), the lags of A's rows (ascending; None where they are chains, for the norms alone) and its pairs
        (:func:`_pairs`)."""
        groups = [(_step_major(adjoint), members) for adjoint, members in _grouped(factors)]
        if not self.members:
            self.members = [members for _, members in groups]
        if self.want_sums:
            for index, (adjoint, members) in enumerate(groups):
                self._add_sums(index, adjoint, members, lags)
        if self.want_norms:
            self._add_norms(groups, largest, pairs)

    def _add_norms(self, groups: list[Group], largest: Tensor, pairs: tuple[Tensor, ...]) -> None:
        """The pair norms of every block of one window; ``largest`` (steps, lags) is the largest |a| in each cell."""
        _, exponents = torch.frexp(largest)  # largest = m · 2^e, ½ ≤ m < 1
        limit = int(math.log2(torch.finfo(largest.dtype).max)) - 2  # 2^±limit is a normal number
        exponents = torch.where(exponents.abs() <= SCALE_FREE, 0, exponents.clamp(-limit, limit))
        scaled = torch.nonzero(exponents.any(0)).flatten().tolist()  # the lags with a cell to scale
        window = Window(
            scales=torch.ldexp(torch.ones_like(largest), -exponents),
            lags=slice(scaled[0], scaled[-1] + 1) if scaled else slice(0),
            empty=largest == 0,
            cells=torch.stack(pairs[:2]),
            bases={},
        )
        rows, owners = zip(*[_projected_norms(adjoint, members, window) for adjoint, members in groups])
        norms = torch.cat(rows, dim=1).to(wide_dtype(largest.dtype)) / window.scales[pairs[1], pairs[0], None]
        if self.norms is None:
            self.reads = torch.block_diag(*owners).to(norms.device, norms.dtype)  # (Σ rows, blocks)
            self.norms = largest.new_zeros(self.reads.shape[1], self.chains, self.steps)
        blocks = (norms.square() @ self.reads).sqrt()  # exact for rows narrower than float64
        if norms.dtype == largest.dtype and not bool(((blocks >= SAFE_RANGE[0]) & (blocks <= SAFE_RANGE[1])).all()):
            blocks = torch.stack([frobenius(norms[:, column > 0], dims=1) for column in self.reads.T], dim=1)
        self.norms[:, pairs[2], pairs[3]] = blocks.T.to(largest.dtype)

    def _add_sums(
        self, index: int, adjoint: Tensor, members: list[tuple[str, Tensor | None]], lags: np.ndarray
    ) -> None:
        """sums[τ]ᵀ += Uᵀ D[:, τ] for every lag τ of the window; ``adjoint`` is D, (steps, B, lags, rows)."""
        steps, batch, count, rows = adjoint.shape
        ones = adjoint.new_ones(steps, batch, 1)
        inputs = torch.cat([ones if u is None else u for _, u in members], dim=-1).flatten(0, 1)  # U: (steps·B, Σ cols)
        if len(self.group_sums) <= index:
            self.group_sums.append(adjoint.new_zeros(inputs.shape[-1], 0, rows))
        self.group_sums[index] = _with_room(self.group_sums[index], int(lags[-1]) + 1, self.steps)
        sums, layout = self.group_sums[index], adjoint.flatten(0, 1).flatten(1)  # D: (steps·B, lags·rows)
        if lags[-1] + 1 - lags[0] == count:  # consecutive lags: the product adds into a view of the sums
            sums[:, lags[0] : lags[0] + count].flatten(1).addmm_(inputs.T, layout)
        else:
            lag_index = torch.from_numpy(lags).to(sums.device)
            sums.index_add_(1, lag_index, (inputs.T @ layout).view(-1, count, rows))

    @property
    def lag_sums(self) -> dict[str, Tensor]:
        """The sums by block name: (L, rows, columns), or (L, rows) for a bias (views of the group sums), for the lags
        0..L − 1 that chains reached; the lags from L to T − 1 have no contribution."""
        sums = {}
        for group_sums, members in zip(self.group_sums, self.members):
            widths = [1 if u is None else u.shape[-1] for _, u in members]
            for (name, u), part in zip(members, group_sums.split(widths)):
                sums[name] = part[0] if u is None else part.permute(1, 2, 0)
        return sums

    @property
    def pair_norms(self) -> dict[str, Tensor]:
        """‖C(t, k)‖_F by block name: (loss steps, T) each."""
        if self.norms is None:
            return {}
        names = [name for members in self.members for name, _ in members]
        return dict(zip(names, self.norms))


def _with_room(sums: Tensor, lags: int, limit: int) -> Tensor:
    """``sums`` (columns, lags held, rows) with room for ``lags`` lags: grown by a copy to min(limit, max(lags, twice
    those held)) where it holds fewer. A sweep whose chains vanish by lag V thus holds fewer than 2V lags, not T, and
    copies fewer than 2V in all."""
    held = sums.shape[1]
    if lags <= held:
        return sums
    grown = sums.new_zeros(sums.shape[0], min(limit, max(lags, 2 * held)), sums.shape[2])
    grown[:, :held] = sums
    return grown


def _step_major(adjoint: Tensor) -> Tensor:
    """δ (lags, steps, B, rows) as (steps, B, lags, rows): a view where the parameter VJP kept the step-major storage
    of the chains it was given, else a copy."""
    return adjoint.permute(1, 2, 0, 3).contiguous()


class Window(NamedTuple):
    """What the pair norms of one window share across its groups of blocks."""

    scales: Tensor  # (steps, lags): a power of two per cell that brings its largest |a| near 1 (1 where it is near)
    lags: slice  # the lags with a cell whose scale is not 1
    empty: Tensor  # (steps, lags): the cells whose chains are exactly 0
    cells: Tensor  # (2, pairs): the cells (lag row, step column) of the pairs
    bases: dict[int, Tensor]  # id(inputs) ↦ the rows σ_j p_jᵀ of the inputs' thin SVD, (steps, min(B, cols), B)


def _projected_norms(
    adjoint: Tensor, members: list[tuple[str, Tensor | None]], window: Window
) -> tuple[Tensor, Tensor]:
    """The norms ‖scale · σ_j p_jᵀ δ‖ of the projections of one adjoint δ, stored (steps, B, lags, rows), at the
    window's pairs, (pairs, Σ rows), and which of those rows each member block reads, (Σ rows, members): each step's
    adjoints are projected by the rows σ_j p_jᵀ of its inputs (the biases share a row of ones) in one product, and
    each cell scaled by its power of two so that the plain sums of squares stay in range (:func:`_row_norms`)."""
    steps, batch, lags, width = adjoint.shape
    keys, parts, owner = [], [], []  # the distinct row blocks, and the one each member reads
    for _, inputs in members:
        key = id(inputs)
        if key not in keys:
            if inputs is not None and key not in window.bases:
                left, singular, _ = torch.linalg.svd(_narrowed(inputs), full_matrices=False)
                window.bases[key] = singular.unsqueeze(-1) * left.mT
            keys.append(key)
            parts.append(adjoint.new_ones(steps, 1, batch) if inputs is None else window.bases[key])
        owner.append(keys.index(key))
    rows = torch.cat(parts, dim=1)  # (steps, Σ rows, B)
    projected = torch.bmm(rows, adjoint.view(steps, batch, lags * width)).view(steps, -1, lags, width)
    projected[:, :, window.lags].mul_(window.scales[:, None, window.lags, None])
    lag, step = window.cells
    norms = _row_norms(projected, step, lag, lambda: (rows == 0).all(-1)[step] | window.empty[step, lag, None])
    part_of_row = torch.repeat_interleave(torch.tensor([part.shape[1] for part in parts]))
    return norms, part_of_row.unsqueeze(1) == torch.tensor(owner)


def _narrowed(inputs: Tensor) -> Tensor:
    """A matrix (..., B, min(B, cols)) with the singular values and left singular vectors of ``inputs`` (..., B, cols):
    where cols > B, Rᵀ from the QR factorisation inputsᵀ = Q R (then inputs = Rᵀ Qᵀ, Q with orthonormal columns, and
    Householder QR is backward stable), so that the SVD is of a B × B matrix (five times faster at B = 16, cols =
    256); else ``inputs`` itself."""
    if inputs.shape[-1] <= inputs.shape[-2]:
        return inputs
    return torch.linalg.qr(inputs.mT).R.mT


def _row_norms(values: Tensor, step: Tensor, lag: Tensor, zero: Callable[[], Tensor]) -> Tensor:
    """‖values[j, i, τ, :]‖₂ at the cells (step j, lag τ) of the pairs: (pairs, rows i); summed plainly in the
    dtype, and again with each row scaled by its largest entry first where a norm lies outside the range in which the
    plain sum is exact to rounding (:func:`plain_range`), unless it is 0 where ``zero()`` (pairs, rows) says that
    it is exactly 0 (a zero row of the projection, or a cell without chains)."""
    plain = plain_range(values.dtype, values.shape[-1])
    if plain is None:
        return torch.linalg.vector_norm(values, dim=-1, dtype=wide_dtype(values.dtype))[step, :, lag]
    norms = torch.linalg.vector_norm(values, dim=-1)[step, :, lag]
    bad = ~((norms >= plain[0]) & (norms <= plain[1]))  # NaN is bad too
    if bool(bad.any()):
        bad = (bad & ~((norms == 0) & zero())).any(-1)
        if bool(bad.any()):
            part = values[step[bad], :, lag[bad]]  # (bad pairs, rows, entries)
            largest = part.abs().amax(-1)
            scaled = part / torch.where(largest > 0, largest, 1.0).unsqueeze(-1)
            norms[bad] = torch.linalg.vector_norm(scaled, dim=-1) * largest
    return norms


def path_shares(rec: Recurrence, adjoints: Tensor) -> dict[str, Tensor]:
    """‖ā_{i+1} P_p[i]‖_F / Σ_q ‖ā_{i+1} P_q[i]‖_F for every path p, (T,) each; 0 where no adjoint arrives.

    The products ā P_p come from the cell without forming P_p (:meth:`Recurrence.path_vjps`)."""
    chunk = max(1, CHUNK_ELEMENTS // (adjoints.shape[1] * rec.cell.covector_elements))
    flows: dict[str, list[Tensor]] = {}
    for start in range(0, rec.steps, chunk):
        window = slice(start, min(start + chunk, rec.steps))
        for name, vjp in rec.path_vjps(adjoints[window], steps=window).items():
            flows.setdefault(name, []).append(frobenius(vjp.flatten(1), dims=1))
    norms = {name: torch.cat(parts) for name, parts in flows.items()}
    total = torch.stack(list(norms.values())).sum(0)
    safe = torch.where(total > 0, total, 1.0)
    return rec.qualify({name: torch.where(total > 0, norm / safe, 0.0) for name, norm in norms.items()})
