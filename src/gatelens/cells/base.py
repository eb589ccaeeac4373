"""The Cell protocol: one recurrent step and its exact derivatives.

Shape glossary, used in every module:
    T  time steps          B  batch          I  input features
    H  hidden units        S  state size (H for GRU/Elman; H_out + H for LSTM, whose state is [h, c])
    ...  extra leading dimensions (several adjoint vectors at once, or many steps at once)

A cell maps (x, s) ↦ s' and records a *cache* of its gates. Every derivative method takes that cache, so the
gates are computed once in the forward pass and reused. Caches are dataclasses of tensors whose leading
dimensions are free: a cache recorded for one step has shape (B, ·), and the trace stacks T of them into (T, B, ·).
All derivative methods broadcast over those leading dimensions, so one call serves every step at once.

Gated cells also say how much of each memory unit's past survives a step (:meth:`Cell.memory_gates`, used by the
regime analysis) and accept *clamps*: ``step(x, s, clamp={"z": (value, where)})`` replaces a gate by a constant
where ``where`` is True, with slope 0 there (a constant has no derivative), for what-if experiments.

The four derivatives, for s' = f(x, s; θ):

    jacobian_paths(cache)  {name: (..., S, S)}    named terms that sum exactly to J = ∂s'/∂s
    input_jacobian(cache)  (..., S, I)            ∂s'/∂x
    state_vjp(cache, v)    (..., S)               v · ∂s'/∂s      (v may carry extra leading dims)
    input_vjp(cache, v)    (..., I)               v · ∂s'/∂x
    param_vjp(cache, v)    {block: (..., *shape)} v · ∂⁺s'/∂θ, summed over the batch dimension (the cache's last
                                                  leading dimension); s is held fixed (the immediate derivative)

Every weight block θ enters a step through one product θ·u (a bias through θ·1), so its parameter VJP factors:

    v · ∂⁺s'/∂θ = Σ_b δ_bᵀ ⊗ u_b        (a bias: Σ_b δ_b)

where δ (..., B, rows) is v's adjoint at the product's output and u (B, cols) its input. Cells implement
``param_factors(cache, v) → {block: Factor(δ, u)}``; ``param_vjp`` is built from it, and analyses that need one
contribution per adjoint chain (credit maps) contract the factors themselves, which is far cheaper than forming
every outer product.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from gatelens.activations import CANDIDATE_ACTIVATIONS, GATE_ACTIVATIONS, Activation, get_activation

CellT = TypeVar("CellT", bound="Cell")
Clamp = Mapping[str, tuple[Tensor, Tensor]]  # gate name ↦ (value, where), both broadcastable to (B, units)


class MemoryGates(NamedTuple):
    """How much of each memory unit's past survives one step, read from the gates; each (..., B, U).

    carry  share of the unit's previous value kept as it is: GRU c (z for update "keep", 1 − z for "replace");
           LSTM f (on the cell state); Elman 0.
    admit  how open the route is by which the previous state enters the unit's new value through its candidate,
           in [0, 1]: GRU reset "after" r_j; reset "before" ‖W_hn[j, :] ⊙ r‖ / ‖W_hn[j, :]‖ (the candidate of
           unit j reads r ⊙ h, so its row is closed only where the other units' r close it too; 0 for a zero
           row); LSTM i (the input gate on the candidate g); Elman 1.
    gate   the unit's own gate on that route: GRU r_j, LSTM i_j, Elman 1 (equal to ``admit`` except for reset
           "before").
    leak   1 − carry, formed from the gates without cancellation (GRU "replace": z itself, not 1 − (1 − z)), so a
           leak below the dtype's eps survives: the timescale 1 / (1 − c̄) is computed from it.
    """

    carry: Tensor
    admit: Tensor
    gate: Tensor
    leak: Tensor


class Factor(NamedTuple):
    """One weight block's parameter VJP in factored form: Σ_b adjoint_bᵀ ⊗ inputs_b, or Σ_b adjoint_b for a bias.

    Blocks fed by the same pre-activation share one ``adjoint`` tensor (the same object), so a consumer may
    group them.
    """

    adjoint: Tensor  # (..., B, rows): the adjoint at the output of the block's product θ·u
    inputs: Tensor | None  # (..., B, cols): u, with the cache's leading dimensions; None for a bias

    def contract(self, batch_dims: int = 1) -> Tensor:
        """Σ_b adjoint_bᵀ ⊗ inputs_b (a bias: Σ_b adjoint_b), summed over the last ``batch_dims`` leading
        dimensions (2 sums a (T, B) cache over steps and sequences at once)."""
        adjoint, inputs = self.adjoint, self.inputs
        if batch_dims > 1:
            adjoint = adjoint.flatten(-1 - batch_dims, -2)
            inputs = None if inputs is None else inputs.flatten(-1 - batch_dims, -2)
        return adjoint.sum(-2) if inputs is None else outer_sum(adjoint, inputs)


class Cell(ABC):
    """One recurrent step with its cached gates and exact derivatives (see the module docstring)."""

    kind: ClassVar[str]
    gate_names: ClassVar[tuple[str, ...]] = ()  # the gates a what-if clamp may fix
    weights: Mapping[str, Tensor]  # blocks by canonical name (W_hz, b_in, …; a stack prefixes l0., l1.)
    input_size: int
    state_size: int
    output_size: int

    @property
    @abstractmethod
    def path_names(self) -> tuple[str, ...]:
        """Names of the terms returned by :meth:`jacobian_paths`, in a fixed order."""

    @abstractmethod
    def step(self, x: Tensor, state: Tensor, clamp: Clamp | None = None) -> tuple[Tensor, Any]:
        """x (..., I), state (..., S) ↦ (new state (..., S), cache); ``clamp`` fixes gates (module docstring)."""

    @abstractmethod
    def memory_gates(self, cache: Any) -> MemoryGates:
        """Carry, admit and gate per memory unit (see :class:`MemoryGates`)."""

    def state_labels(self) -> list[str]:
        """A short name for every entry of the state: h0, h1, … (an LSTM adds c0, c1, …)."""
        return [f"h{j}" for j in range(self.state_size)]

    def unit_labels(self) -> list[str]:
        """A short name for every memory unit of :meth:`memory_gates`: h0, h1, … (an LSTM's cells c0, c1, …)."""
        return [f"h{j}" for j in range(self.hidden_size)]  # type: ignore[attr-defined]

    @abstractmethod
    def jacobian_paths(self, cache: Any) -> dict[str, Tensor]:
        """Named terms (..., S, S) whose sum is ∂s'/∂s exactly; rows are output units."""

    @abstractmethod
    def input_jacobian(self, cache: Any) -> Tensor:
        """∂s'/∂x, shape (..., S, I)."""

    @abstractmethod
    def state_vjp(self, cache: Any, v: Tensor) -> Tensor:
        """v · ∂s'/∂s for v of shape (..., S), without forming the Jacobian."""

    @abstractmethod
    def input_vjp(self, cache: Any, v: Tensor) -> Tensor:
        """v · ∂s'/∂x for v of shape (..., S)."""

    @abstractmethod
    def param_factors(self, cache: Any, v: Tensor) -> dict[str, Factor]:
        """Every weight block's v · ∂⁺s'/∂θ in factored form (see :class:`Factor`)."""

    def param_vjp(self, cache: Any, v: Tensor) -> dict[str, Tensor]:
        """v · ∂⁺s'/∂θ for every weight block θ, summed over the batch dimension: Σ_b δ_bᵀ ⊗ u_b (bias: Σ_b δ_b)."""
        return {name: factor.contract() for name, factor in self.param_factors(cache, v).items()}

    def to(self: CellT, *args: Any, **kwargs: Any) -> CellT:
        """A copy with every weight converted by ``Tensor.to(*args, **kwargs)``."""
        converted = {name: w.to(*args, **kwargs) for name, w in self.weights.items()}
        return dataclasses.replace(self, weights=converted)  # type: ignore[type-var]

    def _adopt_gated_activations(self) -> None:
        """Resolve the ``gate`` and ``candidate`` activation names of a gated cell (GRU, LSTM) once."""
        gate = get_activation(self.gate, role="gate", allowed=GATE_ACTIVATIONS)  # type: ignore[attr-defined]
        candidate = get_activation(self.candidate, role="candidate", allowed=CANDIDATE_ACTIVATIONS)  # type: ignore[attr-defined]
        object.__setattr__(self, "_gate", gate)
        object.__setattr__(self, "_candidate", candidate)

    def _adopt_weights(
        self,
        required: Mapping[str, tuple[int, ...]],
        optional: Mapping[str, tuple[int, ...]],
        *,
        input_size: int,
        hidden_size: int,
        output_size: int,
        state_size: int,
    ) -> None:
        """Check the weights given to a cell's constructor and record its sizes."""
        object.__setattr__(self, "weights", check_weights(self.kind, self.weights, required, optional))
        object.__setattr__(self, "input_size", input_size)
        object.__setattr__(self, "hidden_size", hidden_size)
        object.__setattr__(self, "output_size", output_size)
        object.__setattr__(self, "state_size", state_size)

    def __repr__(self) -> str:
        settings = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.init and f.name != "weights"
        ]
        sizes = f"input_size={self.input_size}, state_size={self.state_size}"
        return f"{type(self).__name__}({', '.join([sizes, *settings])})"

    def jacobian(self, cache: Any) -> Tensor:
        """J = ∂s'/∂s, shape (..., S, S): the sum of :meth:`jacobian_paths`."""
        first, *others = self.jacobian_paths(cache).values()
        if not others:
            return first
        total = first + others[0]
        for term in others[1:]:
            total += term
        return total

    def output(self, state: Tensor) -> Tensor:
        """The part of the state the next layer (and the user) sees: its first ``output_size`` entries."""
        return state[..., : self.output_size]

    def output_vjp(self, v: Tensor) -> Tensor:
        """Adjoint on the output (..., output_size) ↦ adjoint on the state (..., S) (zeros elsewhere)."""
        pad = self.state_size - self.output_size
        return torch.nn.functional.pad(v, (0, pad)) if pad else v

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device


