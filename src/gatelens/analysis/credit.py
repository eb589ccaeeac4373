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
of every loss step reached so far, stacked into one tensor, so moving them costs one batched product per step,
and only that step's contributions are formed (``by_lag`` buffers a few steps to contract them in one GEMM;
``norms`` uses the SVD of the step's inputs). Memory stays O(chains·B·S) plus the results; no Jacobian is kept
beyond its step. Norms are scaled before squaring, so no contribution representable in the dtype reads as 0.
Each property is computed on first access.

Models. A stack of unidirectional layers is one recurrence, so t is the true loss step for every layer. In a
bidirectional model every direction of every layer is its own recurrence, indexed in its own processing order (a
reverse direction's step i reads the input at time L_b − 1 − i, so its chains run forward in the inputs' time).
Below the top layer of a bidirectional model, the "loss step" t of a contribution is the step at which the exact
adjoint enters the layer from the layer above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from gatelens._validation import FLOAT64_ADVICE, as_float_tensor, check_finite, check_shape, first_non_finite
from gatelens.analysis.norms import SAFE_RANGE, flushes_subnormals, frobenius
from gatelens.cells.base import Factor, check_choice
from gatelens.trace import DIRECTIONS, Recurrence, Trace

LOSSES = ("last", "all")
CHUNK_ELEMENTS = 1 << 24  # elements per buffered chunk of work (64 MiB in float32)
FACTOR_TEMPORARIES = 16  # (steps, B, S) tensors that param_factors forms at once, about


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
        norms: dict[str, Tensor] = {}
        for rec, g in self.streams:
            loss_steps = _loss_steps(g)
            if len(loss_steps) == 1:
                norms |= {
                    name: _by_lag_of_one_row(row, int(loss_steps[0]))
                    for name, row in _source_norms(rec, self.adjoints[rec.name]).items()
                }
                continue
            sums = chain_sweep(rec, g, lag_sums=True).lag_sums
            norms |= {name: frobenius(total, dims=total.dim() - 1) for name, total in sums.items()}
        return self._every_block(norms, self.out_grads.shape[:1])

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
        rows: dict[str, tuple[Tensor, Tensor]] = {}
        for rec, g in self.streams:
            sweep = chain_sweep(rec, g, pair_norms=True)
            rows |= {name: (sweep.loss_steps, values) for name, values in sweep.pair_norms.items()}
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
    """‖Σ_b δ_bᵀ ⊗ u_b‖_F at every source step k, (T,) per block: the norms of by_source, a chunk at a time."""
    parts: dict[str, list[Tensor]] = {}
    every_block = sum(weight.numel() for weight in rec.cell.weights.values())  # param_vjp forms them all at once
    for window in step_chunks(rec, every_block):
        for name, grad in rec.param_vjp(adjoints[window], steps=window).items():
            parts.setdefault(name, []).append(frobenius(grad.flatten(1), dims=1))
    return {name: torch.cat(values) for name, values in parts.items()}


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
    """What one all-chains sweep collected: Σ_{t−k=τ} C(t, k) per lag (T, *shape); ‖C(t, k)‖_F for the loss steps t
    (rows, ``loss_steps``) and every source step k: (loss steps, T)."""

    lag_sums: dict[str, Tensor]
    pair_norms: dict[str, Tensor]
    loss_steps: Tensor


