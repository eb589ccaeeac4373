"""The PyTorch loader, with the PyTorch module itself as the oracle.

Every forward pass (padded, packed, with h0, unbatched, cells) must reproduce what the module returns, and every
per-step Jacobian must equal autograd through one step of the module (an oracle that shares no code with gatelens).
"""

from __future__ import annotations

import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gatelens as gl

# torch warns that its oneDNN path does not do projections; it falls back to its own kernel, which is what we compare.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections")

I, H, T, B = 3, 5, 6, 3
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
JACOBIAN_TOLERANCE = 1e-10


@dataclass(frozen=True)
class Config:
    kind: str  # "GRU", "LSTM", "RNN_TANH", "RNN_RELU"
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj_size: int = 0

    def __str__(self) -> str:
        return (
            f"{self.kind}-L{self.num_layers}{'-bi' if self.bidirectional else ''}{'-bf' if self.batch_first else ''}"
            f"{'' if self.bias else '-nobias'}{f'-P{self.proj_size}' if self.proj_size else ''}"
        )

    @property
    def nonlinearity(self) -> str | None:
        return {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(self.kind)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return self.proj_size or H

    def module(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.RNNBase:
        torch.manual_seed(seed)
        common = dict(
            num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first, bidirectional=self.bidirectional
        )
        if self.kind == "GRU":
            module = nn.GRU(I, H, **common)
        elif self.kind == "LSTM":
            module = nn.LSTM(I, H, proj_size=self.proj_size, **common)
        else:
            module = nn.RNN(I, H, nonlinearity=self.nonlinearity, **common)
        return module.to(dtype).eval()

    def x(self, dtype: torch.dtype = torch.float64, seed: int = 1, unbatched: bool = False) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        shape = (T, I) if unbatched else (B, T, I) if self.batch_first else (T, B, I)
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    def h0(self, dtype: torch.dtype = torch.float64, seed: int = 2, unbatched: bool = False) -> Tensor | tuple:
        generator = torch.Generator().manual_seed(seed)
        lead = (self.num_layers * self.directions,) if unbatched else (self.num_layers * self.directions, B)
        h = torch.randn(*lead, self.output_size, generator=generator, dtype=torch.float64).to(dtype)
        if self.kind != "LSTM":
            return h
        c = torch.randn(*lead, H, generator=generator, dtype=torch.float64).to(dtype)
        return h, c


CONFIGS = [
    Config("GRU"),
    Config("GRU", num_layers=2),
    Config("GRU", bidirectional=True),
    Config("GRU", num_layers=2, bidirectional=True, batch_first=True),
    Config("GRU", batch_first=True, bias=False),
    Config("GRU", num_layers=2, bidirectional=True, bias=False),
    Config("GRU", bidirectional=True, batch_first=True, bias=False),
    Config("LSTM"),
    Config("LSTM", num_layers=2),
    Config("LSTM", bidirectional=True),
    Config("LSTM", num_layers=2, bidirectional=True, batch_first=True, bias=False),
    Config("LSTM", proj_size=2),
    Config("LSTM", num_layers=2, batch_first=True, proj_size=3),
    Config("LSTM", bidirectional=True, bias=False, proj_size=2),
    Config("LSTM", num_layers=2, bidirectional=True, batch_first=True, proj_size=2),
    Config("RNN_TANH"),
    Config("RNN_TANH", num_layers=2, bidirectional=True),
    Config("RNN_TANH", batch_first=True, bias=False),
    Config("RNN_TANH", num_layers=2, batch_first=True),
    Config("RNN_RELU"),
    Config("RNN_RELU", num_layers=2, bidirectional=True, batch_first=True),
    Config("RNN_RELU", bidirectional=True, bias=False),
    Config("RNN_RELU", num_layers=2, bias=False),
]
# A smaller set for the more expensive or more specialised checks: every kind, 2 layers, both directions.
SOME_CONFIGS = [
    Config("GRU", num_layers=2, bidirectional=True, batch_first=True),
    Config("GRU", batch_first=True, bias=False),
    Config("LSTM", num_layers=2, bidirectional=True),
    Config("LSTM", num_layers=2, bidirectional=True, batch_first=True, proj_size=2),
    Config("RNN_TANH", num_layers=2, bidirectional=True),
    Config("RNN_RELU", num_layers=2, bidirectional=True, batch_first=True),
]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected|, after requiring equal shapes and dtypes (no silent broadcast)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_close(actual, expected, tolerance: float) -> None:
    """Tensors or (h, c) pairs agree to ``tolerance`` relative error."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), f"expected a pair, got {type(actual)}"
        for a, e in zip(actual, expected):
            assert_close(a, e, tolerance)
        return
    assert isinstance(actual, Tensor), f"expected a tensor, got {type(actual).__name__}"
    error = relative_error(actual, expected)
    assert error <= tolerance, f"relative error {error:.3e} > {tolerance:.0e}"


def model_inputs_time_major(config: Config, x: Tensor) -> Tensor:
    return x.transpose(0, 1) if config.batch_first else x


# ---------------------------------------------------------------------------------------------------------------
# a. Forward equality


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_forward_matches_module(config: Config, dtype: torch.dtype) -> None:
    module = config.module(dtype)
    model = gl.load(module)
    assert model.dtype == dtype
    x = config.x(dtype)
    with torch.no_grad():
        expected_output, expected_final = module(x)
    trace = model.trace(x)
    assert_close(trace.output, expected_output, TOLERANCE[dtype])
    assert_close(trace.final_state, expected_final, TOLERANCE[dtype])


@pytest.mark.parametrize("config", SOME_CONFIGS, ids=str)
def test_states_hold_each_directions_outputs(config: Config) -> None:
    """states["l{last}"][1:] is the last layer's forward output; the reverse states run in their own order."""
    module = config.module()
    x = config.x()
    with torch.no_grad():
        output, _ = module(x)
    output = model_inputs_time_major(config, output)
    trace = gl.load(module).trace(x)
    last = config.num_layers - 1
    P = config.output_size
    forward = trace.states[f"l{last}"][1:, :, :P]
    assert_close(forward, output[..., :P], 1e-12)
    if config.bidirectional:
        reverse = trace.states[f"l{last}_reverse"][1:, :, :P]
        assert_close(reverse.flip(0), output[..., P:], 1e-12)


def test_float32_module_converted_to_float64_matches_double_module() -> None:
    config = Config("GRU", num_layers=2, bidirectional=True)
    module = config.module(torch.float32)
    model = gl.load(module).to(torch.float64)
    assert model.dtype == torch.float64
    x = config.x(torch.float64)
    with torch.no_grad():
        expected_output, expected_final = module.double()(x)
    trace = model.trace(x)
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# b. Packed sequences


@pytest.mark.parametrize("lengths", [[6, 3, 1], [2, 6, 4]], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_packed_sequences_match_module(config: Config, lengths: list[int]) -> None:
    module = config.module()
    x = config.x()
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=config.batch_first, enforce_sorted=False)
    with torch.no_grad():
        packed_output, expected_final = module(packed)
    expected_output, _ = pad_packed_sequence(packed_output, batch_first=config.batch_first, total_length=T)
    trace = gl.load(module).trace(x, lengths=lengths)
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)
    # the padding is exactly zero, as pad_packed_sequence gives it
    time_major = model_inputs_time_major(config, trace.output)
    for b, length in enumerate(lengths):
        assert bool((time_major[length:, b] == 0).all())


@pytest.mark.parametrize("config", SOME_CONFIGS, ids=str)
def test_packed_sequences_with_h0_match_module(config: Config) -> None:
    module = config.module()
    x, h0 = config.x(), config.h0()
    lengths = [4, 6, 1]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=config.batch_first, enforce_sorted=False)
    with torch.no_grad():
        packed_output, expected_final = module(packed, h0)
    expected_output, _ = pad_packed_sequence(packed_output, batch_first=config.batch_first, total_length=T)
    trace = gl.load(module).trace(x, h0, lengths=torch.tensor(lengths))
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


