"""Trace-level behaviour: padding, step selection, stacks, devices, and BPTT assembled from the VJPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gatelens as gl
from tests.cell_configs import relative_error

F64 = torch.float64
T, B, I, H = 6, 3, 3, 4
LENGTHS = [6, 2, 4]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _module(kind: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    module = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind](I, H, **options)
    return module.double()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, B, I, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_padding_makes_steps_the_identity(kind: str) -> None:
    trace = gl.load(_module(kind)).trace(_x(), lengths=LENGTHS)
    rec = trace.recurrence()
    paths = rec.jacobian_paths()
    assert set(paths) == {*rec.cell.path_names, "padding"}
    jacobians = rec.jacobians()
    assert relative_error(sum(paths.values()), jacobians) <= 1e-14
    eye = torch.eye(rec.cell.state_size, dtype=F64)
    for b, length in enumerate(LENGTHS):
        assert torch.equal(jacobians[length:, b], eye.expand(T - length, -1, -1))
        assert torch.equal(rec.states[length:, b], rec.states[length, b].expand(T + 1 - length, -1))
        assert not torch.allclose(jacobians[length - 1, b], eye)
    v = torch.randn(T, B, rec.cell.state_size, dtype=F64)
    grads = rec.param_vjp(v)
    padded_only = torch.zeros_like(v)
    padded_only[5, 1] = v[5, 1]  # step 6 of sequence 1 (length 2) is padding
    assert all(g.abs().max() == 0 for g in rec.param_vjp(padded_only).values())
    assert all(g.shape[0] == T for g in grads.values())
    assert torch.equal(rec.state_vjp(padded_only)[5, 1], v[5, 1])


def test_step_selection_matches_slicing() -> None:
    trace = gl.load(_module("GRU")).trace(_x())
    full = trace.jacobians()
    assert torch.equal(trace.jacobians(steps=2), full[2])
    assert torch.equal(trace.jacobians(steps=slice(1, 4)), full[1:4])
    assert torch.equal(trace.jacobians(steps=[0, 5]), full[[0, 5]])
    assert torch.equal(trace.jacobian_paths(steps=-1)["carry"], trace.jacobian_paths()["carry"][-1])
    with pytest.raises(ValueError, match="out of range"):
        trace.jacobians(steps=T)


def test_reverse_direction_reads_each_sequence_backwards() -> None:
    trace = gl.load(_module("GRU", bidirectional=True)).trace(_x(), lengths=LENGTHS)
    rec = trace.recurrence(0, "reverse")
    for b, length in enumerate(LENGTHS):
        assert rec.input_index[:length, b].tolist() == list(range(length - 1, -1, -1))
    assert trace.recurrence(0).input_index[:, 0].tolist() == list(range(T))


def _bptt_gradients(rec: gl.Recurrence, final_adjoint: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂(adjoint · h_T)/∂θ = Σ_k a_k · ∂⁺h_k/∂θ with a_T = adjoint and a_{k−1} = a_k · J_k (eq. 8, one loss step)."""
    adjoint, total = final_adjoint, {}
    for step in reversed(range(rec.steps)):
        for name, grad in rec.param_vjp(adjoint, steps=step).items():
            total[name] = total.get(name, 0) + grad
        adjoint = rec.state_vjp(adjoint, steps=step)
    total["h0"] = adjoint
    return total


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("padded", [False, True])
def test_bptt_from_vjps_equals_autograd_on_the_module(kind: str, padded: bool) -> None:
    """Gradients of Σ_b w·h_n with respect to h0 and every weight, from gatelens' VJPs vs the module's autograd."""
    module = _module(kind, num_layers=2)
    x = _x(1)
    h0 = torch.randn(2, B, H, dtype=F64, requires_grad=True)
    initial = (h0, torch.zeros_like(h0)) if kind == "LSTM" else h0
    weight = torch.randn(2, B, H, dtype=F64)
    inputs = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if padded else x
    final = module(inputs, initial)[1]
    h_n = final[0] if kind == "LSTM" else final
    (h_n * weight).sum().backward()

    model = gl.load(module)
    trace = model.trace(
        x,
        (h0.detach(), torch.zeros_like(h0.detach())) if kind == "LSTM" else h0.detach(),
        lengths=LENGTHS if padded else None,
    )
    stack = trace.recurrence()  # two layers, one recurrence
    per_layer = [model.cells()[f"l{layer}"] for layer in range(2)]
    adjoint = torch.cat([cell.output_vjp(weight[layer]) for layer, cell in enumerate(per_layer)], dim=-1)
    got = _bptt_gradients(stack, adjoint)

    offsets = (0, per_layer[0].state_size)  # each layer's h sits first in its part of the stack's state
    h0_grad = torch.stack([got["h0"][:, offset : offset + H] for offset in offsets])
    assert relative_error(h0_grad, h0.grad) <= 1e-10
    gate_count = {"GRU": 3, "LSTM": 4, "RNN": 1}[kind]
    for layer in range(2):
        packed = getattr(module, f"weight_hh_l{layer}").grad
        blocks = (
            ["W_hr", "W_hz", "W_hn"]
            if kind == "GRU"
            else ["W_hi", "W_hf", "W_hg", "W_ho"]
            if kind == "LSTM"
            else ["W_hh"]
        )
        ours = torch.cat([got[f"l{layer}.{name}"] for name in blocks])
        assert ours.shape == packed.shape == (gate_count * H, H)
        assert relative_error(ours, packed) <= 1e-10


