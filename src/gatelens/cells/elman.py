"""The Elman (vanilla) RNN cell.

    h' = φ(W_ih x + b_ih + W_hh h + b_hh),     φ = tanh or relu

Its Jacobian has a single path,

    recurrent  diag(φ'(a)) W_hh

and its input Jacobian is diag(φ'(a)) W_ih. Forward products and norms follow from the rows φ'(a_i) W[i, :]:

    J v = φ'(a) ⊙ (W_hh v),     ∂h'/∂x v = φ'(a) ⊙ (W_ih v),     ‖J‖_F² = Σ_i φ'(a_i)² ‖W_hh[i, :]‖²

Every block's adjoint is v ⊙ φ'(a), so over the one-hot covectors on h' (local gradients) Σ_j ‖δ(e_j)‖² = Σ_i φ'(a_i)².
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gatelens.activations import CANDIDATE_ACTIVATIONS, Activation, get_activation
from gatelens.cells.base import (
    Cell,
    Clamp,
    Covectors,
    Factor,
    FactorEnergy,
    MemoryGates,
    NormBounds,
    affine,
    check_no_clamp,
    closed_form_elements,
    covector_weights,
    diag_times,
    row_norm_bounds,
    scaled_sum_energies,
    sizing_block,
    uniform_weights,
    unit_energy,
)


@dataclass(frozen=True)
class ElmanCache:
    """x (..., B, I), the previous state h and φ'(a), both (..., B, H)."""

    x: Tensor
    h: Tensor
    dphi: Tensor