@flushes_subnormals
def chain_sweep(rec: Recurrence, g: Tensor, *, lag_sums: bool = False, pair_norms: bool = False) -> ChainSweep:
    """One backward sweep carrying a chain a_{t,k} = g_t J_t ⋯ J_{k+1} for every loss step t with g_t ≠ 0.

    At step k the chains of every t ≥ k are one stacked tensor: their contributions C(t, k) are contracted from
    the step's parameter factors, then all of them move to k − 1 at once through the state VJP (:meth:`Recurrence.
    backward` gives both; a cell forms the step's Jacobian blocks when many chains make that cheaper).
    """
    steps = rec.steps
    loss_steps = _loss_steps(g)
    loss_steps_cpu = loss_steps.tolist()
    chains = g.new_zeros(g.shape[1], 0, g.shape[2])  # (B, active chains, S), ordered by loss step
    sums = LagSums(steps)
    norms: dict[str, Tensor] = {}
    first = len(loss_steps)  # the active chains belong to loss_steps[first:]
    finite = torch.ones(steps, g.shape[1], dtype=torch.bool, device=g.device)  # (T, B): every chain finite at step
    for step in reversed(range(steps)):
        if first and loss_steps_cpu[first - 1] == step:
            first -= 1
            chains = torch.cat([g[step].unsqueeze(1), chains], dim=1)
        if first == len(loss_steps):
            continue
        active = chains.transpose(0, 1)  # (chains, B, S), a view
        finite[step] = torch.isfinite(chains).flatten(1).all(1)  # checked once at the end: no sync per step
        if step:  # factors kept by LagSums: chains is never written in place
            factors, moved = rec.backward(active, steps=step)
        else:
            factors = rec.param_factors(active, steps=step)
        if lag_sums:
            sums.add(loss_steps[first:] - step, loss_steps_cpu[first] - step, loss_steps_cpu[-1] - step, factors)
        if pair_norms:
            for name, norm in chain_norms(factors).items():
                if name not in norms:
                    norms[name] = norm.new_zeros(len(loss_steps), steps)
                norms[name][first:, step] = norm
        if not step:
            break
        chains = moved.transpose(0, 1)
    sums.flush()
    refuse_overflow(rec, finite)
    return ChainSweep(lag_sums=sums.sums, pair_norms=norms, loss_steps=loss_steps)


Group = tuple[Tensor, list[tuple[str, Tensor | None]]]


def _grouped(factors: dict[str, Factor]) -> list[Group]:
    """Blocks grouped by their shared adjoint tensor (one pre-activation feeds several blocks)."""
    groups: dict[int, Group] = {}
    for name, factor in factors.items():
        groups.setdefault(id(factor.adjoint), (factor.adjoint, []))[1].append((name, factor.inputs))
    return list(groups.values())


class LagSums:
    """Σ_{t−k=τ} C(t, k) per block, shape (T, *shape), accumulated from the chains' factors step by step.

    One step's contributions Σ_b δ_bᵀ ⊗ u_b contract over the batch only. Buffering C steps and laying their
    adjoints out by lag, D[(j, b), τ] = δ_b of the chain whose lag is τ at buffered step j, turns the update into
    one matrix product per group of blocks that contracts over C·B at once:

        sums[τ]ᵀ += Uᵀ D[:, τ],      U[(j, b)] = u_b at step j (a column of ones for a bias),

    with the blocks that share an adjoint side by side in U. Steps are buffered while D stays within ``budget``
    elements and more than half full (sparse loss steps would leave most of D empty).
    """

    def __init__(self, steps: int, budget: int | None = None) -> None:
        self.steps = steps
        self.budget = CHUNK_ELEMENTS if budget is None else budget
        self.group_sums: list[Tensor] = []  # per group of blocks: (Σ columns, T, rows)
        self.members: list[list[tuple[str, Tensor | None]]] = []
        self.pending: list[tuple[Tensor, int, int, list[Group]]] = []
        self.low = self.high = 0
        self.filled = 0  # lags held by the buffered steps

    def add(self, lags: Tensor, low: int, high: int, factors: dict[str, Factor]) -> None:
        """Buffer one step: chains with lags ``lags`` (ascending, from ``low`` to ``high``) and their factors."""
        groups = _grouped(factors)
        if self.pending:
            span = max(high, self.high) + 1 - min(low, self.low)
            cells = (len(self.pending) + 1) * span
            width = sum(adjoint[0].numel() for adjoint, _ in groups)
            if cells * width > self.budget or cells >= 2 * (self.filled + len(lags)):
                self.flush()
        if not self.pending:
            self.low, self.high = low, high
        self.low, self.high = min(low, self.low), max(high, self.high)
        self.pending.append((lags, low, high, groups))
        self.filled += len(lags)

    def flush(self) -> None:
        """Contract the buffered steps into the sums."""
        if not self.pending:
            return
        span = self.high + 1 - self.low
        for index, (first_adjoint, members) in enumerate(self.pending[0][3]):
            batch, rows = first_adjoint.shape[-2:]
            inputs = []
            for _, _, _, groups in self.pending:
                adjoint, step_members = groups[index]
                ones = adjoint.new_ones(batch, 1)
                inputs.append(torch.cat([ones if u is None else u for _, u in step_members], dim=-1))
            stacked = torch.cat(inputs)  # U: (C·B, Σ columns)
            if len(self.group_sums) <= index:
                self.group_sums.append(stacked.new_zeros(stacked.shape[-1], self.steps, rows))
                self.members.append(members)
            window = self.group_sums[index][:, self.low : self.high + 1].flatten(1)  # a view: (Σ columns, span·rows)
            window.addmm_(stacked.T, self._by_lag(index, span))
        self.pending.clear()
        self.filled = 0

    def _by_lag(self, index: int, span: int) -> Tensor:
        """D for group ``index``: (C·B, span·rows), row (j, b) holding step j's adjoints placed by lag."""
        if len(self.pending) == 1 and self.pending[0][0].numel() == span:  # one step, lags low..high: D = δ
            adjoint = self.pending[0][3][index][0]
            return adjoint.transpose(0, 1).reshape(adjoint.shape[1], -1)
        first_adjoint = self.pending[0][3][index][0]
        batch, rows = first_adjoint.shape[-2:]
        by_lag = first_adjoint.new_empty(len(self.pending), batch, span, rows)
        for position, (lags, low, high, groups) in enumerate(self.pending):
            adjoint = groups[index][0]
            _place(by_lag[position], adjoint.transpose(0, 1), lags - self.low, low - self.low, high - self.low)
        return by_lag.view(len(self.pending) * batch, span * rows)

    @property
    def sums(self) -> dict[str, Tensor]:
        """The sums by block name: (T, rows, columns), or (T, rows) for a bias (views of the group sums)."""
        sums = {}
        for group_sums, members in zip(self.group_sums, self.members):
            widths = [1 if u is None else u.shape[-1] for _, u in members]
            for (name, u), part in zip(members, group_sums.split(widths)):
                sums[name] = part[0] if u is None else part.permute(1, 2, 0)
        return sums


