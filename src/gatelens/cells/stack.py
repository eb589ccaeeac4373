"""A stack of unidirectional layers, itself a cell.

Layer l reads the output of layer l − 1 at the same step (layer 0 reads x), so with s = [s⁰, s¹, …, s^{L−1}]
the stack is one recurrence. Write J^m = ∂s^m_t/∂s^m_{t−1} for layer m's own Jacobian and
K^l = ∂s^l_t/∂s^{l−1}_t for the feed from the layer below at the same step. The stack's Jacobian is block
lower-triangular:

    ∂s^l_t/∂s^m_{t−1} = K^l K^{l−1} ⋯ K^{m+1} J^m      for l ≥ m,   0 for l < m.

Every route from s_{t−1} to s_t crosses exactly one recurrent connection, in one layer m, along one of that
layer's paths p; so the stack's paths are named ``l{m}.{p}`` and are the column block m of the formula above with
J^m replaced by its path p. They sum to the stack's Jacobian exactly.

Forward products go up the stack without forming a block: ds^l = J^l v^l + K^l out(ds^{l−1}) for J · v (layer 0 has
no feed), and ds^0 = K^0 v, ds^l = K^l out(ds^{l−1}) for ∂s'/∂x · v, where out(·) is a layer's output part and
K^0 = ∂s^0_t/∂x_t. ‖J‖_F is bounded from the layers' own bounds (see :meth:`Stack.jacobian_norm_bounds`).

Sums over covectors (``param_energies``): layer m's blocks are reached from its own one-hots and, through the feeds,
from every one-hot of the layers above: e_j on s^l arrives at layer m's output as row j of K^l K^{l−1} ⋯ K^{m+1}.
A layer reads such covectors by their column energies alone where its sums need no more (every built-in layer but a
GRU with reset "before" and an LSTM with a projection); with two layers they come from the upper layer's
``input_energies`` without forming K, O(S_1·O_0) per step and sequence. The rows themselves, and so the products
K^l ⋯ K^{m+1}, are formed for three layers or more and for a lower layer that needs them: O(S_l·O_{l−1}·O_m) per step
and sequence for each product.

Layer m's blocks, paths and state entries are prefixed by its name: ``l{m}`` by default, or the names the model gives
its recurrences (``l0_reverse``, ``l1_reverse``, … for a model that reads sequences backwards), so the stack's block
names are the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gatelens.cells.base import (
    Cell,
    Clamp,
    Covectors,
    Factor,
    FactorEnergy,
    MemoryGates,
    NormBounds,
    check_no_clamp,
    covector_rows,
    square_sum,
)


@dataclass(frozen=True, eq=False, init=False, repr=False)
class Stack(Cell):
    """Unidirectional layers run as one cell; its state is the concatenation of the layers' states."""

    cells: tuple[Cell, ...]
    names: tuple[str, ...]  # each layer's prefix: l0, l1, … (or the model's recurrence names)
    kind = "Stack"

    def __init__(self, cells: Sequence[Cell], names: Sequence[str] | None = None) -> None:
        cells = tuple(cells)
        if not cells:
            raise ValueError("Stack: needs at least one layer, got none")
        names = tuple(f"l{index}" for index in range(len(cells))) if names is None else tuple(names)
        if len(names) != len(cells) or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"Stack: needs one distinct name per layer ({len(cells)}), got {names!r}")
        for index, cell in enumerate(cells):
            if not isinstance(cell, Cell) or isinstance(cell, Stack):
                raise TypeError(f"Stack: layer {index} must be a GRU, Elman or LSTM cell, got {type(cell).__name__}")
        for index in range(1, len(cells)):
            if cells[index].input_size != cells[index - 1].output_size:
                raise ValueError(
                    f"Stack: layer {index} expects {cells[index].input_size} input features, but layer "
                    f"{index - 1} outputs {cells[index - 1].output_size}"
                )
        if len({(c.dtype, c.device) for c in cells}) > 1:
            raise ValueError("Stack: all layers must share one dtype and device")
        object.__setattr__(self, "cells", cells)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "input_size", cells[0].input_size)
        object.__setattr__(self, "state_size", sum(c.state_size for c in cells))
        object.__setattr__(self, "output_size", cells[-1].output_size)

    @property
    def weights(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {f"{layer}.{name}": w for layer, cell in zip(self.names, self.cells) for name, w in cell.weights.items()}

    @property
    def path_names(self) -> tuple[str, ...]:
        return tuple(f"{layer}.{p}" for layer, cell in zip(self.names, self.cells) for p in cell.path_names)

    def to(self, *args: Any, **kwargs: Any) -> Stack:
        return Stack([cell.to(*args, **kwargs) for cell in self.cells], self.names)

    def output(self, state: Tensor) -> Tensor:
        return self.cells[-1].output(state[..., self.state_size - self.cells[-1].state_size :])

    def output_vjp(self, v: Tensor) -> Tensor:
        return torch.nn.functional.pad(self.cells[-1].output_vjp(v), (self.state_size - self.cells[-1].state_size, 0))

    def _slices(self) -> list[slice]:
        """Where each layer's state sits inside the stack's state."""
        bounds = [0]
        for cell in self.cells:
            bounds.append(bounds[-1] + cell.state_size)
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def step(self, x: Tensor, state: Tensor, clamp: Clamp | None = None) -> tuple[Tensor, tuple[Any, ...]]:
        check_no_clamp("a Stack (clamp each layer's gates instead)", clamp)
        new_states, caches = [], []
        layer_input = x
        for cell, part in zip(self.cells, self._slices()):
            new_state, cache = cell.step(layer_input, state[..., part])
            new_states.append(new_state)
            caches.append(cache)
            layer_input = cell.output(new_state)
        return torch.cat(new_states, dim=-1), tuple(caches)

    def memory_gates(self, cache: tuple[Any, ...]) -> MemoryGates:
        """Every layer's memory units side by side."""
        layers = [cell.memory_gates(layer_cache) for cell, layer_cache in zip(self.cells, cache)]
        return MemoryGates(*(torch.cat(parts, dim=-1) for parts in zip(*layers)))

    def state_labels(self) -> list[str]:
        return [f"{layer}.{label}" for layer, cell in zip(self.names, self.cells) for label in cell.state_labels()]

    def unit_labels(self) -> list[str]:
        return [f"{layer}.{label}" for layer, cell in zip(self.names, self.cells) for label in cell.unit_labels()]

    def _feeds(self, cache: tuple[Any, ...]) -> list[Tensor | None]:
        """K^l = ∂s^l_t/∂s^{l−1}_t for l ≥ 1 (None for layer 0), shape (..., S_l, S_{l−1})."""
        feeds: list[Tensor | None] = [None]
        for index in range(1, len(self.cells)):
            below = self.cells[index - 1]
            k = self.cells[index].input_jacobian(cache[index])  # (..., S_l, O_{l−1})
            feeds.append(torch.nn.functional.pad(k, (0, below.state_size - below.output_size)))
        return feeds

    def _place_column(
        self, first_layer: int, block: Tensor, feeds: list[Tensor | None], out: Tensor, columns: slice
    ) -> None:
        """Write ``block`` (rows of layer ``first_layer``) and its images K^l ⋯ K^{first+1} block above it."""
        slices = self._slices()
        for index in range(first_layer, len(self.cells)):
            if index > first_layer:
                block = feeds[index] @ block  # type: ignore[operator]
            out[..., slices[index], columns] = block

    def jacobian_paths(self, cache: tuple[Any, ...]) -> dict[str, Tensor]:
        feeds, slices = self._feeds(cache), self._slices()
        paths = {}
        for index, (layer, cell, layer_cache) in enumerate(zip(self.names, self.cells, cache)):
            for name, block in cell.jacobian_paths(layer_cache).items():
                out = block.new_zeros(*block.shape[:-2], self.state_size, self.state_size)
                self._place_column(index, block, feeds, out, slices[index])
                paths[f"{layer}.{name}"] = out
        return paths

    def jacobian(self, cache: tuple[Any, ...]) -> Tensor:
        """The block lower-triangular J from each layer's own Jacobian J^m (its fast form) and one product with the
        feed per block below the diagonal, K^l (K^{l−1} ⋯ J^m), without forming the paths."""
        feeds, slices = self._feeds(cache), self._slices()
        out: Tensor | None = None
        for index, (cell, layer_cache) in enumerate(zip(self.cells, cache)):
            block = cell.jacobian(layer_cache)
            if out is None:
                out = block.new_zeros(*block.shape[:-2], self.state_size, self.state_size)
            self._place_column(index, block, feeds, out, slices[index])
        assert out is not None  # a Stack has at least one layer
        return out

    def input_jacobian(self, cache: tuple[Any, ...]) -> Tensor:
        block = self.cells[0].input_jacobian(cache[0])
        out = block.new_zeros(*block.shape[:-2], self.state_size, self.input_size)
        self._place_column(0, block, self._feeds(cache), out, slice(None))
        return out

    def _layer_adjoints(self, cache: tuple[Any, ...], v: Tensor, skips: Sequence[int] = ()) -> list[Tensor]:
        """Total adjoint at each layer's new state: its own part of v plus what flows down from above. ``skips``: per
        layer, how many leading covectors v (C, ..., B, S) are known to be zero on it and on every layer above (they
        skip its input VJP)."""
        slices = self._slices()
        adjoints: list[Tensor] = [v[..., part] for part in slices]
        for index in range(len(self.cells) - 1, 0, -1):
            skip = skips[index] if skips else 0
            to_input = self.cells[index].input_vjp(cache[index], adjoints[index][skip:])
            flowed = self.cells[index - 1].output_vjp(to_input)
            if skip:
                total = adjoints[index - 1].clone()
                total[skip:] += flowed
                adjoints[index - 1] = total
            else:
                adjoints[index - 1] = adjoints[index - 1] + flowed
        return adjoints

    def state_vjp(self, cache: tuple[Any, ...], v: Tensor) -> Tensor:
        return self._state_vjp(cache, self._layer_adjoints(cache, v))

    def product_vjp(self, cache: tuple[Any, ...], rows: Tensor) -> Tensor:
        """P · J for a product P of the stack's Jacobians: block lower-triangular as J is, so its rows of layer l are
        zero on the layers above, which skip the rows of the layers below them: with two layers of equal size, the
        upper layer's VJPs take half of the rows."""
        skips = [part.start for part in self._slices()]
        return self._state_vjp(cache, self._layer_adjoints(cache, rows, skips), skips)

    def _state_vjp(self, cache: tuple[Any, ...], adjoints: list[Tensor], skips: Sequence[int] = ()) -> Tensor:
        """v · J from the layers' total adjoints (:meth:`_layer_adjoints`): each layer's own state VJP, of its
        covectors after the ``skips`` leading ones known to be zero on it."""
        out = adjoints[0].new_empty(*adjoints[0].shape[:-1], self.state_size)
        skips = skips or [0] * len(self.cells)
        for cell, layer_cache, adjoint, part, skip in zip(self.cells, cache, adjoints, self._slices(), skips):
            out[:skip, ..., part] = 0
            out[skip:, ..., part] = cell.state_vjp(layer_cache, adjoint[skip:])
        return out

    def input_vjp(self, cache: tuple[Any, ...], v: Tensor) -> Tensor:
        return self.cells[0].input_vjp(cache[0], self._layer_adjoints(cache, v)[0])

    def state_jvp(self, cache: tuple[Any, ...], v: Tensor) -> Tensor:
        """J v from the bottom layer up: ds^l = J^l v^l + K^l out(ds^{l−1}), with no feed into layer 0."""
        tangents: list[Tensor] = []
        for index, (cell, layer_cache, part) in enumerate(zip(self.cells, cache, self._slices())):
            tangent = cell.state_jvp(layer_cache, v[..., part])
            if index:
                tangent = tangent + cell.input_jvp(layer_cache, self.cells[index - 1].output(tangents[-1]))
            tangents.append(tangent)
        return torch.cat(tangents, dim=-1)

    def input_jvp(self, cache: tuple[Any, ...], v: Tensor) -> Tensor:
        """∂s'/∂x v from the bottom layer up: ds^0 = K^0 v, ds^l = K^l out(ds^{l−1})."""
        tangents: list[Tensor] = []
        feed = v
        for cell, layer_cache in zip(self.cells, cache):
            tangents.append(cell.input_jvp(layer_cache, feed))
            feed = cell.output(tangents[-1])
        return torch.cat(tangents, dim=-1)

    def jacobian_norm_bounds(self, cache: tuple[Any, ...]) -> NormBounds:
        """Bounds from each layer's L_m ≤ ‖J^m‖_F ≤ U_m and its input bound V_l ≥ ‖K^l‖_F, without forming a block.

        The diagonal blocks give L² = Σ_m L_m². Column block m holds K^l ⋯ K^{m+1} J^m for l ≥ m, each of norm at most
        V_l ⋯ V_{m+1} U_m (‖AB‖_F ≤ ‖A‖_F ‖B‖_F), so U² = Σ_m U_m² ρ_m with ρ_{L−1} = 1, ρ_m = 1 + V_{m+1}² ρ_{m+1}.
        """
        lower: list[Tensor] = []
        upper: list[Tensor] = []
        reach: Tensor | float = 1.0  # ρ_m
        for index in range(len(self.cells) - 1, -1, -1):
            cell, layer_cache = self.cells[index], cache[index]
            bounds = cell.jacobian_norm_bounds(layer_cache)
            lower.append(bounds.lower.square())
            upper.append(bounds.upper.square() * reach)
            if index:
                reach = 1 + cell.input_jacobian_norm_bound(layer_cache).square() * reach
        return NormBounds(torch.stack(lower).sum(0).sqrt(), torch.stack(upper).sum(0).sqrt())

    def jacobian_row_bounds(self, cache: tuple[Any, ...]) -> NormBounds:
        """Row i of layer l's block is [K^l R^{l−1}, J^l, 0], R^{l−1} the rows of the layer below on its output: J^l
        alone bounds it from below, and ‖K^l[i, :] R^{l−1}‖ ≤ ‖K^l[i, :]‖ ‖R^{l−1}‖_F from above, so

            upper_i² = U^l_i² + V^l_i² Σ_{j ∈ out(l−1)} upper_j²

        from each layer's row bounds U^l ≥ ‖J^l[i, :]‖ and V^l ≥ ‖K^l[i, :]‖, without forming a block."""
        lowers: list[Tensor] = []
        uppers: list[Tensor] = []
        for index, (cell, layer_cache) in enumerate(zip(self.cells, cache)):
            own = cell.jacobian_row_bounds(layer_cache)
            upper = own.upper
            if index:
                below = uppers[-1][..., : self.cells[index - 1].output_size]
                reach = torch.linalg.vector_norm(below, dim=-1, keepdim=True)
                upper = torch.hypot(upper, cell.input_jacobian_row_bounds(layer_cache) * reach)
            lowers.append(own.lower)
            uppers.append(upper)
        return NormBounds(torch.cat(lowers, dim=-1), torch.cat(uppers, dim=-1))

    def param_factors(self, cache: tuple[Any, ...], v: Tensor) -> dict[str, Factor]:
        return self._param_factors(cache, self._layer_adjoints(cache, v))

    def _param_factors(self, cache: tuple[Any, ...], adjoints: list[Tensor]) -> dict[str, Factor]:
        """Every layer's factors of its total adjoint (:meth:`_layer_adjoints`)."""
        return {
            f"{layer}.{name}": factor
            for layer, cell, layer_cache, adjoint in zip(self.names, self.cells, cache, adjoints)
            for name, factor in cell.param_factors(layer_cache, adjoint).items()
        }

    def backward(self, cache: tuple[Any, ...], v: Tensor) -> tuple[dict[str, Factor], Tensor]:
        """The factors and v · J from one pass of the adjoints down the layers."""
        adjoints = self._layer_adjoints(cache, v)
        return self._param_factors(cache, adjoints), self._state_vjp(cache, adjoints)

    def path_vjps(self, cache: tuple[Any, ...], v: Tensor) -> dict[str, Tensor]:
        """v · l{m}.p = λ^m P^m_p on layer m's columns (zero elsewhere): the path is column block m of
        K^l ⋯ K^{m+1} P^m_p over the rows l ≥ m, and Σ_{l≥m} v^l K^l ⋯ K^{m+1} = λ^m is the total adjoint at layer m's
        new state (:meth:`_layer_adjoints`)."""
        adjoints = self._layer_adjoints(cache, v)
        vjps: dict[str, Tensor] = {}
        for part, layer, cell, layer_cache, adjoint in zip(self._slices(), self.names, self.cells, cache, adjoints):
            placement = (part.start, self.state_size - part.stop)
            vjps |= {
                f"{layer}.{name}": torch.nn.functional.pad(vjp, placement)
                for name, vjp in cell.path_vjps(layer_cache, adjoint).items()
            }
        return vjps

    @property
    def covector_elements(self) -> int:
        """The layers' own, and wherever :meth:`_passed_down` forms the feed K^{m+1} (the rows reach layer m, or rows
        from further up pass through it): K^{m+1}, the rows and their images, J_m × O_m each (J_m = S_{m+1} + ⋯),
        counted as 4 J_m × O_m."""
        own = sum(cell.covector_elements for cell in self.cells)
        rows = [
            4 * sum(above.state_size for above in self.cells[index + 1 :]) * self.cells[index].output_size
            for index in range(len(self.cells) - 1)
            if self._rows_reach(index) or index + 2 < len(self.cells)
        ]
        return own + sum(rows)

    def _rows_reach(self, index: int) -> bool:
        """Whether the covectors from above reach layer ``index`` (below the top) as rows, not only as column energies:
        where the layer needs them, or passes them further down (the products K^l ⋯ K^{index+1})."""
        return index > 0 or self.cells[index].energies_need_rows

    @property
    def energies_need_rows(self) -> bool:
        """Covectors on the top layer's output reach the layers below only through products with the feeds."""
        return len(self.cells) > 1 or self.cells[0].energies_need_rows

    def param_energies(self, cache: tuple[Any, ...], above: Covectors | None = None) -> dict[str, FactorEnergy]:
        """Each layer's sums over its own one-hots and the covectors that reach it from above (module docstring),
        from the top layer down; ``above`` lies on the top layer's output."""
        layers = []
        for index in range(len(self.cells) - 1, -1, -1):
            energies = self.cells[index].param_energies(cache[index], above)
            layers.append({f"{self.names[index]}.{block}": energy for block, energy in energies.items()})
            if index:
                above = self._passed_down(cache, index, above)
        return {name: energy for layer in reversed(layers) for name, energy in layer.items()}

    def _passed_down(self, cache: tuple[Any, ...], index: int, above: Covectors | None) -> Covectors:
        """The covectors that layer ``index`` passes to the output of the layer below: its one-hots and the rows R of
        ``above`` through the feed K = ∂s^index/∂y^{index−1}, i.e. the rows of K and of R K_out (K_out: K's rows on
        the output). Column energies Σ_j K_ji² (``input_energies``) + Σ_j (R K_out)_ji²; rows where the layer below
        needs them or passes them on."""
        cell, layer_cache = self.cells[index], cache[index]
        energies = cell.input_energies(layer_cache)
        needs_rows = self._rows_reach(index - 1)
        if above is None and not needs_rows:
            return Covectors(energies, None)
        feed = cell.input_jacobian(layer_cache)  # (..., B, S_index, O_{index−1})
        rows = [feed]
        if above is not None:
            through = covector_rows(above, self.kind) @ feed[..., : cell.output_size, :]
            energies = energies + square_sum(through, dims=(-2,))
            rows.append(through)
        return Covectors(energies, torch.cat(rows, dim=-2) if needs_rows else None)
