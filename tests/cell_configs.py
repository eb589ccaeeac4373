"""One table of cells for every derivative test: each entry builds a gatelens cell and its reference step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import gatelens as gl
from tests import reference

F64 = torch.float64


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected| (absolute when expected is all zero)."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def scaled(cell: gl.Cell, factor: float) -> gl.Cell:
    """The cell with every weight multiplied by ``factor`` (to drive gates into saturation and back)."""
    return type(cell)(
        {k: w * factor for k, w in cell.weights.items()},
        **{k: getattr(cell, k) for k in ("reset", "update", "gate", "candidate", "nonlinearity") if hasattr(cell, k)},
    )


def reference_step(cell: gl.Cell) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """The oracle step for ``cell``: (weights by the cell's block names, x (I,), s (S,)) ↦ s' (S,)."""
    if isinstance(cell, gl.GRU):
        return functools.partial(
            reference.gru_step, reset=cell.reset, update=cell.update, gate=cell.gate, candidate=cell.candidate
        )
    if isinstance(cell, gl.Elman):
        return functools.partial(reference.elman_step, nonlinearity=cell.nonlinearity)
    if isinstance(cell, gl.LSTM):
        return functools.partial(reference.lstm_step, gate=cell.gate, candidate=cell.candidate)
    if isinstance(cell, gl.Stack):
        steps = [reference_step(layer) for layer in cell.cells]

        def stack(weights: dict[str, Tensor], x: Tensor, s: Tensor) -> Tensor:
            layers = [
                (
                    step,
                    {k.split(".", 1)[1]: w for k, w in weights.items() if k.startswith(f"l{index}.")},
                    layer.state_size,
                    layer.output_size,
                )
                for index, (step, layer) in enumerate(zip(steps, cell.cells))
            ]
            return reference.stack_step(layers, x, s)

        return stack
    raise TypeError(type(cell))


@dataclass(frozen=True)
class CellCase:
    name: str
    build: Callable[[], gl.Cell]

    def __str__(self) -> str:
        return self.name


def _gru(reset: str, update: str, gate: str = "sigmoid", **options: object) -> CellCase:
    name = f"gru-{reset}-{update}-{gate}" + "".join(f"-{k}={v}" for k, v in options.items())
    return CellCase(
        name,
        lambda: scaled(gl.GRU.random(3, 5, reset=reset, update=update, gate=gate, dtype=F64, seed=1, **options), 3.0),
    )  # type: ignore[arg-type]


CELL_CASES = [
    *[_gru(reset, update) for reset in ("after", "before") for update in ("keep", "replace")],
    *[
        _gru(reset, "keep", gate)
        for reset in ("after", "before")
        for gate in ("hard_sigmoid_keras2", "hard_sigmoid_keras3")
    ],
    _gru("before", "replace", bias=False),
    _gru("after", "keep", candidate="relu"),
    CellCase("elman-tanh", lambda: scaled(gl.Elman.random(3, 5, dtype=F64, seed=2), 3.0)),
    CellCase("elman-relu", lambda: scaled(gl.Elman.random(3, 5, nonlinearity="relu", dtype=F64, seed=2), 3.0)),
    CellCase("elman-nobias", lambda: gl.Elman.random(3, 5, bias=False, dtype=F64, seed=2)),
    CellCase("lstm", lambda: scaled(gl.LSTM.random(3, 5, dtype=F64, seed=3), 3.0)),
    CellCase("lstm-proj", lambda: scaled(gl.LSTM.random(3, 5, projection=2, dtype=F64, seed=3), 3.0)),
    CellCase(
        "lstm-nobias-hardsig",
        lambda: scaled(gl.LSTM.random(3, 4, bias=False, gate="hard_sigmoid_keras2", dtype=F64, seed=4), 3.0),
    ),
    CellCase(
        "stack-gru-gru",
        lambda: gl.Stack(
            [scaled(gl.GRU.random(3, 4, dtype=F64, seed=5), 2.0), scaled(gl.GRU.random(4, 3, dtype=F64, seed=6), 2.0)]
        ),
    ),
    CellCase(
        "stack-mixed",
        lambda: gl.Stack(
            [
                scaled(gl.GRU.random(3, 4, reset="before", update="replace", dtype=F64, seed=7), 2.0),
                scaled(gl.LSTM.random(4, 3, projection=2, dtype=F64, seed=8), 2.0),
                scaled(gl.Elman.random(2, 3, dtype=F64, seed=9), 2.0),
            ]
        ),
    ),
]


def chaotic_elman(hidden: int = 64, steps: int = 400, batch: int = 2) -> tuple[dict[str, Tensor], Tensor]:
    """The weights (float64) and input (T, B, 2) of a chaotic tanh Elman RNN, W_hh ~ N(0, 16/H): its Jacobian
    products grow by about e^{0.4} per step, beyond float32's range (e^{88}) within a few hundred steps."""
    generator = torch.Generator().manual_seed(0)
    weights = {
        "W_ih": torch.randn(hidden, 2, generator=generator, dtype=F64),
        "W_hh": torch.randn(hidden, hidden, generator=generator, dtype=F64) * (16 / hidden) ** 0.5,
    }
    return weights, torch.randn(steps, batch, 2, generator=generator, dtype=F64)