def _place(target: Tensor, values: Tensor, positions: Tensor, first: int, last: int) -> None:
    """target[:, positions] = values and zero elsewhere along dim 1, for ascending positions from ``first`` to
    ``last``; when they are a contiguous run this is a slice copy with only the margins zeroed."""
    start, end = first, last + 1
    if end - start == values.shape[1]:
        target[:, :start] = 0
        target[:, start:end] = values
        target[:, end:] = 0
    else:
        target.zero_()
        target.index_copy_(1, positions, values)


def chain_norms(factors: dict[str, Factor]) -> dict[str, Tensor]:
    """Per chain, ‖Σ_b δ_bᵀ ⊗ u_b‖_F (a bias: ‖Σ_b δ_b‖): (chains,) per block.

    With the thin SVD u = P diag(σ) Vᵀ of the step's inputs (B × cols, one per distinct input), the contribution
    is δᵀ P diag(σ) Vᵀ and, V having orthonormal rows, its norm is ‖diag(σ) Pᵀ δ‖_F (a bias: ‖1ᵀ δ‖): B·min(B, cols)
    work per row of δ instead of B·cols, and exact to rounding even when the sequences' contributions cancel (a
    Gram-matrix form would square them and lose half the digits). The blocks sharing an adjoint stack their rows
    σ_j p_jᵀ (or 1ᵀ) into one product; the squares are summed in float64, and a float64 norm outside the range
    where that is exact is recomputed with :func:`frobenius`.
    """
    norms = {}
    bases: dict[int, Tensor] = {}  # id(inputs) ↦ (min(B, cols), B) rows σ_j p_jᵀ
    for adjoint, members in _grouped(factors):
        rows = []
        for _, inputs in members:
            if inputs is None:
                rows.append(adjoint.new_ones(1, adjoint.shape[-2]))
                continue
            if id(inputs) not in bases:
                left, singular, _ = torch.linalg.svd(inputs, full_matrices=False)
                bases[id(inputs)] = singular.unsqueeze(-1) * left.mT
            rows.append(bases[id(inputs)])
        projected = torch.cat(rows, dim=-2) @ adjoint  # (chains, Σ rows, adjoint rows)
        squares = torch.linalg.vector_norm(projected, dim=-1, dtype=torch.float64).square()  # (chains, Σ rows)
        sizes = [r.shape[-2] for r in rows]
        for (name, _), part, block in zip(members, squares.split(sizes, dim=-1), projected.split(sizes, dim=-2)):
            norm = part.sum(-1).sqrt()
            if adjoint.dtype == torch.float64 and bool(((norm < SAFE_RANGE[0]) | (norm > SAFE_RANGE[1])).any()):
                norm = frobenius(block, dims=2)
            norms[name] = norm.to(adjoint.dtype)
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
