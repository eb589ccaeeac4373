"""The test oracle: plain step functions written straight from the equations in docs/notation.md.

They act on one sequence element (vectors, no batch) and use column-vector algebra (W @ h), so they share no code
and no layout with the package. Autograd over them (torch.func.jacrev) gives the reference derivatives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Weights = Mapping[str, Tensor]


def activation(name: str, a: Tensor) -> Tensor:
    if name == "sigmoid":
        return 1 / (1 + torch.exp(-a))
    if name == "tanh":
        return torch.tanh(a)
    if name == "relu":
        return torch.clamp(a, min=0)
    if name == "hard_sigmoid_keras2":
        return torch.clamp(0.2 * a + 0.5, 0, 1)
    if name == "hard_sigmoid_keras3":
        return torch.clamp(a / 6 + 0.5, 0, 1)
    raise KeyError(name)


def _b(w: Weights, name: str, like: Tensor) -> Tensor:
    return w[name] if name in w else torch.zeros_like(like)


def gru_step(w: Weights, x: Tensor, h: Tensor, *, reset: str, update: str, gate: str, candidate: str) -> Tensor:
    """r, z, n, h' exactly as in the notation, for vectors x (I,) and h (H,)."""
    a_r = w["W_ir"] @ x + _b(w, "b_ir", h) + w["W_hr"] @ h + _b(w, "b_hr", h)
    a_z = w["W_iz"] @ x + _b(w, "b_iz", h) + w["W_hz"] @ h + _b(w, "b_hz", h)
    r = activation(gate, a_r)
    z = activation(gate, a_z)
    if reset == "after":
        n = activation(candidate, w["W_in"] @ x + _b(w, "b_in", h) + r * (w["W_hn"] @ h + _b(w, "b_hn", h)))
    else:
        n = activation(candidate, w["W_in"] @ x + _b(w, "b_in", h) + w["W_hn"] @ (r * h) + _b(w, "b_hn", h))
    if update == "keep":
        return z * h + (1 - z) * n
    return (1 - z) * h + z * n


def elman_step(w: Weights, x: Tensor, h: Tensor, *, nonlinearity: str) -> Tensor:
    return activation(nonlinearity, w["W_ih"] @ x + _b(w, "b_ih", h) + w["W_hh"] @ h + _b(w, "b_hh", h))


def lstm_step(w: Weights, x: Tensor, s: Tensor, *, gate: str, candidate: str) -> Tensor:
    """s = [h, c]; returns [h', c']."""
    width = w["W_hi"].shape[1]
    h, c = s[:width], s[width:]

    def pre(g: str) -> Tensor:
        return w[f"W_i{g}"] @ x + _b(w, f"b_i{g}", c) + w[f"W_h{g}"] @ h + _b(w, f"b_h{g}", c)

    i, f, o = activation(gate, pre("i")), activation(gate, pre("f")), activation(gate, pre("o"))
    g = activation(candidate, pre("g"))
    c_new = f * c + i * g
    m = o * activation(candidate, c_new)
    h_new = w["W_proj"] @ m if "W_proj" in w else m
    return torch.cat([h_new, c_new])


StepFunction = Callable[[Weights, Tensor, Tensor], Tensor]


def stack_step(layers: list[tuple[StepFunction, Weights, int, int]], x: Tensor, s: Tensor) -> Tensor:
    """Layers (step, weights, state size, output size); layer l reads the first `output size` entries of l − 1."""
    new, offset, layer_input = [], 0, x
    for step, weights, state_size, output_size in layers:
        state = step(weights, layer_input, s[offset : offset + state_size])
        new.append(state)
        layer_input = state[:output_size]
        offset += state_size
    return torch.cat(new)