def test_full_lengths_equal_no_lengths() -> None:
    config = Config("LSTM", num_layers=2, bidirectional=True, proj_size=2)
    model = gl.load(config.module())
    x = config.x()
    plain, padded = model.trace(x), model.trace(x, lengths=[T] * B)
    assert_close(padded.output, plain.output, 0.0)
    assert_close(padded.final_state, plain.final_state, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# c. Initial states


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_h0_matches_module(config: Config, dtype: torch.dtype) -> None:
    module = config.module(dtype)
    x, h0 = config.x(dtype), config.h0(dtype)
    with torch.no_grad():
        expected_output, expected_final = module(x, h0)
    trace = gl.load(module).trace(x, h0)
    assert_close(trace.output, expected_output, TOLERANCE[dtype])
    assert_close(trace.final_state, expected_final, TOLERANCE[dtype])
    # h0 really is used: the states start from it
    h = h0[0] if isinstance(h0, tuple) else h0
    assert_close(trace.states["l0"][0, :, : config.output_size], h[0], 0.0)


def test_h0_as_dict_of_full_states_matches_module() -> None:
    config = Config("LSTM", num_layers=2, bidirectional=True, proj_size=2)
    module = config.module()
    x, (h0, c0) = config.x(), config.h0()
    with torch.no_grad():
        expected_output, expected_final = module(x, (h0, c0))
    names = ["l0", "l0_reverse", "l1", "l1_reverse"]
    states = {name: torch.cat([h0[k], c0[k]], dim=-1) for k, name in enumerate(names)}
    trace = gl.load(module).trace(x, states)
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# d. Cells


CELLS = [
    ("GRUCell", lambda bias: nn.GRUCell(I, H, bias=bias)),
    ("LSTMCell", lambda bias: nn.LSTMCell(I, H, bias=bias)),
    ("RNNCell-tanh", lambda bias: nn.RNNCell(I, H, bias=bias, nonlinearity="tanh")),
    ("RNNCell-relu", lambda bias: nn.RNNCell(I, H, bias=bias, nonlinearity="relu")),
]


def run_cell(cell: nn.RNNCellBase, x: Tensor, state) -> tuple[Tensor, object]:
    """The reference loop: apply the cell at every step; returns the stacked h_t and the final state."""
    outputs = []
    with torch.no_grad():
        for t in range(x.shape[0]):
            state = cell(x[t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs), state


@pytest.mark.parametrize("with_h0", [False, True], ids=["zeros", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name,make", CELLS, ids=[name for name, _ in CELLS])
def test_cell_matches_python_loop(name: str, make, bias: bool, with_h0: bool) -> None:
    torch.manual_seed(0)
    cell = make(bias).double()
    x = Config("GRU").x()
    generator = torch.Generator().manual_seed(5)
    h = (
        torch.randn(B, H, generator=generator, dtype=torch.float64)
        if with_h0
        else torch.zeros(B, H, dtype=torch.float64)
    )
    c = (
        torch.randn(B, H, generator=generator, dtype=torch.float64)
        if with_h0
        else torch.zeros(B, H, dtype=torch.float64)
    )
    is_lstm = isinstance(cell, nn.LSTMCell)
    expected_output, final = run_cell(cell, x, (h, c) if is_lstm else h)
    h0 = (h[None], c[None]) if is_lstm else h[None]
    trace = gl.load(cell).trace(x, h0 if with_h0 else None)
    assert_close(trace.output, expected_output, 1e-12)
    expected_final = (final[0][None], final[1][None]) if is_lstm else final[None]
    assert_close(trace.final_state, expected_final, 1e-12)


@pytest.mark.parametrize("name,make", CELLS, ids=[name for name, _ in CELLS])
def test_cell_float32_matches_python_loop(name: str, make) -> None:
    torch.manual_seed(0)
    cell = make(True)
    x = Config("GRU").x(torch.float32)
    is_lstm = isinstance(cell, nn.LSTMCell)
    zeros = torch.zeros(B, H)
    expected_output, final = run_cell(cell, x, (zeros, zeros) if is_lstm else zeros)
    trace = gl.load(cell).trace(x)
    assert_close(trace.output, expected_output, 1e-5)
    assert_close(trace.final_state, (final[0][None], final[1][None]) if is_lstm else final[None], 1e-5)


@pytest.mark.parametrize("name,make", CELLS, ids=[name for name, _ in CELLS])
def test_cell_unbatched_matches_python_loop(name: str, make) -> None:
    torch.manual_seed(0)
    cell = make(True).double()
    x = Config("GRU").x(unbatched=True)  # (T, I); the cell reads (I,) vectors
    is_lstm = isinstance(cell, nn.LSTMCell)
    zeros = torch.zeros(H, dtype=torch.float64)
    expected_output, final = run_cell(cell, x, (zeros, zeros) if is_lstm else zeros)
    trace = gl.load(cell).trace(x)
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, (final[0][None], final[1][None]) if is_lstm else final[None], 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# e. Unbatched input


@pytest.mark.parametrize("with_h0", [False, True], ids=["zeros", "h0"])
@pytest.mark.parametrize("config", SOME_CONFIGS, ids=str)
def test_unbatched_matches_module(config: Config, with_h0: bool) -> None:
    module = config.module()
    x = config.x(unbatched=True)
    h0 = config.h0(unbatched=True) if with_h0 else None
    with torch.no_grad():
        expected_output, expected_final = module(x, h0)
    trace = gl.load(module).trace(x, h0)
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# f. Per-step Jacobians against autograd through one step of the module


def batch_diagonal(full: Tensor) -> Tensor:
    """(B, S, B, S) Jacobian of a batched map ↦ its (B, S, S) per-sequence blocks."""
    index = torch.arange(full.shape[0])
    return full[index, :, index, :]


def split_state(config: Config, state: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """A recurrence's full state (..., S) ↦ what the module takes as one layer's h0: h, or (h, c) for an LSTM."""
    if config.kind != "LSTM":
        return state
    return state[..., : config.output_size], state[..., config.output_size :]


def join_final(config: Config, final, index: int) -> Tensor:
    """Entry ``index`` of the module's h_n (or [h_n, c_n]) as a full state (B, S)."""
    if config.kind != "LSTM":
        return final[index]
    return torch.cat([final[0][index], final[1][index]], dim=-1)


def module_step(config: Config, module: nn.RNNBase, x_step: Tensor, states: list[Tensor]) -> Tensor:
    """One step of the module on x_step (1, B, I) from the given per-recurrence states; final states concatenated."""
    parts = [split_state(config, s) for s in states]
    if config.kind == "LSTM":
        h0 = (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    else:
        h0 = torch.stack(parts)
    _, final = module(x_step, h0)
    return torch.cat([join_final(config, final, k) for k in range(len(states))], dim=-1)


JACOBIAN_CONFIGS = [
    Config("GRU"),
    Config("GRU", bias=False),
    Config("LSTM"),
    Config("LSTM", proj_size=2),
    Config("RNN_TANH"),
    Config("RNN_RELU"),
]


@pytest.mark.parametrize("config", JACOBIAN_CONFIGS, ids=str)
def test_jacobians_match_autograd_through_module(config: Config) -> None:
    module = config.module()
    x = config.x()
    trace = gl.load(module).trace(x)
    J = trace.jacobians(layer=0)
    states = trace.states["l0"]
    S = states.shape[-1]
    assert J.shape == (T, B, S, S)
    for i in range(T):
        step = lambda s: module_step(config, module, x[i : i + 1], [s])  # noqa: E731
        assert_close(step(states[i]).detach(), states[i + 1], 1e-12)  # the oracle starts where gatelens does
        expected = batch_diagonal(jacobian(step, states[i]))
        assert_close(J[i], expected, JACOBIAN_TOLERANCE)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_reverse_direction_jacobians_match_autograd(kind: str) -> None:
    """Reverse step i reads x[T − 1 − i]: one step of the module's reverse direction from states[i]."""
    config = Config(kind, bidirectional=True, proj_size=2 if kind == "LSTM" else 0)
    module = config.module()
    x = config.x()
    trace = gl.load(module).trace(x)
    J = trace.jacobians(layer=0, direction="reverse")
    forward_states, states = trace.states["l0"], trace.states["l0_reverse"]
    S = config.output_size + (H if kind == "LSTM" else 0)
    assert J.shape == (T, B, S, S)
    for i in range(T):
        t = T - 1 - i

        def step(s: Tensor) -> Tensor:
            return module_step(config, module, x[t : t + 1], [forward_states[i], s])[:, S:]

        assert_close(step(states[i]).detach(), states[i + 1], 1e-12)
        assert_close(J[i], batch_diagonal(jacobian(step, states[i])), JACOBIAN_TOLERANCE)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN_TANH"])
def test_stack_jacobian_matches_autograd_over_both_layers(kind: str) -> None:
    """layer=None on a 2-layer model: J[i] = ∂[s⁰, s¹]_{i+1}/∂[s⁰, s¹]_i, one module step over both layers."""
    config = Config(kind, num_layers=2, proj_size=2 if kind == "LSTM" else 0)
    module = config.module()
    x = config.x()
    trace = gl.load(module).trace(x)
    J = trace.jacobians()
    s0, s1 = trace.states["l0"], trace.states["l1"]
    width = s0.shape[-1]
    assert J.shape == (T, B, 2 * width, 2 * width)
    for i in range(T):

        def step(s: Tensor) -> Tensor:
            return module_step(config, module, x[i : i + 1], [s[:, :width], s[:, width:]])

        state = torch.cat([s0[i], s1[i]], dim=-1)
        assert_close(step(state).detach(), torch.cat([s0[i + 1], s1[i + 1]], dim=-1), 1e-12)
        expected = batch_diagonal(jacobian(step, state))
        assert_close(J[i], expected, JACOBIAN_TOLERANCE)
        # the layer-0 rows do not depend on layer 1's state: the block above the diagonal is exactly zero
        assert bool((J[i][:, :width, width:] == 0).all())


def test_jacobians_with_lengths_match_autograd_and_are_identity_past_the_end() -> None:
    config = Config("GRU")
    module = config.module()
    x = config.x()
    lengths = [6, 3, 1]
    trace = gl.load(module).trace(x, lengths=lengths)
    J, states = trace.jacobians(layer=0), trace.states["l0"]
    eye = torch.eye(H, dtype=torch.float64)
    for i in range(T):
        step = lambda s: module_step(config, module, x[i : i + 1], [s])  # noqa: E731
        expected = batch_diagonal(jacobian(step, states[i]))
        for b, length in enumerate(lengths):
            if i < length:
                assert_close(J[i, b], expected[b], JACOBIAN_TOLERANCE)
            else:
                assert torch.equal(J[i, b], eye), f"step {i} of sequence {b} (length {length}) is not the identity"
                assert torch.equal(states[i + 1, b], states[i, b])


def test_reverse_jacobians_with_lengths_read_each_sequence_backwards_from_its_end() -> None:
    """Reverse step i of sequence b reads x[L_b − 1 − i, b]; steps past L_b are the identity."""
    config = Config("GRU", bidirectional=True)
    module = config.module()
    x = config.x()
    lengths = [4, 6, 2]
    trace = gl.load(module).trace(x, lengths=lengths)
    J = trace.jacobians(layer=0, direction="reverse")
    forward_states, states = trace.states["l0"], trace.states["l0_reverse"]
    eye = torch.eye(H, dtype=torch.float64)
    for i in range(T):
        # each sequence's own input for this step (any input where the step is padding)
        index = torch.tensor([length - 1 - i if i < length else 0 for length in lengths])
        x_step = x[index, torch.arange(B)][None]

        def step(s: Tensor) -> Tensor:
            return module_step(config, module, x_step, [forward_states[i], s])[:, H:]

        expected = batch_diagonal(jacobian(step, states[i]))
        computed = step(states[i]).detach()
        for b, length in enumerate(lengths):
            if i < length:
                assert_close(states[i + 1, b], computed[b], 1e-12)
                assert_close(J[i, b], expected[b], JACOBIAN_TOLERANCE)
            else:
                assert torch.equal(J[i, b], eye)


# ---------------------------------------------------------------------------------------------------------------
# g. state_dicts, files, checkpoints, wrappers; loading copies


def assert_same_model(actual: gl.Model, expected: gl.Model, config: Config) -> None:
    assert actual.weights.keys() == expected.weights.keys()
    for name, weight in expected.weights.items():
        assert torch.equal(actual.weights[name], weight), name
    assert bool(actual.batch_first) == expected.batch_first  # None: a state_dict that records no layout
    x = config.x()
    a, e = actual.trace(x), expected.trace(x)
    assert_close(a.output, e.output, 0.0)
    assert_close(a.final_state, e.final_state, 0.0)


def state_dict_options(config: Config) -> dict:
    options = {"batch_first": config.batch_first}
    if config.nonlinearity:
        options["nonlinearity"] = config.nonlinearity
    return options


@pytest.mark.parametrize("config", SOME_CONFIGS, ids=str)
def test_state_dict_loads_like_the_module(config: Config) -> None:
    module = config.module()
    from_dict = gl.load(module.state_dict(), **state_dict_options(config))
    assert_same_model(from_dict, gl.load(module), config)
    with torch.no_grad():
        expected_output, expected_final = module(config.x())
    trace = from_dict.trace(config.x())
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


@pytest.mark.parametrize("config", [SOME_CONFIGS[0], SOME_CONFIGS[3], SOME_CONFIGS[5]], ids=str)
def test_saved_state_dict_file_loads_and_matches(config: Config, tmp_path) -> None:
    module = config.module()
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    options = state_dict_options(config)
    assert_same_model(gl.load(path, **options), gl.load(module), config)
    assert_same_model(gl.load(str(path), **options), gl.load(module), config)


def flip_bytes(path: Path, record: str) -> str:
    """Flip one bit inside the data of the zip record whose name ends with ``record`` (a float32 tensor's), as a
    bad disk or a broken copy would, leaving the archive's structure intact; returns the record's full name."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(record))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length  # the record's first data byte
    data[start + 3] ^= 0x40  # the top exponent bit of the first float32 (little-endian): |w| < 0.5 grows past 1e30
    path.write_bytes(data)
    return info.filename


def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path: Path) -> None:
    """torch.load does not check the zip's CRC-32s: flipped bytes in a tensor's record load as changed weights.
    gatelens checks them first and names the damaged record."""
    torch.manual_seed(0)
    gru = nn.GRU(I, H, num_layers=2)
    path = tmp_path / "model.pt"
    torch.save(gru.state_dict(), path)
    intact = gl.load(path).weights
    assert all(torch.equal(intact[name], weight) for name, weight in gl.load(gru).weights.items())
    record = flip_bytes(path, "data/1")
    damaged = torch.load(path, weights_only=True)  # the premise: torch itself reads the damaged file silently
    changes = [float((damaged[name] - value).abs().max()) for name, value in gru.state_dict().items()]
    assert max(changes) > 1.0 and changes.count(0.0) == len(changes) - 1
    with pytest.raises(ValueError, match=rf"model\.pt .*record {re.escape(repr(record))}.* CRC-32") as error:
        gl.load(path)
    assert str(error.value).count(str(path)) == 1


def test_a_legacy_checkpoint_without_checksums_still_loads(tmp_path: Path) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False) writes no zip and so no CRC-32: such a file is read
    as it is (there is nothing to check it against)."""
    torch.manual_seed(0)
    gru = nn.GRU(I, H, bidirectional=True).double()
    path = tmp_path / "legacy.pt"
    torch.save(gru.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_same_model(gl.load(path), gl.load(gru), Config("GRU", bidirectional=True))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_cell_state_dict_loads_like_the_cell(kind: str) -> None:
    torch.manual_seed(0)
    cell = {"RNN": nn.RNNCell(I, H, nonlinearity="relu"), "GRU": nn.GRUCell(I, H), "LSTM": nn.LSTMCell(I, H)}[kind]
    cell = cell.double()
    options = {"nonlinearity": "relu"} if kind == "RNN" else {}
    assert_same_model(gl.load(cell.state_dict(), **options), gl.load(cell), Config("GRU"))


class Net(nn.Module):
    """A typical user model: a recurrent encoder and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(I, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(H, 1)


class TwoRNNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.GRU(I, H)
        self.dec = nn.LSTM(I, H, bidirectional=True)
        self.head = nn.Linear(H, 1)


def test_checkpoint_dict_finds_the_prefix(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net().double()
    config = Config("GRU", num_layers=2, batch_first=True)
    checkpoint = {"model": net.state_dict(), "epoch": 3}
    expected = gl.load(net.rnn)
    assert_same_model(gl.load(checkpoint, batch_first=True), expected, config)
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    assert_same_model(gl.load(path, batch_first=True), expected, config)
    with torch.no_grad():
        expected_output, expected_final = net.rnn(config.x())
    trace = gl.load(path, batch_first=True).trace(config.x())
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


def test_prefix_selects_one_of_two_recurrent_modules(tmp_path) -> None:
    torch.manual_seed(0)
    net = TwoRNNs().double()
    state = net.state_dict()
    assert_same_model(gl.load(state, prefix="enc"), gl.load(net.enc), Config("GRU"))
    assert_same_model(gl.load(state, prefix="dec."), gl.load(net.dec), Config("LSTM", bidirectional=True))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "epoch": 3}, path)
    assert_same_model(gl.load(path, prefix="model.dec"), gl.load(net.dec), Config("LSTM", bidirectional=True))
    assert_same_model(gl.load(path, prefix="model.enc"), gl.load(net.enc), Config("GRU"))


def test_wrapper_module_with_one_recurrent_submodule() -> None:
    torch.manual_seed(0)
    net = Net().double()
    config = Config("GRU", num_layers=2, batch_first=True)
    model = gl.load(net)
    assert model.batch_first
    assert_same_model(model, gl.load(net.rnn), config)
    with torch.no_grad():
        expected_output, expected_final = net.rnn(config.x())
    trace = model.trace(config.x())
    assert_close(trace.output, expected_output, 1e-12)
    assert_close(trace.final_state, expected_final, 1e-12)


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_loading_copies_the_weights(source: str) -> None:
    config = Config("LSTM", num_layers=2, bidirectional=True, proj_size=2)
    module = config.module()
    x = config.x()
    model = gl.load(module) if source == "module" else gl.load(module.state_dict())
    before = model.trace(x)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.5)
    after = model.trace(x)
    assert_close(after.output, before.output, 0.0)
    assert_close(after.final_state, before.final_state, 0.0)
    # and the module did change, so the comparison above can fail
    with torch.no_grad():
        changed, _ = module(x)
    assert relative_error(changed, before.output) > 1e-3


def test_training_mode_dropout_is_announced_and_not_applied() -> None:
    torch.manual_seed(0)
    module = nn.GRU(3, 4, num_layers=2, dropout=0.5).double()
    with pytest.warns(UserWarning, match=r"training mode with dropout=0\.5.*equals the module's in eval mode"):
        model = gl.load(module)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = module.eval()(x)[0]
    assert_close(model.trace(x).output, expected, 1e-12)


def test_cells_report_their_sizes() -> None:
    model = gl.load(nn.LSTM(3, 6, proj_size=2))
    cell = model.cells()["l0"]
    assert (cell.input_size, cell.hidden_size, cell.output_size, cell.state_size) == (3, 6, 2, 8)
    gru = gl.load(nn.GRU(3, 5)).cells()["l0"]
    assert (gru.input_size, gru.hidden_size, gru.output_size, gru.state_size) == (3, 5, 5, 5)


def test_a_state_dict_without_a_layout_warns_when_the_input_looks_batch_first() -> None:
    """A state_dict records no layout: (T, B, I) is assumed, and an input whose first axis is shorter than its
    second (what a (B, T, I) batch of long sequences looks like) gets a LayoutWarning naming batch_first=."""
    gru = nn.GRU(I, H).double()
    model = gl.load(gru.state_dict())
    assert model.batch_first is None
    with pytest.warns(gl.LayoutWarning, match=r"read as \(T, B, I\) = 4 steps of 30 sequences.*batch_first=True"):
        model.trace(torch.randn(4, 30, I, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.trace(torch.randn(30, 4, I, dtype=torch.float64))  # looks time-major: no warning
        gl.load(gru).trace(torch.randn(4, 30, I, dtype=torch.float64))  # the module records its layout
        gl.load(gru.state_dict(), batch_first=False).trace(torch.randn(4, 30, I, dtype=torch.float64))
    batch_first = gl.load(gru.state_dict(), batch_first=True)
    assert batch_first.trace(torch.randn(30, 4, I, dtype=torch.float64)).output.shape[:2] == (30, 4)