def test_stack_states_and_paths_compose_the_layers() -> None:
    trace = gl.load(_module("LSTM", num_layers=2, proj_size=2)).trace(_x())
    stack = trace.recurrence()
    assert torch.equal(stack.states, torch.cat([trace.states["l0"], trace.states["l1"]], dim=-1))
    paths = trace.jacobian_paths()
    assert set(paths) == {
        f"l{layer}.{p}" for layer in range(2) for p in ("carry", "forget", "input", "candidate", "output")
    }
    jacobian = trace.jacobians()
    assert relative_error(sum(paths.values()), jacobian) <= 1e-14
    size = trace.states["l0"].shape[-1]
    assert relative_error(jacobian[..., :size, :size], trace.jacobians(layer=0)) <= 1e-14
    assert jacobian[..., :size, size:].abs().max() == 0  # layer 0 does not read layer 1


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_the_inputs(device: str) -> None:
    module = _module("GRU", num_layers=2, bidirectional=True)
    x = _x()
    expected = module(x)[0]
    model = gl.load(module)
    trace = model.trace(x.to(device), lengths=torch.tensor(LENGTHS, device=device))
    assert trace.output.device.type == device
    assert trace.jacobians(layer=1, direction="reverse").device.type == device
    reference = model.trace(x, lengths=LENGTHS)
    assert (
        relative_error(
            trace.jacobians(layer=1, direction="reverse").cpu(), reference.jacobians(layer=1, direction="reverse")
        )
        <= 1e-12
    )
    unpadded = model.trace(x.to(device))
    assert relative_error(unpadded.output.cpu(), expected) <= 1e-12


def test_layers_of_different_sizes_report_final_states_by_name() -> None:
    """Equal state sizes but different splits (LSTM [h, c] vs GRU h) must not be stacked into h_n, c_n."""
    lstm, gru = gl.LSTM.random(2, 2, dtype=F64), gl.GRU.random(2, 4, dtype=F64)
    trace = gl.Model([lstm, gru]).trace(torch.randn(5, 1, 2, dtype=F64))
    assert set(trace.final_state) == {"l0", "l1"}
    assert torch.equal(trace.final_state["l1"], trace.states["l1"][-1])
    unbatched = gl.Model([lstm, gru]).trace(
        torch.randn(5, 2, dtype=F64), {"l0": torch.ones(4, dtype=F64), "l1": torch.ones(4, dtype=F64)}
    )
    assert torch.equal(unbatched.states["l1"][0, 0], torch.ones(4, dtype=F64))


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_follows_the_inputs_device(device: str) -> None:
    module = _module("GRU")
    h0 = torch.randn(1, B, H, dtype=F64)
    trace = gl.load(module).trace(_x().to(device), h0)
    assert relative_error(trace.output.cpu(), module(_x(), h0)[0].detach()) <= 1e-12


