"""The Elman (vanilla) RNN cell.

    h' = φ(W_ih x + b_ih + W_hh h + b_hh),     φ = tanh or relu

Its Jacobian has a single path,

    recurrent  diag(φ'(a)) W_hh

and its input Jacobian is diag(φ'(a)) W_ih.
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
    Factor,
    MemoryGates,
    affine,
    check_no_clamp,
    diag_times,
    sizing_block,
    uniform_weights,
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

    def param_factors(self, cache: ElmanCache, v: Tensor) -> dict[str, Factor]:
        g = v * cache.dphi
        factors = {"W_ih": Factor(g, cache.x), "W_hh": Factor(g, cache.h)}
        if "b_ih" in self.weights:
            factors |= {"b_ih": Factor(g, None), "b_hh": Factor(g, None)}
        return factors
