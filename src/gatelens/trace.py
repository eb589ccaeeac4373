"""A Trace is the recorded forward pass of a model on one batch; a Recurrence is one of its recurrences.

Time indexing (docs/notation.md): ``states[i]`` is h_i, with h_0 the initial state, and per-step arrays are
0-based, so ``jacobians()[i] = ∂h_{i+1}/∂h_i``. A reverse direction is indexed in its own processing order:
its step i+1 reads the input at 0-based time ``input_index[i, b] = L_b − 1 − i`` (L_b the length of sequence b).

Padding: where ``mask[i, b]`` is False (step i+1 lies past the end of sequence b), the step is the identity:
the state is carried unchanged, its Jacobian is I (all of it on the ``"padding"`` path) and it contributes
nothing to any parameter gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gatelens._validation import as_index
from gatelens.cells.base import Cell, Clamp, Factor, FactorEnergy, NormBounds, map_cache
from gatelens.cells.stack import Stack

if TYPE_CHECKING:
    from gatelens.model import Model

Steps = int | slice | Sequence[int] | Tensor | None
DIRECTIONS = ("forward", "reverse")


def gather_time(values: Tensor, order: Tensor) -> Tensor:
    """values (T, B, F) read along time in ``order`` (T, B): row i of sequence b is ``values[order[i, b], b]``."""
    order = order.to(values.device)
    return values.gather(0, order[..., None].expand(-1, -1, values.shape[-1]))


@dataclass(frozen=True, eq=False)
class Recurrence:
    """One recurrence: a cell, its states (T+1, B, S), its cached gates (leading dims (T, B)) and padding mask.

    ``name`` prefixes parameter names: ``"l0"``, ``"l1_reverse"``, or ``"stack"`` for a stack of layers whose
    cell already names its blocks ``l0.W_hz``, ``l1.W_hz``, ….
    """

    name: str
    cell: Cell
    states: Tensor
    cache: Any
    mask: Tensor | None
    input_index: Tensor

    @property
    def steps(self) -> int:
        """T, the number of steps."""
        return self.states.shape[0] - 1

    def step_index(self, steps: Steps) -> int | slice | Tensor:
        """``steps`` (an int, a slice or a list of 0-based step indices in −T..T−1) checked, as an int, a slice or
        a 1-D long tensor."""
        if isinstance(steps, slice):
            return steps
        if isinstance(steps, (bool, np.bool_)):
            raise TypeError(f"steps must be an int, a slice or a list of ints, got {steps!r}")
        if isinstance(steps, (int, np.integer)):
            if not -self.steps <= steps < self.steps:
                raise ValueError(f"step index {steps} is out of range for a trace of {self.steps} steps")
            return int(steps)
        try:
            index = torch.as_tensor(steps)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"steps must be an int, a slice or a list of ints, got {steps!r}") from None
        if index.numel() == 0:
            index = index.long()
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex() or index.dim() != 1:
            raise TypeError(f"steps must be an int, a slice or a 1-D list of ints, got {steps!r}")
        if index.numel() and (int(index.min()) < -self.steps or int(index.max()) >= self.steps):
            raise ValueError(f"step indices must lie in {-self.steps}..{self.steps - 1}, got {index.tolist()}")
        return index.to(self.states.device)

    def _select(self, steps: Steps) -> tuple[Any, Tensor | None, tuple[int, ...]]:
        """The cache, mask and leading shape ((T, B), or (B,) for one step) of the chosen steps."""
        if steps is None:
            return self.cache, self.mask, tuple(self.input_index.shape)
        index = self.step_index(steps)
        mask = None if self.mask is None else self.mask[index]
        return map_cache(lambda tensor: tensor[index], self.cache), mask, tuple(self.input_index[index].shape)

    def _check_adjoint(self, v: Tensor, lead: tuple[int, ...]) -> None:
        """v must be a tensor of the trace's dtype whose shape ends with the selected (…, B, S)."""
        if not isinstance(v, Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype != self.states.dtype:
            raise TypeError(f"v has dtype {v.dtype}, expected the trace's {self.states.dtype}")
        tail = (*lead, self.cell.state_size)
        if v.dim() < len(tail) or tuple(v.shape[v.dim() - len(tail) :]) != tail:
            raise ValueError(
                f"v must have shape (..., {', '.join(map(str, tail))}) — any leading dims, then the selected "
                f"steps, batch and state — got {tuple(v.shape)}"
            )

    def _identity(self, like: Tensor) -> Tensor:
        return torch.eye(self.cell.state_size, dtype=like.dtype, device=like.device)

    def jacobians(self, steps: Steps = None) -> Tensor:
        """J[i] = ∂h_{i+1}/∂h_i for the chosen steps, shape (T, B, S, S); rows are output units."""
        cache, mask, _ = self._select(steps)
        jacobian = self.cell.jacobian(cache)
        if mask is None:
            return jacobian
        return torch.where(mask[..., None, None], jacobian, self._identity(jacobian))

    def input_jacobians(self, steps: Steps = None) -> Tensor:
        """∂h_{i+1}/∂x_{i+1} for the chosen steps, shape (T, B, S, I); zero on padded steps."""
        cache, mask, _ = self._select(steps)
        jacobian = self.cell.input_jacobian(cache)
        return jacobian if mask is None else torch.where(mask[..., None, None], jacobian, 0.0)

    def jacobian_paths(self, steps: Steps = None) -> dict[str, Tensor]:
        """The named paths of J for the chosen steps; they sum to :meth:`jacobians` exactly.

        With padding, a ``"padding"`` path holds the identity of the masked steps (and zero elsewhere).
        """
        cache, mask, _ = self._select(steps)
        paths = self.cell.jacobian_paths(cache)
        if mask is None:
            return paths
        keep = mask[..., None, None]
        paths = {name: torch.where(keep, term, 0.0) for name, term in paths.items()}
        paths["padding"] = torch.where(keep, 0.0, self._identity(next(iter(paths.values()))))
        return paths

    def path_vjps(self, v: Tensor, steps: Steps = None) -> dict[str, Tensor]:
        """v · P_p for every path of :meth:`jacobian_paths`, without forming them (:meth:`Cell.path_vjps`); v has shape
        (..., [T,] B, S). With padding, the ``"padding"`` path carries v · I = v on the masked steps, where every other
        path is zero."""
        cache, mask, lead = self._select(steps)
        self._check_adjoint(v, lead)
        vjps = self.cell.path_vjps(cache, v)
        if mask is None:
            return vjps
        keep = mask[..., None]
        vjps = {name: torch.where(keep, vjp, 0.0) for name, vjp in vjps.items()}
        vjps["padding"] = torch.where(keep, 0.0, v)
        return vjps

    def state_vjp(self, v: Tensor, steps: Steps = None) -> Tensor:
        """v · J for the chosen steps; v has shape (..., [T,] B, S) with any extra leading dimensions."""
        return self._state_product(self.cell.state_vjp, v, steps)

    def product_vjp(self, rows: Tensor, steps: Steps = None) -> Tensor:
        """P · J for the rows (S, [T,] B, S) of a product P of the recurrence's Jacobians (:meth:`Cell.product_vjp`)."""
        return self._state_product(self.cell.product_vjp, rows, steps)

    def state_jvp(self, v: Tensor, steps: Steps = None) -> Tensor:
        """J · v for the chosen steps, without forming J; v has shape (..., [T,] B, S) with any extra leading
        dimensions."""
        return self._state_product(self.cell.state_jvp, v, steps)

    def _state_product(self, product: Callable[[Any, Tensor], Tensor], v: Tensor, steps: Steps) -> Tensor:
        """product(cache, v) for the chosen steps, and v itself on padded steps (their Jacobian is I)."""
        cache, mask, lead = self._select(steps)
        self._check_adjoint(v, lead)
        result = product(cache, v)
        return result if mask is None else torch.where(mask[..., None], result, v)

    def jacobian_norm_bounds(self, steps: Steps = None) -> NormBounds:
        """L ≤ ‖J[i]‖_F ≤ U for the chosen steps, shape (T, B) each, from the cell's structure without forming J
        (:meth:`Cell.jacobian_norm_bounds`); √S, exactly, on padded steps (J = I)."""
        cache, mask, _ = self._select(steps)
        bounds = self.cell.jacobian_norm_bounds(cache)
        if mask is None:
            return bounds
        identity = self.cell.state_size**0.5
        return NormBounds(*(torch.where(mask, bound, identity) for bound in bounds))

    def jacobian_row_bounds(self, steps: Steps = None) -> NormBounds:
        """lower ≤ ‖J[i][j, :]‖₂ ≤ upper for every row j of the chosen steps, shape (T, B, S) each, without forming J
        (:meth:`Cell.jacobian_row_bounds`); 1, exactly, on padded steps (J = I)."""
        cache, mask, _ = self._select(steps)
        bounds = self.cell.jacobian_row_bounds(cache)
        if mask is None:
            return bounds
        return NormBounds(*(torch.where(mask[..., None], bound, 1.0) for bound in bounds))

    def input_vjp(self, v: Tensor, steps: Steps = None) -> Tensor:
        """v · ∂h_{i+1}/∂x_{i+1} for the chosen steps (zero on padded steps)."""
        cache, mask, lead = self._select(steps)
        self._check_adjoint(v, lead)
        result = self.cell.input_vjp(cache, v)
        return result if mask is None else torch.where(mask[..., None], result, 0.0)

    def param_vjp(self, v: Tensor, steps: Steps = None) -> dict[str, Tensor]:
        """v · ∂⁺h_{i+1}/∂θ for every weight block, summed over the batch, keyed by the model's block names."""
        cache, v = self._parameter_adjoint(v, steps)
        return self.qualify(self.cell.param_vjp(cache, v))

    def param_factors(self, v: Tensor, steps: Steps = None) -> dict[str, Factor]:
        """:meth:`param_vjp` in factored form (see :class:`~gatelens.cells.Factor`), zero on padded steps."""
        cache, v = self._parameter_adjoint(v, steps)
        return self.qualify(self.cell.param_factors(cache, v))

    def backward(self, v: Tensor, steps: Steps = None) -> tuple[dict[str, Factor], Tensor]:
        """(:meth:`param_factors`, :meth:`state_vjp`) of v for the chosen steps at once (:meth:`Cell.backward`)."""
        cache, mask, lead = self._select(steps)
        self._check_adjoint(v, lead)
        if mask is None:
            factors, vjp = self.cell.backward(cache, v)
            return self.qualify(factors), vjp
        keep = mask[..., None]
        factors, vjp = self.cell.backward(cache, torch.where(keep, v, 0.0))  # no parameter sees a padded step
        return self.qualify(factors), torch.where(keep, vjp, v)  # and its J is I

    def param_energies(self, steps: Steps = None) -> dict[str, FactorEnergy]:
        """Every weight block's Σ_j ‖δ(e_j)‖² over the one-hots e_j on h_{i+1} and its input u, for the chosen steps
        (:meth:`Cell.param_energies`), keyed by the model's block names: ‖∂⁺h_{i+1}/∂θ‖_F² = adjoint · ‖u‖² (a bias:
        adjoint). Zero on padded steps."""
        cache, mask, _ = self._select(steps)
        energies = self.qualify(self.cell.param_energies(cache))
        if mask is None:
            return energies
        return {name: FactorEnergy(torch.where(mask, e.adjoint, 0.0), e.inputs) for name, e in energies.items()}

    def _parameter_adjoint(self, v: Tensor, steps: Steps) -> tuple[Any, Tensor]:
        """The chosen steps' cache and v, zeroed on padded steps (they contribute to no parameter)."""
        cache, mask, lead = self._select(steps)
        self._check_adjoint(v, lead)
        return cache, v if mask is None else torch.where(mask[..., None], v, 0.0)

    def qualify(self, blocks: dict[str, Any]) -> dict[str, Any]:
        """Key by the model's block names (``l0.W_hz``); a stack's cell already qualifies them."""
        if isinstance(self.cell, Stack):
            return blocks
        return {f"{self.name}.{block}": value for block, value in blocks.items()}

    def to_processing_order(self, values: Tensor) -> Tensor:
        """Per-time values (T, B, F) in the inputs' time order ↦ this recurrence's step order, and back.

        Row i of the result is ``values[input_index[i, b], b]``; the reordering is its own inverse.
        """
        return gather_time(values, self.input_index)


@dataclass(frozen=True, eq=False)
class Trace:
    """The recorded forward pass of a :class:`~gatelens.Model` on one batch.

    ``output`` and ``final_state`` are exactly what the PyTorch module returns (``output`` batch-first if the
    model is; ``final_state`` is h_n, or (h_n, c_n) for an LSTM, and a dict of final states by recurrence name
    for a stack whose layers differ in size); everything else is time-major.
    """

    model: Model
    inputs: Tensor  # x as traced, in the model's layout: (T, B, I), (B, T, I) if batch-first, or (T, I)
    output: Tensor
    final_state: Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]
    recurrences: dict[str, Recurrence]
    lengths: Tensor | None
    clamps: dict[str, Clamp]  # gates fixed by what-if: recurrence name ↦ gate ↦ (values, where), (T, B, U) each

    @property
    def states(self) -> dict[str, Tensor]:
        """Per layer and direction (``"l0"``, ``"l0_reverse"``, …): h_0..h_T, shape (T+1, B, S)."""
        return {name: rec.states for name, rec in self.recurrences.items()}

    def recurrence(self, layer: int | None = None, direction: str | None = None) -> Recurrence:
        """One layer and direction; ``layer=None`` gives the whole stack of a unidirectional model.

        ``direction=None`` is the model's own direction ("forward", or "reverse" for a ``reverse=True`` model;
        "forward" for a bidirectional one).
        """
        own = "reverse" if self.model.reverse else "forward"
        direction = own if direction is None else direction
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected 'forward' or 'reverse'")
        if not self.model.bidirectional and direction != own:
            raise ValueError(f"direction={direction!r}: this unidirectional model reads sequences {own} only")
        if layer is None:
            if self.model.bidirectional:
                raise ValueError(
                    "a bidirectional model is not one recurrence: each direction of each layer is its own; "
                    "pass layer= (0.."
                    f"{self.model.num_layers - 1}) and direction='forward' or 'reverse'"
                )
            if self.model.num_layers == 1:
                return next(iter(self.recurrences.values()))
            return self._stack()
        index = as_index(layer, "layer", self.model.num_layers)
        return self.recurrences[f"l{index}" + ("_reverse" if direction == "reverse" else "")]

    def _stack(self) -> Recurrence:
        """The layers of a unidirectional model composed into one recurrence (a :class:`Stack`)."""
        layers = list(self.recurrences.values())  # a unidirectional model: one recurrence per layer, in order
        return Recurrence(
            name="stack",
            cell=Stack([rec.cell for rec in layers], [rec.name for rec in layers]),
            states=torch.cat([rec.states for rec in layers], dim=-1),
            cache=tuple(rec.cache for rec in layers),
            mask=layers[0].mask,
            input_index=layers[0].input_index,
        )

    def jacobians(self, layer: int | None = None, direction: str | None = None, steps: Steps = None) -> Tensor:
        """J[i] = ∂h_{i+1}/∂h_i, shape (T, B, S, S); ``layer=None`` gives the stack's Jacobian."""
        return self.recurrence(layer, direction).jacobians(steps)

    def jacobian_paths(
        self, layer: int | None = None, direction: str | None = None, steps: Steps = None
    ) -> dict[str, Tensor]:
        """The named paths of :meth:`jacobians`, which they sum to exactly."""
        return self.recurrence(layer, direction).jacobian_paths(steps)