@pytest.mark.parametrize("padded", [False, True])
def test_a_reverse_only_model_is_the_reverse_half_of_a_bidirectional_module(padded: bool) -> None:
    module = _module("GRU", bidirectional=True)
    lengths = LENGTHS if padded else None
    bidirectional = gl.load(module)
    reverse_cell = bidirectional.layers[0][1]
    model = gl.Model(reverse_cell, reverse=True)
    assert model.names() == ["l0_reverse"] and list(model.weights)[0].startswith("l0_reverse.")
    trace = model.trace(_x(), lengths=lengths)
    expected = bidirectional.trace(_x(), lengths=lengths)
    assert relative_error(trace.output, expected.output[..., H:]) <= 1e-14
    rec = trace.recurrence()
    assert torch.equal(rec.input_index, expected.recurrence(0, "reverse").input_index)
    assert torch.equal(trace.jacobians(), expected.jacobians(layer=0, direction="reverse"))
    with pytest.raises(ValueError, match="reads sequences reverse only"):
        trace.recurrence(direction="forward")
    with pytest.raises(ValueError, match="reverse=True is for a unidirectional model"):
        gl.Model([bidirectional.layers[0]], reverse=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_forward_pass_that_overflows_is_refused_with_its_step_and_sequence(reverse: bool) -> None:
    """Regression: a ReLU Elman with weights × 1e3 overflowed to inf/NaN and was analysed as "vanished" (J = 0,
    horizon 1, λ = −inf). Sequence 1 overflows; sequence 0 (input 0, no bias) stays at 0."""
    cell = gl.Elman.random(I, H, nonlinearity="relu", bias=False, seed=0, dtype=F64)
    cell = gl.Elman({k: w * 1e3 for k, w in cell.weights.items()}, nonlinearity="relu")
    x = torch.zeros(300, 2, I, dtype=F64)
    x[:, 1] = torch.rand(300, I, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = gl.Model(cell, reverse=reverse)
    h, first = torch.zeros(H, dtype=F64), None  # the oracle: sequence 1 in the model's reading order
    for i, x_t in enumerate(x[:, 1].flip(0) if reverse else x[:, 1]):
        h = torch.relu(cell.weights["W_ih"] @ x_t + cell.weights["W_hh"] @ h)
        if first is None and not bool(torch.isfinite(h).all()):
            first = i
    assert first is not None
    message = rf"overflowed: the state of l0{'_reverse' if reverse else ''} is not finite .* at step index {first} "
    message += rf"\(0-based\)(, which reads the input at time index {299 - first},)? of sequence 1"
    with pytest.raises(ValueError, match=message):
        model.trace(x)
    with pytest.raises(ValueError, match="overflowed"):
        gl.lyapunov(model, x)
    (states,) = model.trace(x[:5]).states.values()  # the first steps are fine
    assert bool(torch.isfinite(states).all())


def test_unbatched_final_states_of_layers_of_different_sizes_are_vectors() -> None:
    """Regression: with layers of different sizes, an unbatched trace's final_state entries were (1, S)."""
    layers = [gl.GRU.random(I, 3, seed=0, dtype=F64), gl.LSTM.random(3, 2, seed=1, dtype=F64)]
    trace = gl.Model(layers).trace(torch.randn(T, I, dtype=F64))
    assert {name: tuple(s.shape) for name, s in trace.final_state.items()} == {"l0": (3,), "l1": (4,)}
    batched = gl.Model(layers).trace(torch.randn(T, 1, I, dtype=F64))
    assert {name: tuple(s.shape) for name, s in batched.final_state.items()} == {"l0": (1, 3), "l1": (1, 4)}
