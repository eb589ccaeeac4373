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
    state_jvp(cache, v)    (..., S)               ∂s'/∂s · v      (v (..., S), extra leading dims as for the VJP)
    input_jvp(cache, v)    (..., S)               ∂s'/∂x · v      (v (..., I))
    param_vjp(cache, v)    {block: (..., *shape)} v · ∂⁺s'/∂θ, summed over the batch dimension (the cache's last
                                                  leading dimension); s is held fixed (the immediate derivative)

Every weight block θ enters a step through one product θ·u (a bias through θ·1), so its parameter VJP factors:

    v · ∂⁺s'/∂θ = Σ_b δ_bᵀ ⊗ u_b        (a bias: Σ_b δ_b)

where δ (..., B, rows) is v's adjoint at the product's output and u (B, cols) its input. Cells implement
``param_factors(cache, v) → {block: Factor(δ, u)}``; ``param_vjp`` is built from it, and analyses that need one
contribution per adjoint chain (credit maps) contract the factors themselves, which is far cheaper than forming
every outer product.

The products with J are formed from the cell's structure, never from J itself, and so is a bound on its size:

    jacobian_norm_bounds(cache)       NormBounds (...)    L ≤ ‖∂s'/∂s‖_F ≤ U  (L = U: the norm itself, where cheap)
    input_jacobian_norm_bound(cache)  (...)               U ≥ ‖∂s'/∂x‖_F

The base class forms J for all four (so any new cell works at once); every built-in cell overrides them.