@dataclass(frozen=True, eq=False, repr=False)
class Elman(Cell):
    """An Elman RNN cell. ``weights``: W_ih (H, I), W_hh (H, H), optionally b_ih and b_hh (H,)."""

    weights: Mapping[str, Tensor]
    nonlinearity: str = "tanh"
    kind = "Elman"
    _phi: Activation = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_phi", get_activation(self.nonlinearity, role="nonlinearity", allowed=CANDIDATE_ACTIVATIONS)
        )
        hidden, inputs = sizing_block("Elman", self.weights, "W_ih")
        required, optional = self.block_shapes(inputs, hidden)
        self._adopt_weights(
            required, optional, input_size=inputs, hidden_size=hidden, output_size=hidden, state_size=hidden
        )

    @staticmethod
    def block_shapes(input_size: int, hidden_size: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int]]]:
        """Expected shapes of the weight matrices (required) and of the biases (optional)."""
        required = {"W_ih": (hidden_size, input_size), "W_hh": (hidden_size, hidden_size)}
        return required, {"b_ih": (hidden_size,), "b_hh": (hidden_size,)}

    @classmethod
    def random(
        cls,
        input_size: int,
        hidden_size: int,
        *,
        nonlinearity: str = "tanh",
        bias: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Elman:
        """An Elman cell with PyTorch's default initialisation U(−1/√H, 1/√H), reproducible from ``seed``."""
        required, optional = cls.block_shapes(input_size, hidden_size)
        weights = uniform_weights(required | optional if bias else required, hidden_size, seed, dtype)
        return cls(weights, nonlinearity=nonlinearity)

    @property
    def path_names(self) -> tuple[str, ...]:
        return ("recurrent",)

    def step(self, x: Tensor, state: Tensor, clamp: Clamp | None = None) -> tuple[Tensor, ElmanCache]:
        check_no_clamp("an Elman cell", clamp)
        w = self.weights
        a = affine(x, w["W_ih"], w.get("b_ih")) + affine(state, w["W_hh"], w.get("b_hh"))
        new_h = self._phi.function(a)
        return new_h, ElmanCache(x=x, h=state, dphi=self._phi.derivative(a, new_h))

    def memory_gates(self, cache: ElmanCache) -> MemoryGates:
        """No gates: nothing is carried (0), the past always enters (1)."""
        zeros = torch.zeros_like(cache.dphi)
        return MemoryGates(carry=zeros, admit=zeros + 1, gate=zeros + 1, leak=zeros + 1)

    def jacobian_paths(self, cache: ElmanCache) -> dict[str, Tensor]:
        return {"recurrent": diag_times(cache.dphi, self.weights["W_hh"])}

    def input_jacobian(self, cache: ElmanCache) -> Tensor:
        return diag_times(cache.dphi, self.weights["W_ih"])

    def state_vjp(self, cache: ElmanCache, v: Tensor) -> Tensor:
        return (v * cache.dphi) @ self.weights["W_hh"]

    def input_vjp(self, cache: ElmanCache, v: Tensor) -> Tensor:
        return (v * cache.dphi) @ self.weights["W_ih"]

    def state_jvp(self, cache: ElmanCache, v: Tensor) -> Tensor:
        """J v = φ'(a) ⊙ (W_hh v)."""
        return cache.dphi * affine(v, self.weights["W_hh"], None)

    def input_jvp(self, cache: ElmanCache, v: Tensor) -> Tensor:
        """∂h'/∂x v = φ'(a) ⊙ (W_ih v)."""
        return cache.dphi * affine(v, self.weights["W_ih"], None)

    def _norm(self, cache: ElmanCache, block: str) -> Tensor:
        """‖diag(φ'(a)) W‖_F = √(Σ_i φ'(a_i)² ‖W[i, :]‖²) for the weight block W = ``block``."""
        return torch.linalg.vector_norm(cache.dphi * self.weights[block].norm(dim=-1), dim=-1)

    def jacobian_norm_bounds(self, cache: ElmanCache) -> NormBounds:
        """‖J‖_F itself (both bounds): √(Σ_i φ'(a_i)² ‖W_hh[i, :]‖²)."""
        norm = self._norm(cache, "W_hh")
        return NormBounds(norm, norm)

    def input_jacobian_norm_bound(self, cache: ElmanCache) -> Tensor:
        """‖∂h'/∂x‖_F itself: √(Σ_i φ'(a_i)² ‖W_ih[i, :]‖²)."""
        return self._norm(cache, "W_ih")

    def jacobian_row_bounds(self, cache: ElmanCache) -> NormBounds:
        """The rows φ'(a_i) W_hh[i, :], rounding included (:func:`row_norm_bounds`)."""
        return row_norm_bounds([cache.dphi], [self.weights["W_hh"]])

    def input_jacobian_row_bounds(self, cache: ElmanCache) -> Tensor:
        """The rows φ'(a_i) W_ih[i, :], rounding included."""
        return row_norm_bounds([cache.dphi], [self.weights["W_ih"]]).upper

    def param_factors(self, cache: ElmanCache, v: Tensor) -> dict[str, Factor]:
        g = v * cache.dphi
        return {block: Factor(g, inputs) for block, inputs in self._block_inputs(cache).items()}

    def _block_inputs(self, cache: ElmanCache) -> dict[str, Tensor | None]:
        """Each weight block's input u (None for a bias); all share the one adjoint v ⊙ φ'(a)."""
        blocks: dict[str, Tensor | None] = {"W_ih": cache.x, "W_hh": cache.h}
        if "b_ih" in self.weights:
            blocks |= {"b_ih": None, "b_hh": None}
        return blocks

    def path_vjps(self, cache: ElmanCache, v: Tensor) -> dict[str, Tensor]:
        """The one path's v · J."""
        return {"recurrent": self.state_vjp(cache, v)}

    covector_elements = property(closed_form_elements)

    @property
    def energies_need_rows(self) -> bool:
        """The adjoint v ⊙ φ'(a) acts on each unit alone: the covectors' column energies suffice."""
        return False

    def param_energies(self, cache: ElmanCache, above: Covectors | None = None) -> dict[str, FactorEnergy]:
        """The adjoint v ⊙ φ'(a) sums to Σ_i φ'(a_i)² ω_i, ω_i = 1 + Σ_j w_j[i]² over the rows of ``above``."""
        energy = unit_energy(cache.dphi, covector_weights(above))
        return {block: FactorEnergy(energy, inputs) for block, inputs in self._block_inputs(cache).items()}

    def input_energies(self, cache: ElmanCache) -> Tensor:
        """Σ_j φ'(a_j)² W_ih[j, i]²: (φ'(a)²) (W_ih ∘ W_ih)."""
        return scaled_sum_energies([(cache.dphi, self.weights["W_ih"])])