class Gate(NamedTuple):
    """A gate's value g, its complement 1 − g (formed from the pre-activation, without cancellation) and its slope."""

    value: Tensor
    complement: Tensor
    slope: Tensor


def gate_values(activation: Activation, name: str, a: Tensor, clamp: Clamp | None) -> Gate:
    """The gate ``name`` with pre-activation ``a``: g = σ(a), 1 − g = σ(−a) and σ'(a); where ``clamp[name]`` fixes it,
    the given constant c, 1 − c and slope 0 (a constant has no derivative)."""
    value, complement, slope = activation.gate(a)  # type: ignore[misc]  # every gate activation has one
    if not clamp or name not in clamp:
        return Gate(value, complement, slope)
    fixed, where = clamp[name]
    kept = torch.where(where, fixed, value)
    return Gate(kept, torch.where(where, 1 - fixed, complement), torch.where(where, 0.0, slope))


def check_no_clamp(kind: str, clamp: Clamp | None) -> None:
    """Refuse a clamp on a cell without gates."""
    if clamp:
        raise ValueError(f"{kind}: has no gates to clamp, got clamps for {sorted(clamp)}")


def outer_sum(adjoint: Tensor, inputs: Tensor) -> Tensor:
    """Σ_b adjoint[..., b, :]ᵀ ⊗ inputs[..., b, :]: the gradient of a weight matrix, shape (..., out, in).

    ``adjoint`` may have more leading dimensions than ``inputs``; they broadcast from the right.
    """
    return adjoint.mT @ inputs


def affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b, with b omitted when the layer has no bias."""
    return torch.nn.functional.linear(x, weight, bias)


def diag_times(scale: Tensor, matrix: Tensor) -> Tensor:
    """diag(scale) · matrix, batched: scale (..., R), matrix (R, C) or (..., R, C) ↦ (..., R, C)."""
    return scale.unsqueeze(-1) * matrix


# ---------------------------------------------------------------------------------------------------------------
# Caches: dataclasses (or tuples of them, for stacks) of tensors with free leading dimensions.


def map_cache(function: Callable[[Tensor], Tensor], cache: Any) -> Any:
    """Apply ``function`` to every tensor of a cache, keeping its structure (None fields stay None)."""
    if cache is None:
        return None
    if isinstance(cache, Tensor):
        return function(cache)
    if isinstance(cache, tuple):
        return tuple(map_cache(function, item) for item in cache)
    if dataclasses.is_dataclass(cache):
        return dataclasses.replace(
            cache, **{f.name: map_cache(function, getattr(cache, f.name)) for f in dataclasses.fields(cache)}
        )
    raise TypeError(f"a cache holds tensors, tuples or dataclasses; got {type(cache).__name__}")


def stack_caches(caches: list[Any]) -> Any:
    """Per-step caches, each with leading shape (B,), ↦ one cache with leading shape (T, B)."""
    first = caches[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.stack(caches)
    if isinstance(first, tuple):
        return tuple(stack_caches([c[i] for c in caches]) for i in range(len(first)))
    return dataclasses.replace(
        first, **{f.name: stack_caches([getattr(c, f.name) for c in caches]) for f in dataclasses.fields(first)}
    )


# ---------------------------------------------------------------------------------------------------------------
# Weight validation, shared by every cell's constructor.


def check_weights(
    kind: str,
    given: Mapping[str, Tensor],
    required: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]],
) -> dict[str, Tensor]:
    """Check names, shapes, dtype, device and finiteness of a cell's weight blocks; return them as a dict.

    ``required`` and ``optional`` map each block name to its expected shape; the optional blocks (the biases)
    come all together or not at all.
    """
    unknown = sorted(set(given) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"{kind}: unknown weight block(s) {unknown}; expected blocks {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
        )
    missing = sorted(set(required) - set(given))
    if missing:
        raise ValueError(f"{kind}: missing weight block(s) {missing}; given {sorted(given)}")
    given_optional = sorted(set(optional) & set(given))
    if given_optional and len(given_optional) != len(optional):
        raise ValueError(f"{kind}: give all of the biases {sorted(optional)} or none; given only {given_optional}")
    expected = {**required, **optional}
    weights: dict[str, Tensor] = {}
    for name, value in given.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{kind}: weight block {name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{kind}: weight block {name} must be floating point, got {value.dtype}")
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{kind}: weight block {name} has shape {tuple(value.shape)}, expected {expected[name]}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{kind}: weight block {name} contains NaN or Inf")
        weights[name] = value
    dtypes = {w.dtype for w in weights.values()}
    devices = {w.device for w in weights.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"{kind}: all weight blocks must share one dtype and device, got {dtypes} and {devices}")
    return weights


def sizing_block(kind: str, weights: Mapping[str, Tensor], name: str) -> tuple[int, int]:
    """The (rows, columns) of the 2-D block ``name`` that fixes a cell's sizes (checked before anything else)."""
    if name not in weights:
        raise ValueError(f"{kind}: the weights need {name} to fix the sizes; given {sorted(weights)}")
    block = weights[name]
    if not isinstance(block, Tensor) or block.dim() != 2:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"{kind}: weight block {name} must be a 2-D tensor (hidden, inputs), got {shape}")
    rows, columns = block.shape
    return rows, columns


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def uniform_weights(
    shapes: Mapping[str, tuple[int, ...]], hidden_size: int, seed: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """PyTorch's default initialisation: every block drawn from U(−1/√H, 1/√H), in the order of ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    bound = hidden_size**-0.5
    return {
        name: (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
        for name, shape in shapes.items()
    }
