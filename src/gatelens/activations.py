"""Element-wise activations with their derivatives.

Every cell names its activations by string; this module is the one place that turns a name into a function
φ(a) and its derivative φ'(a). The derivative is written in terms of the pre-activation ``a`` and the output
``y = φ(a)``. Where y saturates, a derivative written from y would cancel (1 − y² once tanh(a) rounds to ±1), so
these are formed from ``a``: tanh'(a) = 1/cosh²(a), which keeps every digit until it underflows.

Hard sigmoid has two definitions in use, and they give different numbers:

    hard_sigmoid_keras2(a) = clip(0.2·a + 0.5, 0, 1)     Keras 2 / tf.keras, ONNX HardSigmoid defaults
    hard_sigmoid_keras3(a) = clip(a/6 + 0.5, 0, 1)       Keras 3, torch.nn.functional.hardsigmoid

so a bare ``"hard_sigmoid"`` is refused with a message that names both.

Every gate activation is symmetric about (0, ½), so its complement is 1 − g(a) = g(−a). Gates give it with their
value and slope (``Activation.gate``), computed from −a, never as 1 − g(a): once g(a) is within eps of 1, 1 − g(a)
rounds to 0 while g(−a) keeps its true value (σ(20) is 1 in float32; σ(−20) = 2.1e-9). The sigmoid's derivative
σ(a)·σ(−a) is formed the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """An element-wise function φ with its derivative φ'(a), given a and y = φ(a). A gate activation also has
    ``gate``: a ↦ (φ(a), 1 − φ(a) = φ(−a), φ'(a)) in one pass, the complement formed from −a (module docstring)."""

    name: str
    function: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor, Tensor], Tensor]
    gate: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None


def _sigmoid_gate(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """σ(a), σ(−a) and σ'(a) = σ(a)·σ(−a)."""
    value, complement = torch.sigmoid(a), torch.sigmoid(-a)
    return value, complement, value * complement


def _hard_sigmoid(slope: float) -> Activation:
    """clip(slope·a + 0.5, 0, 1); derivative slope inside the linear region, 0 outside."""
    edge = 0.5 / slope

    def function(a: Tensor) -> Tensor:
        return (slope * a + 0.5).clamp(0.0, 1.0)

    def derivative(a: Tensor, y: Tensor) -> Tensor:
        return (a.abs() < edge).to(a.dtype) * slope

    def gate(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        value = function(a)
        return value, function(-a), derivative(a, value)

    name = "hard_sigmoid_keras2" if slope == 0.2 else "hard_sigmoid_keras3"
    return Activation(name, function, derivative, gate=gate)


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation("sigmoid", torch.sigmoid, lambda a, y: y * torch.sigmoid(-a), gate=_sigmoid_gate),
    "tanh": Activation("tanh", torch.tanh, lambda a, y: torch.cosh(a).square().reciprocal()),
    "relu": Activation("relu", torch.relu, lambda a, y: (a > 0).to(a.dtype)),
    "hard_sigmoid_keras2": _hard_sigmoid(0.2),
    "hard_sigmoid_keras3": _hard_sigmoid(1.0 / 6.0),
}


def get_activation(name: str, *, role: str, allowed: tuple[str, ...]) -> Activation:
    """Look up ``name`` among ``allowed``; ``role`` names the argument in the error message."""
    if name == "hard_sigmoid":
        raise ValueError(
            f"{role}='hard_sigmoid' is ambiguous: Keras 2 uses clip(0.2·a + 0.5, 0, 1) and Keras 3 uses "
            f"clip(a/6 + 0.5, 0, 1). Pass 'hard_sigmoid_keras2' or 'hard_sigmoid_keras3'."
        )
    if name not in allowed:
        raise ValueError(f"unknown {role} {name!r}; expected one of {', '.join(map(repr, allowed))}")
    return ACTIVATIONS[name]


GATE_ACTIVATIONS = ("sigmoid", "hard_sigmoid_keras2", "hard_sigmoid_keras3")
CANDIDATE_ACTIVATIONS = ("tanh", "relu")