Two sums over many covectors at once serve the analyses that need one number per step and path or block:

    path_vjps(cache, v)              {path: (..., S)}         v · P_p for every path of jacobian_paths (sum: v · J)
    param_energies(cache, above)     {block: FactorEnergy}    Σ_j ‖δ_θ(w_j)‖² over the one-hots w_j = e_j on s' (and
                                                              the covectors ``above`` on the output), with u_θ
    input_energies(cache)            (..., I)                 Σ_j (∂s'_j/∂x_i)²: the one-hots pulled back to x
    covector_elements                int                      elements per step and sequence these form, at most

Again the base class forms the paths, the Jacobian and one adjoint per one-hot; the built-in cells use closed forms:
most adjoints are v ⊙ d for a gain d per unit, so their sum over the one-hots is Σ_i d_i², O(S) per step.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from gatelens.activations import CANDIDATE_ACTIVATIONS, GATE_ACTIVATIONS, Activation, get_activation

CellT = TypeVar("CellT", bound="Cell")
Clamp = Mapping[str, tuple[Tensor, Tensor]]  # gate name ↦ (value, where), both broadcastable to (B, units)
CLOSED_FORM_VECTORS = 32  # vectors of S per step and sequence that a built-in cell's sums form at most (in float32)
FORM_FROM = 16  # covectors per sequence from which a GRU forms its step's J (both ways cost alike there at H = 64-512)


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


class FactorEnergy(NamedTuple):
    """One weight block's parameter VJP summed in square over a family of covectors w_j on s':

        Σ_j ‖w_j · ∂⁺s'/∂θ‖_F² = adjoint · ‖inputs‖²     (a bias: adjoint),     adjoint = Σ_j ‖δ(w_j)‖²

    with δ(w_j) the :class:`Factor` adjoint of w_j. Blocks fed by the same pre-activation share one ``adjoint``.
    """

    adjoint: Tensor  # (..., B): Σ_j ‖δ(w_j)‖², summed in float64 (or wider)
    inputs: Tensor | None  # (..., B, cols): u, as in the block's Factor; None for a bias


class Covectors(NamedTuple):
    """Covectors w_1..w_J on a cell's output (the first O entries of its state; zero on the rest), as
    :meth:`Cell.param_energies` reads them: their column energies Σ_j w_j[i]², and their rows where the cell's sums
    need more than those (:attr:`Cell.energies_need_rows`)."""

    energies: Tensor  # (..., B, O): Σ_j w_j[i]², in float64 (or wider)
    rows: Tensor | None  # (..., B, J, O), or None


class NormBounds(NamedTuple):
    """lower ≤ ‖J‖_F ≤ upper per step and sequence (each with the cache's leading dimensions); equal where the cell
    computes the norm itself."""

    lower: Tensor
    upper: Tensor


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

    def product_vjp(self, cache: Any, rows: Tensor) -> Tensor:
        """P · J for the rows (S, ..., B, S) of a product P of the cell's Jacobians, in state order; a cell whose J has
        zero blocks that every such product shares skips their work (a stack: block lower-triangular). This default is
        :meth:`state_vjp`."""
        return self.state_vjp(cache, rows)

    def state_jvp(self, cache: Any, v: Tensor) -> Tensor:
        """J · v = ∂s'/∂s · v for v of shape (..., S), with extra leading dims as for :meth:`state_vjp`.

        This default forms J; the built-in cells form the product from their structure.
        """
        return (self.jacobian(cache) @ v.unsqueeze(-1)).squeeze(-1)

    def input_jvp(self, cache: Any, v: Tensor) -> Tensor:
        """∂s'/∂x · v for v of shape (..., I) ↦ (..., S). This default forms ∂s'/∂x; the built-in cells do not."""
        return (self.input_jacobian(cache) @ v.unsqueeze(-1)).squeeze(-1)

    def jacobian_norm_bounds(self, cache: Any) -> NormBounds:
        """L ≤ ‖∂s'/∂s‖_F ≤ U, shape (...,). This default forms J and returns its norm as both; the built-in cells
        bound it from their structure without forming J."""
        norm = torch.linalg.matrix_norm(self.jacobian(cache))
        return NormBounds(norm, norm)

    def input_jacobian_norm_bound(self, cache: Any) -> Tensor:
        """U ≥ ‖∂s'/∂x‖_F, shape (...,). This default forms ∂s'/∂x and returns its norm."""
        return torch.linalg.matrix_norm(self.input_jacobian(cache))

    def jacobian_row_bounds(self, cache: Any) -> NormBounds:
        """lower_i ≤ ‖J[i, :]‖₂ ≤ upper_i for every row i of J = ∂s'/∂s, shape (..., S). This default forms J (exact
        rows as both bounds); the built-in cells bound the rows from their structure, O(S) per step, rounding
        included (:func:`row_norm_bounds`)."""
        rows = exact_row_norms(self.jacobian(cache))
        return NormBounds(rows, rows)

    def input_jacobian_row_bounds(self, cache: Any) -> Tensor:
        """upper_i ≥ ‖∂s'/∂x[i, :]‖₂ for every row i, shape (..., S). This default forms ∂s'/∂x."""
        return exact_row_norms(self.input_jacobian(cache))

    @abstractmethod
    def param_factors(self, cache: Any, v: Tensor) -> dict[str, Factor]:
        """Every weight block's v · ∂⁺s'/∂θ in factored form (see :class:`Factor`)."""

    def backward(self, cache: Any, v: Tensor) -> tuple[dict[str, Factor], Tensor]:
        """(:meth:`param_factors`, :meth:`state_vjp`) of v together: one step of backpropagation. A stack shares the
        adjoints its layers pass down between the two."""
        return self.param_factors(cache, v), self.state_vjp(cache, v)

    def param_vjp(self, cache: Any, v: Tensor) -> dict[str, Tensor]:
        """v · ∂⁺s'/∂θ for every weight block θ, summed over the batch dimension: Σ_b δ_bᵀ ⊗ u_b (bias: Σ_b δ_b)."""
        return {name: factor.contract() for name, factor in self.param_factors(cache, v).items()}

    def path_vjps(self, cache: Any, v: Tensor) -> dict[str, Tensor]:
        """v · P_p (..., S) for every path P_p of :meth:`jacobian_paths`; they sum to :meth:`state_vjp`.

        This default forms the paths, O(S²) per step; the built-in cells never do.
        """
        row = v.unsqueeze(-2)
        return {name: (row @ path).squeeze(-2) for name, path in self.jacobian_paths(cache).items()}

    @property
    def covector_elements(self) -> int:
        """Elements per step and sequence, at most, that :meth:`path_vjps`, :meth:`param_energies` (over the one-hots)
        and :meth:`input_energies` form: analyses size their chunks of steps by it. These defaults form every path
        (S × S each), one adjoint per one-hot (S × the widest block's output) and ∂s'/∂x (S × I)."""
        blocks = max(w.shape[0] for w in self.weights.values())
        return self.state_size * max(blocks, self.input_size, self.state_size * len(self.path_names))

    @property
    def energies_need_rows(self) -> bool:
        """Whether :meth:`param_energies` reads the rows of the covectors ``above``, not only their column energies."""
        return True

    def param_energies(self, cache: Any, above: Covectors | None = None) -> dict[str, FactorEnergy]:
        """Every weight block's Σ_j ‖δ(w_j)‖² and input u (:class:`FactorEnergy`) over the covectors w_j on s': the S
        one-hots e_j, and the rows of ``above`` on the output.

        Over the one-hots alone, adjoint · ‖inputs‖² = ‖∂⁺s'/∂θ‖_F², the local gradient squared. This default sends
        every covector through :meth:`param_factors`, S + J adjoints per step; the built-in cells use closed forms.
        """
        lead, size = leading_shape(cache), self.state_size
        one_hots = torch.eye(size, dtype=self.dtype, device=self.device)
        covectors = one_hots.reshape(size, *(1,) * len(lead), size).expand(size, *lead, size)
        if above is not None:
            covectors = torch.cat([covectors, self.output_vjp(covector_rows(above, self.kind)).movedim(-2, 0)])
        energies: dict[int, Tensor] = {}  # blocks fed by one pre-activation share their adjoint
        result = {}
        for name, (adjoint, inputs) in self.param_factors(cache, covectors).items():
            if id(adjoint) not in energies:
                energies[id(adjoint)] = square_sum(adjoint, dims=(0, -1))
            result[name] = FactorEnergy(energies[id(adjoint)], inputs)
        return result

    def input_energies(self, cache: Any) -> Tensor:
        """Σ_j (∂s'_j/∂x_i)², the squared column norms of :meth:`input_jacobian`, (..., I) in float64 (or wider): the
        one-hots on s' pulled back to the input, as a :class:`Stack` hands them to the layer below. This default forms
        ∂s'/∂x."""
        return square_sum(self.input_jacobian(cache), dims=(-2,))

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


def forms_for(cache: Any, v: Tensor, at_least: int = FORM_FROM) -> bool:
    """Whether covectors v (C, ..., B, S) number ``at_least`` per sequence of the step(s) of ``cache``: then a matrix
    formed once per sequence (S × O) and applied by :func:`covector_product` costs S · O per covector, less than a
    matrix-free VJP that multiplies every covector by several weight matrices, and the many covectors repay the
    forming (elementwise, O(S · O) per sequence)."""
    return v.dim() == len(leading_shape(cache)) + 2 and v.shape[0] >= at_least


def covector_product(v: Tensor, matrix: Tensor) -> Tensor:
    """v · M for covectors v (C, ..., B, S) and one matrix M (..., B, S, O) per sequence: one batched product."""
    return (v.movedim(0, -2) @ matrix).movedim(-2, 0)


def affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b, with b omitted when the layer has no bias."""
    return torch.nn.functional.linear(x, weight, bias)


def diag_times(scale: Tensor, matrix: Tensor) -> Tensor:
    """diag(scale) · matrix, batched: scale (..., R), matrix (R, C) or (..., R, C) ↦ (..., R, C)."""
    return scale.unsqueeze(-1) * matrix


def scaled_sum(scales: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """Σ_p diag(s_p) W_p in one contraction: scales s_p (..., R), weights W_p (R, C) ↦ (..., R, C)."""
    stacked = torch.stack(list(scales), dim=-1)  # (..., R, P)
    lead = stacked.shape[:-2]
    rows, columns = weights[0].shape
    matrices = torch.stack(list(weights), dim=1)  # (R, P, C)
    flat = stacked.reshape(-1, rows, len(weights)).transpose(0, 1)  # (R, N, P)
    return torch.bmm(flat, matrices).transpose(0, 1).reshape(*lead, rows, columns)


def row_norms(scales: Sequence[Tensor], weights: Sequence[Tensor], diagonal: Tensor | None = None) -> Tensor:
    """The norm of every row i of diag(d) + Σ_p diag(s_p) W_p, without forming the matrix:

        ‖d_i e_i + Σ_p s_{p,i} W_p[i, :]‖² = Σ_{p,q} s_{p,i} s_{q,i} ⟨W_p[i, :], W_q[i, :]⟩
                                              + d_i (d_i + 2 Σ_p s_{p,i} W_p[i, i])

    scales: P tensors s_p (..., R); weights: P matrices W_p (R, C); diagonal d (..., R) or None (needs R = C) ↦
    (..., R). The inner products of each row's weight rows are formed once per call (P² · R · C), so a row then
    costs P², not C.
    """
    squares = torch.zeros_like(scales[0]) if diagonal is None else diagonal.square()
    for p, (scale, weight) in enumerate(zip(scales, weights)):
        inner = (weight * weight).sum(-1) * scale  # Σ_q s_q ⟨W_p[i, :], W_q[i, :]⟩, the terms q ≥ p doubled
        for other_scale, other in zip(scales[p + 1 :], weights[p + 1 :]):
            inner = inner + 2 * (weight * other).sum(-1) * other_scale
        if diagonal is not None:
            inner = inner + 2 * weight.diagonal() * diagonal
        squares = squares + inner * scale
    return squares.clamp_min(0).sqrt()  # rounding can take a row of norm ≈ 0 a little below 0


ROUNDING_TERMS = 8  # the rounding of a row norm from its closed form is bounded by this many ulps per summed term


def row_norm_bounds(
    scales: Sequence[Tensor], weights: Sequence[Tensor], diagonal: Tensor | None = None, spread: Tensor | None = None
) -> NormBounds:
    """Bounds on the norm of every row i of diag(d) + Σ_p diag(s_p) W_p + E (E unknown but ‖E[i, :]‖ ≤ b_i, the
    ``spread``), rounding included: :func:`row_norms` forms ‖row‖² as a sum of terms of total size at most
    A_i² = (|d_i| + Σ_p |s_{p,i}| ‖W_p[i, :]‖)², each rounded, so its error is within (ROUNDING_TERMS · (C + P + 1))
    ulps of A_i² (C columns, P paths); the spread then widens the bounds by the triangle inequality."""
    rows = row_norms(scales, weights, diagonal)
    size = torch.zeros_like(rows) if diagonal is None else diagonal.abs()
    for scale, weight in zip(scales, weights):
        size = size + scale.abs() * torch.linalg.vector_norm(weight, dim=-1)
    ulps = ROUNDING_TERMS * (weights[0].shape[-1] + len(weights) + 1) * torch.finfo(rows.dtype).eps
    error = ulps * size.square()
    lower = (rows.square() - error).clamp_min(0).sqrt()
    upper = (rows.square() + error).sqrt()
    if spread is not None:
        lower, upper = (lower - spread).clamp_min(0), upper + spread
    return NormBounds(lower, upper)


def exact_row_norms(matrix: Tensor) -> Tensor:
    """‖M[i, :]‖₂ for every row of the (..., R, C) matrices M, summed in :func:`wide_dtype`: (..., R)."""
    return torch.linalg.vector_norm(matrix, dim=-1, dtype=wide_dtype(matrix.dtype)).to(matrix.dtype)


def perturbed_norm_bounds(rows: Tensor, spread: Tensor) -> NormBounds:
    """Bounds on ‖M + E‖_F from the row norms a_i = ‖M[i, :]‖ (..., R) and bounds b_i ≥ ‖E[i, :]‖ (..., R), by the
    triangle inequality per row: L² = Σ_i max(a_i − b_i, 0)², U² = Σ_i (a_i + b_i)²."""
    lower = torch.linalg.vector_norm((rows - spread).clamp_min(0), dim=-1)
    return NormBounds(lower, torch.linalg.vector_norm(rows + spread, dim=-1))


def spectral_norm(matrix: Tensor) -> Tensor:
    """‖W‖₂, the largest singular value: ‖u W‖ ≤ ‖u‖ ‖W‖₂ for every row vector u."""
    return torch.linalg.matrix_norm(matrix, ord=2)


def closed_form_elements(cell: Cell) -> int:
    """:attr:`Cell.covector_elements` of a cell whose sums are closed forms: CLOSED_FORM_VECTORS vectors of S and of
    I (the largest are the pair products of :func:`scaled_sum_energies`, up to 16 pairs of H in float64)."""
    return CLOSED_FORM_VECTORS * (cell.state_size + cell.input_size)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that sums of squares are formed in: float64 for float16/bfloat16/float32/float64 (no square of a
    float32 under- or overflows in it), the dtype itself if wider."""
    return torch.promote_types(dtype, torch.float64)


def square_sum(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Σ values² over ``dims``, in :func:`wide_dtype`."""
    return torch.linalg.vector_norm(values, dim=dims, dtype=wide_dtype(values.dtype)).square()


def unit_energy(gain: Tensor, weights: Tensor | float) -> Tensor:
    """Σ_i d_i² ω_i over the last dimension, in :func:`wide_dtype`: Σ_j ‖w_j ⊙ d‖² for an adjoint w ⊙ d that acts on
    each unit alone, over covectors w_j whose column energies Σ_j w_j[i]² are ω (:func:`covector_weights`)."""
    return (gain.to(wide_dtype(gain.dtype)).square() * weights).sum(-1)


def covector_weights(above: Covectors | None) -> Tensor | float:
    """ω_i = Σ_j w_j[i]² over the one-hots on a state that is all output (1 each) and the covectors ``above``."""
    return 1.0 if above is None else 1 + above.energies


def covector_rows(above: Covectors, kind: str) -> Tensor:
    """The rows of ``above`` (..., B, J, O), which a cell's sums need unless it says otherwise."""
    if above.rows is None:
        raise ValueError(f"{kind}: param_energies needs the rows of the covectors above, not only their column sums")
    return above.rows


def scaled_sum_energies(terms: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The squared column norms Σ_j M[j, i]² of M = Σ_g diag(s_g) W_g, without forming M:

        Σ_g s_g² (W_g ∘ W_g) + 2 Σ_{g<g'} (s_g ⊙ s_g') (W_g ∘ W_g')

    terms (s_g (..., R), W_g (R, C)) ↦ (..., C) in :func:`wide_dtype`, one matrix product over every pair of terms.
    """
    wide = wide_dtype(terms[0][0].dtype)
    scales = [scale.to(wide) for scale, _ in terms]
    weights = [weight.to(wide) for _, weight in terms]
    pairs = [(a, b) for a in range(len(terms)) for b in range(a, len(terms))]
    left = torch.cat([scales[a] * scales[b] for a, b in pairs], dim=-1)
    right = torch.cat([weights[a] * weights[b] * (1 if a == b else 2) for a, b in pairs], dim=-2)
    return left @ right


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


def leading_shape(cache: Any) -> torch.Size:
    """The leading dimensions (..., B) that every tensor of a cache shares: those of its first tensor, less the last."""
    if isinstance(cache, Tensor):
        return cache.shape[:-1]
    parts = cache if isinstance(cache, tuple) else [getattr(cache, f.name) for f in dataclasses.fields(cache)]
    return next(leading_shape(part) for part in parts if part is not None)


def cache_tensors(cache: Any) -> list[Tensor]:
    """Every tensor of a cache, in a fixed order (the order :func:`map_cache` visits them)."""
    found: list[Tensor] = []

    def collect(tensor: Tensor) -> Tensor:
        found.append(tensor)
        return tensor

    map_cache(collect, cache)
    return found


def preallocated_cache(first: Any, steps: int) -> Any:
    """A cache of ``steps`` steps shaped like the one-step cache ``first``, leading shape (T, B), left empty: the
    trace writes each step into it (:func:`cache_tensors` of its step ``i``), so no per-step list is stacked and
    the peak memory is one copy."""
    return map_cache(lambda tensor: tensor.new_empty((steps, *tensor.shape)), first)


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
