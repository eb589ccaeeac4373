"""Credit maps against independent autograd oracles.

* ``total`` against autograd on the original torch module (packed sequences for padding).
* ``by_source``, ``norms`` and ``by_lag`` against an unrolled recurrence written here from docs/notation.md, in which
  every step k has its own copy θ_k of the parameters: then ∂(g_t·y_t)/∂θ_k is exactly the contribution C(t, k),
  one backward pass per loss step t.
* The seed's blocking case (z ≈ r ≈ 0 at one step) and bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gatelens as gl
from tests.cell_configs import chaotic_elman, relative_error

F64 = torch.float64
T, B, I = 6, 3, 3
LENGTHS = [6, 2, 4]
TOL = 1e-10


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# a. total = ∂L/∂θ against autograd on the torch module

GATES = {"GRU": "rzn", "LSTM": "ifgo"}


def _torch_blocks(module: nn.RNNBase) -> dict[str, tuple[str, int, int]]:
    """gatelens block name ↦ (torch parameter name, first row, end row) of its chunk of the packed parameter."""
    kind = "RNN" if module.mode.startswith("RNN") else module.mode
    size = module.hidden_size
    blocks = {}
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 1 + module.bidirectional]:
            for param in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                torch_name = f"{param}_l{layer}{suffix}"
                stem = f"l{layer}{suffix}." + ("W_" if param.startswith("weight") else "b_") + param[-2]
                for index, gate in enumerate(GATES.get(kind, "h")):  # RNN: W_ih, W_hh, b_ih, b_hh
                    blocks[stem + gate] = (torch_name, index * size, (index + 1) * size)
            if kind == "LSTM" and module.proj_size:
                blocks[f"l{layer}{suffix}.W_proj"] = (f"weight_hr_l{layer}{suffix}", 0, module.proj_size)
    return blocks


MODULES = {
    "gru": lambda: nn.GRU(I, 4),
    "gru-2layer": lambda: nn.GRU(I, 4, num_layers=2),
    "gru-bi-2layer": lambda: nn.GRU(I, 4, num_layers=2, bidirectional=True),
    "gru-batch-first": lambda: nn.GRU(I, 4, batch_first=True),
    "lstm": lambda: nn.LSTM(I, 4),
    "lstm-proj-2layer": lambda: nn.LSTM(I, 4, num_layers=2, proj_size=2),
    "lstm-bi-proj-batch-first": lambda: nn.LSTM(I, 4, bidirectional=True, proj_size=3, batch_first=True),
    "rnn-tanh": lambda: nn.RNN(I, 4),
    "rnn-relu-2layer": lambda: nn.RNN(I, 4, num_layers=2, nonlinearity="relu"),
    "rnn-tanh-bi-2layer-batch-first": lambda: nn.RNN(I, 4, num_layers=2, bidirectional=True, batch_first=True),
}


def _module(name: str) -> nn.RNNBase:
    torch.manual_seed(0)
    module = MODULES[name]().double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)  # gates away from ½ so that every path carries weight
    return module


def _torch_output(module: nn.RNNBase, x: Tensor, lengths: list[int] | None) -> Tensor:
    if lengths is None:
        return module(x)[0]
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
    return pad_packed_sequence(module(packed)[0], batch_first=module.batch_first, total_length=T)[0]


def _time_major(module: nn.RNNBase, values: Tensor) -> Tensor:
    return values.transpose(0, 1) if module.batch_first else values


def _final_output(module: nn.RNNBase, output: Tensor, last: Tensor) -> Tensor:
    """h_n's output part as the module returns it (B, D·H): the forward half at each sequence's last step, the reverse
    half at time 0 (where the reverse direction ends)."""
    time_major = _time_major(module, output)
    forward = time_major[last, torch.arange(B)]
    if not module.bidirectional:
        return forward
    width = time_major.shape[-1] // 2
    return torch.cat([forward[:, :width], time_major[0, :, width:]], dim=-1)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("loss", ["last", "all", "out_grads", "last-cross-entropy"])
@pytest.mark.parametrize("name", list(MODULES))
def test_total_equals_autograd_on_the_module(name: str, loss: str, padded: bool) -> None:
    module = _module(name)
    lengths = LENGTHS if padded else None
    x = _randn(T, B, I, seed=1)
    if module.batch_first:
        x = x.transpose(0, 1).contiguous()
    output = _torch_output(module, x, lengths)
    features = output.shape[-1]
    torch.manual_seed(1)
    head = nn.Linear(features, 2).double()
    last = torch.tensor(lengths if padded else [T] * B) - 1

    if loss == "out_grads":
        out_grads = _randn(*output.shape, seed=2)  # nonzero past the ends too: those must be dropped
        value = (output * out_grads).sum()
        cm = gl.credit(gl.load(module).trace(x, lengths=lengths), out_grads)
    elif loss == "all":
        targets = _randn(*output.shape[:-1], 2, seed=3)
        value = nn.functional.mse_loss(head(output), targets)
        cm = gl.credit(gl.load(module).trace(x, lengths=lengths), loss="all", head=head, targets=targets)
    elif loss == "last":
        targets = _randn(B, 2, seed=3)
        value = nn.functional.mse_loss(head(_final_output(module, output, last)), targets)
        cm = gl.credit(gl.load(module).trace(x, lengths=lengths), loss="last", head=head, targets=targets)
    else:
        targets = torch.tensor([1, 0, 1])
        value = nn.functional.cross_entropy(head(_final_output(module, output, last)), targets)
        cm = gl.credit(
            gl.load(module).trace(x, lengths=lengths),
            loss="last",
            head=head,
            targets=targets,
            loss_fn=nn.functional.cross_entropy,
        )
    value.backward()

    blocks = _torch_blocks(module)
    assert set(cm.total) == set(blocks)
    for block, (param, start, stop) in blocks.items():
        expected = dict(module.named_parameters())[param].grad[start:stop]
        got = cm.total[block]
        assert got.shape == expected.shape, block
        assert got.dtype == F64
        assert relative_error(got, expected) <= TOL, block
    json.dumps(cm.to_dict())  # JSON-able


# ---------------------------------------------------------------------------------------------------------------
# b. The oracle: the recurrence unrolled with one copy of the parameters per step, written from the notation.


def _sigmoid(a: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-a))


def _lin(w: dict[str, Tensor], weight: str, bias: str, v: Tensor) -> Tensor:
    """v Wᵀ + b for a batch of row vectors (b omitted when the cell has no bias)."""
    return v @ w[weight].T + (w[bias] if bias in w else 0.0)


def gru_step(w: dict[str, Tensor], x: Tensor, h: Tensor, *, reset: str, update: str) -> Tensor:
    r = _sigmoid(_lin(w, "W_ir", "b_ir", x) + _lin(w, "W_hr", "b_hr", h))
    z = _sigmoid(_lin(w, "W_iz", "b_iz", x) + _lin(w, "W_hz", "b_hz", h))
    if reset == "after":
        n = torch.tanh(_lin(w, "W_in", "b_in", x) + r * _lin(w, "W_hn", "b_hn", h))
    else:
        n = torch.tanh(_lin(w, "W_in", "b_in", x) + _lin(w, "W_hn", "b_hn", r * h))
    if update == "keep":
        return z * h + (1 - z) * n
    return (1 - z) * h + z * n


def elman_step(w: dict[str, Tensor], x: Tensor, h: Tensor, *, nonlinearity: str) -> Tensor:
    a = _lin(w, "W_ih", "b_ih", x) + _lin(w, "W_hh", "b_hh", h)
    return torch.tanh(a) if nonlinearity == "tanh" else torch.clamp(a, min=0)


def lstm_step(w: dict[str, Tensor], x: Tensor, s: Tensor) -> Tensor:
    """s = [h, c] (h of the projected width when W_proj is present)."""
    width = w["W_hi"].shape[1]
    h, c = s[:, :width], s[:, width:]

    def pre(g: str) -> Tensor:
        return _lin(w, f"W_i{g}", f"b_i{g}", x) + _lin(w, f"W_h{g}", f"b_h{g}", h)

    i, f, g, o = _sigmoid(pre("i")), _sigmoid(pre("f")), torch.tanh(pre("g")), _sigmoid(pre("o"))
    c_new = f * c + i * g
    m = o * torch.tanh(c_new)
    h_new = m @ w["W_proj"].T if "W_proj" in w else m
    return torch.cat([h_new, c_new], dim=-1)


@dataclass(frozen=True)
class Layer:
    """One oracle layer: its step, its weights (plain tensors), state and output sizes."""

    step: Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]
    weights: dict[str, Tensor]
    state_size: int
    output_size: int


def _oracle_layer(cell: gl.Cell) -> Layer:
    weights = {k: v.detach().clone() for k, v in cell.weights.items()}
    if isinstance(cell, gl.GRU):
        assert cell.gate == "sigmoid" and cell.candidate == "tanh"
        hidden = weights["W_hz"].shape[0]
        return Layer(lambda w, x, h: gru_step(w, x, h, reset=cell.reset, update=cell.update), weights, hidden, hidden)
    if isinstance(cell, gl.Elman):
        hidden = weights["W_hh"].shape[0]
        return Layer(lambda w, x, h: elman_step(w, x, h, nonlinearity=cell.nonlinearity), weights, hidden, hidden)
    assert isinstance(cell, gl.LSTM) and cell.gate == "sigmoid" and cell.candidate == "tanh"
    hidden, out = weights["W_hi"].shape[0], weights["W_hi"].shape[1]
    return Layer(lstm_step, weights, out + hidden, out)


def oracle_contributions(
    layers: list[Layer], x: Tensor, g: Tensor, mask: Tensor | None = None, prefix: str = "l"
) -> dict[str, Tensor]:
    """C[t, k] = ∂(g_t · y_t)/∂θ_k for a stack of layers, per block: (T, T, *shape).

    x: (T, B, I) in processing order; g: (T, B, F) the gradient at the top layer's output y_t; mask: (T, B) False
    past a sequence's end, where the state is carried unchanged. Blocks are named f"{prefix}{layer}.{block}".
    """
    steps, batch = x.shape[:2]
    names = [(index, block) for index, layer in enumerate(layers) for block in layer.weights]
    copies = [
        {(index, block): layers[index].weights[block].clone().requires_grad_(True) for index, block in names}
        for _ in range(steps)
    ]
    states = [torch.zeros(batch, layer.state_size, dtype=F64) for layer in layers]
    outputs = []
    for k in range(steps):
        layer_input = x[k]
        for index, layer in enumerate(layers):
            w = {block: copies[k][(i, block)] for i, block in names if i == index}
            new = layer.step(w, layer_input, states[index])
            if mask is not None:
                new = torch.where(mask[k, :, None], new, states[index])
            states[index] = new
            layer_input = new[:, : layer.output_size]
        outputs.append(layer_input)
    result = {
        f"{prefix}{index}.{block}": torch.zeros(steps, steps, *layers[index].weights[block].shape, dtype=F64)
        for index, block in names
    }
    for t in range(steps):
        loss_t = (outputs[t] * g[t]).sum()
        leaves = [copies[k][key] for k in range(t + 1) for key in names]
        grads = torch.autograd.grad(loss_t, leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
        for position, grad in enumerate(grads):
            k, (index, block) = position // len(names), names[position % len(names)]
            result[f"{prefix}{index}.{block}"][t, k] = grad
    return result


def oracle_outputs(layers: list[Layer], x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The top layer's outputs (T, B, F) of the oracle (zero past each sequence's end)."""
    batch = x.shape[1]
    states = [torch.zeros(batch, layer.state_size, dtype=F64) for layer in layers]
    outputs = []
    for k in range(x.shape[0]):
        layer_input = x[k]
        for index, layer in enumerate(layers):
            new = layer.step(layer.weights, layer_input, states[index])
            if mask is not None:
                new = torch.where(mask[k, :, None], new, states[index])
            states[index] = new
            layer_input = new[:, : layer.output_size]
        outputs.append(layer_input if mask is None else torch.where(mask[k, :, None], layer_input, 0.0))
    return torch.stack(outputs)


def lag_sums(contributions: Tensor) -> Tensor:
    """‖Σ_{t−k=τ} C(t, k)‖_F for τ = 0..T−1, from (T, T, *shape)."""
    steps = contributions.shape[0]
    return torch.stack(
        [
            sum(contributions[k + lag, k] for k in range(steps - lag)).flatten().norm()  # type: ignore[union-attr]
            for lag in range(steps)
        ]
    )


def pair_norms(contributions: Tensor) -> Tensor:
    return contributions.flatten(2).norm(dim=2)


def assert_matches_oracle(cm: gl.CreditMap, expected: dict[str, Tensor]) -> None:
    for name, c in expected.items():
        assert relative_error(cm.by_source[name], c.sum(0)) <= TOL, name
        assert relative_error(cm.norms[name], pair_norms(c)) <= TOL, name
        assert relative_error(cm.by_lag[name], lag_sums(c)) <= TOL, name
        assert relative_error(cm.total[name], c.sum((0, 1))) <= TOL, name


def _scaled(cell: gl.Cell, factor: float) -> gl.Cell:
    weights = {k: w * factor for k, w in cell.weights.items()}
    options = {k: getattr(cell, k) for k in ("reset", "update", "nonlinearity") if hasattr(cell, k)}
    return type(cell)(weights, **options)


ORACLE_CELLS = {
    **{
        f"gru-{reset}-{update}": (
            lambda reset=reset, update=update: [
                _scaled(gl.GRU.random(I, 4, reset=reset, update=update, seed=1, dtype=F64), 2.5)
            ]
        )
        for reset in ("after", "before")
        for update in ("keep", "replace")
    },
    "gru-nobias": lambda: [_scaled(gl.GRU.random(I, 4, reset="before", bias=False, seed=1, dtype=F64), 2.5)],
    "elman-tanh": lambda: [_scaled(gl.Elman.random(I, 4, seed=2, dtype=F64), 2.5)],
    "elman-relu": lambda: [_scaled(gl.Elman.random(I, 4, nonlinearity="relu", seed=2, dtype=F64), 2.5)],
    "lstm": lambda: [_scaled(gl.LSTM.random(I, 4, seed=3, dtype=F64), 2.5)],
    "lstm-proj": lambda: [_scaled(gl.LSTM.random(I, 4, projection=2, seed=3, dtype=F64), 2.5)],
    "stack-gru-gru": lambda: [
        _scaled(gl.GRU.random(I, 4, seed=5, dtype=F64), 2.0),
        _scaled(gl.GRU.random(4, 3, reset="before", update="replace", seed=6, dtype=F64), 2.0),
    ],
    "stack-gru-lstm-proj": lambda: [
        _scaled(gl.GRU.random(I, 4, seed=5, dtype=F64), 2.0),
        _scaled(gl.LSTM.random(4, 3, projection=2, seed=10, dtype=F64), 2.0),
    ],
    "stack-lstm-elman-gru": lambda: [
        _scaled(gl.LSTM.random(I, 4, projection=3, seed=7, dtype=F64), 2.0),
        _scaled(gl.Elman.random(3, 4, seed=8, dtype=F64), 2.0),
        _scaled(gl.GRU.random(4, 2, seed=9, dtype=F64), 2.0),
    ],
}


def _mask(lengths: list[int] | None) -> Tensor | None:
    if lengths is None:
        return None
    return torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cells", list(ORACLE_CELLS))
def test_contributions_match_the_unrolled_oracle(cells: str, padded: bool) -> None:
    layers = ORACLE_CELLS[cells]()
    lengths = LENGTHS if padded else None
    x = _randn(T, B, I, seed=4)
    trace = gl.Model(layers).trace(x, lengths=lengths)
    out_grads = _randn(*trace.output.shape, seed=5)  # also past the ends: dropped there
    cm = gl.credit(trace, out_grads)
    mask = _mask(lengths)
    g = out_grads if mask is None else torch.where(mask[..., None], out_grads, 0.0)
    expected = oracle_contributions([_oracle_layer(c) for c in layers], x, g, mask)
    assert set(cm.by_source) == set(cm.norms) == set(cm.by_lag) == set(expected)
    for name in expected:
        assert cm.by_source[name].shape == (T, *layers[int(name[1])].weights[name.split(".")[1]].shape)
        assert cm.norms[name].shape == (T, T)
        assert cm.by_lag[name].shape == (T,)
        assert torch.equal(cm.norms[name].triu(1), torch.zeros(T, T, dtype=F64)), "‖C(t, k)‖ must be 0 for k > t"
    assert_matches_oracle(cm, expected)


@pytest.mark.parametrize("loss", ["last", "all"])
@pytest.mark.parametrize("cells", ["gru-before-replace", "lstm-proj", "stack-gru-gru"])
def test_contributions_of_a_loss_match_the_oracle(cells: str, loss: str) -> None:
    """With loss= the gradient at the outputs comes from autograd over the oracle's own outputs."""
    layers = ORACLE_CELLS[cells]()
    oracle = [_oracle_layer(c) for c in layers]
    mask = _mask(LENGTHS)
    x = _randn(T, B, I, seed=6)
    outputs = oracle_outputs(oracle, x, mask).requires_grad_(True)
    torch.manual_seed(2)
    head = nn.Linear(outputs.shape[-1], 1).double()
    last = torch.tensor(LENGTHS) - 1
    if loss == "all":
        targets = _randn(T, B, 1, seed=7)
        predictions = head(outputs)
    else:
        targets = _randn(B, 1, seed=7)
        predictions = head(outputs[last, torch.arange(B)])
    (g,) = torch.autograd.grad(nn.functional.mse_loss(predictions, targets), outputs)
    g = torch.where(mask[..., None], g, 0.0)
    expected = oracle_contributions(oracle, x, g, mask)
    trace = gl.Model(layers).trace(x, lengths=LENGTHS)
    assert relative_error(trace.output, outputs.detach()) <= 1e-12
    cm = gl.credit(trace, loss=loss, head=head, targets=targets)
    assert_matches_oracle(cm, expected)
    if loss == "last":  # one loss step per sequence: only the rows t = L_b − 1 can be nonzero
        rows = pair_norms(expected[next(iter(expected))]).sum(1)
        assert set(torch.nonzero(rows).flatten().tolist()) <= set((last).tolist())


def _reverse_reader(lengths: list[int]) -> Callable[[Tensor], Tensor]:
    """Values (T, B, F) in the inputs' time order ↦ a reverse direction's processing order: step i reads L_b − 1 − i
    (steps past a sequence's end keep their index)."""
    steps = torch.arange(T)[:, None]
    order = torch.where(_mask(lengths), torch.tensor(lengths)[None, :] - 1 - steps, steps)
    return lambda values: values.gather(0, order[..., None].expand(-1, -1, values.shape[-1]))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_bidirectional_directions_are_their_own_recurrences(padded: bool) -> None:
    """One bidirectional layer: the reverse direction is indexed in its own processing order."""
    forward = _scaled(gl.GRU.random(I, 3, seed=10, dtype=F64), 2.5)
    reverse = _scaled(gl.GRU.random(I, 3, reset="before", seed=11, dtype=F64), 2.5)
    lengths = LENGTHS if padded else [T] * B
    x = _randn(T, B, I, seed=8)
    trace = gl.Model([(forward, reverse)]).trace(x, lengths=lengths if padded else None)
    out_grads = _randn(T, B, 6, seed=9)
    cm = gl.credit(trace, out_grads)
    mask = _mask(lengths)
    g = torch.where(mask[..., None], out_grads, 0.0)
    read = _reverse_reader(lengths)
    expected = oracle_contributions([_oracle_layer(forward)], x, g[..., :3], mask)
    expected |= {
        name.replace("l0.", "l0_reverse."): c
        for name, c in oracle_contributions([_oracle_layer(reverse)], read(x), read(g[..., 3:]), mask).items()
    }
    assert set(cm.norms) == set(expected)
    assert_matches_oracle(cm, expected)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cells", ["stack-gru-gru", "stack-lstm-elman-gru"])
def test_a_reverse_stack_keeps_the_models_block_names(cells: str, padded: bool) -> None:
    """Regression: with reverse=True and 2+ layers, total/by_source were keyed l0.* and norms/by_lag (keyed
    l0_reverse.*) came out all zeros. Every result must carry the model's names and match the oracle."""
    layers = ORACLE_CELLS[cells]()
    lengths = LENGTHS if padded else [T] * B
    x = _randn(T, B, I, seed=12)
    trace = gl.Model(layers, reverse=True).trace(x, lengths=lengths if padded else None)
    out_grads = _randn(*trace.output.shape, seed=13)
    cm = gl.credit(trace, out_grads)
    mask = _mask(lengths)
    g = torch.where(mask[..., None], out_grads, 0.0)
    read = _reverse_reader(lengths)
    expected = {
        re.sub(r"^l(\d+)\.", r"l\1_reverse.", name): c
        for name, c in oracle_contributions([_oracle_layer(c) for c in layers], read(x), read(g), mask).items()
    }
    names = set(trace.model.weights)
    assert set(expected) == names
    assert set(cm.total) == set(cm.by_source) == set(cm.norms) == set(cm.by_lag) == names
    assert set(gl.local_gradients(trace).norms) == names
    assert_matches_oracle(cm, expected)


def test_a_block_without_a_result_raises_instead_of_reading_as_zero() -> None:
    layers = ORACLE_CELLS["stack-gru-gru"]()
    trace = gl.Model(layers).trace(_randn(T, B, I, seed=4))
    cm = gl.credit(trace, _randn(*trace.output.shape, seed=5))
    with pytest.raises(RuntimeError, match=r"none for \['l1.W_hz'\]"):
        cm._every_block({k: v for k, v in cm.by_lag.items() if k != "l1.W_hz"}, (T,))
    with pytest.raises(RuntimeError, match="does not have"):
        cm._every_block(cm.by_lag | {"l0.W_hz_typo": cm.by_lag["l0.W_hz"]}, (T,))


def test_path_shares_sum_to_one_and_to_dict_is_json() -> None:
    layers = ORACLE_CELLS["stack-gru-gru"]()
    trace = gl.Model(layers).trace(_randn(T, B, I, seed=4), lengths=LENGTHS)
    cm = gl.credit(trace, _randn(*trace.output.shape, seed=5))
    shares = cm.path_shares
    paths = {f"l{i}.{p}" for i in range(2) for p in ("carry", "update", "candidate", "reset")}
    assert paths <= set(shares) <= paths | {"padding"}
    total = torch.stack(list(shares.values())).sum(0)
    assert total.shape == (T,)
    assert torch.all((total - 1).abs() <= 1e-12)  # an adjoint reaches every step (the longest sequence has T)
    stacked = torch.stack(list(shares.values()))
    assert torch.all(stacked >= 0) and torch.all(stacked <= 1 + 1e-12)
    _ = cm.norms, cm.by_lag, cm.by_source
    data = json.loads(json.dumps(cm.to_dict()))
    assert set(data) == {"total", "by_source", "by_lag", "norms", "path_shares"}
    assert len(data["norms"]["l1.W_hz"]) == T


# ---------------------------------------------------------------------------------------------------------------
# c. The seed's blocking case: z ≈ r ≈ 0 (keep) on every unit at one step m cuts credit to the steps before m.

M = 3  # 0-based index of the blocking step (step M+1 reads the huge input)
TB = 8  # steps


def _blocking_gru(reset: str, update: str) -> gl.GRU:
    """Feature 0 is zero except at the blocking step; it drives a_z and a_r to ∓50 there and touches nothing else."""
    base = _scaled(gl.GRU.random(I + 1, 4, reset=reset, update=update, seed=12, dtype=F64), 2.0)
    weights = dict(base.weights)
    closed = 1.0 if update == "replace" else -1.0  # the state is replaced when z ≈ 0 (keep) or z ≈ 1 (replace)
    weights["W_iz"] = weights["W_iz"].clone()
    weights["W_iz"][:, 0] = closed
    weights["W_ir"] = weights["W_ir"].clone()
    weights["W_ir"][:, 0] = -1.0
    weights["W_in"] = weights["W_in"].clone()
    weights["W_in"][:, 0] = 0.0
    return gl.GRU(weights, reset=reset, update=update)


def _blocking_input() -> Tensor:
    x = torch.cat([torch.zeros(TB, B, 1, dtype=F64), _randn(TB, B, I, seed=13)], dim=-1)
    x[M, :, 0] = 50.0
    return x


@pytest.mark.parametrize(("reset", "update"), [("after", "keep"), ("before", "keep"), ("after", "replace")])
def test_blocking_step_cuts_only_earlier_sources_many_to_one(reset: str, update: str) -> None:
    cell = _blocking_gru(reset, update)
    x = _blocking_input()
    trace = gl.Model(cell).trace(x)
    rec = trace.recurrence()
    assert trace.jacobians()[M].abs().max() < 1e-15  # the premise: J_{M+1} ≈ 0 on every row
    assert trace.jacobians()[M + 1].abs().max() > 1e-2
    cm = gl.credit(trace, loss="last", targets=torch.zeros(B, 4, dtype=F64))
    expected = oracle_contributions([_oracle_layer(cell)], x, _last_step_grads(rec.states[-1]))
    assert_matches_oracle(cm, expected)

    for block in ("l0.W_iz", "l0.W_hz", "l0.W_in", "l0.b_in", "l0.W_hr"):
        row = cm.norms[block][TB - 1]
        scale = row.max()
        assert scale > 1e-3, block
        assert row[:M].max() <= 1e-6 * scale, (block, row)  # sources before the blocking step: cut
        assert row[M + 1 :].min() > 1e-6 * scale, (block, row)  # sources after it: still contribute
    assert cm.norms["l0.W_in"][TB - 1, M] > 1e-3 * cm.norms["l0.W_in"][TB - 1].max()  # the blocking step itself
    assert cm.total["l0.W_iz"].abs().max() > 1e-3 * cm.total["l0.W_in"].abs().max()  # the gradient does not vanish
    assert relative_error(cm.total["l0.W_iz"], cm.by_source["l0.W_iz"][M + 1 :].sum(0)) <= 1e-6


def _last_step_grads(final_state: Tensor) -> Tensor:
    """∂/∂y of mse(y_T, 0) at the last step only: 2 y_T / (B·H)."""
    g = torch.zeros(TB, *final_state.shape, dtype=F64)
    g[-1] = 2 * final_state / final_state.numel()
    return g


@pytest.mark.parametrize(("reset", "update"), [("after", "keep"), ("before", "keep")])
def test_blocking_step_many_to_many_every_loss_step_contributes(reset: str, update: str) -> None:
    cell = _blocking_gru(reset, update)
    x = _blocking_input()
    trace = gl.Model(cell).trace(x)
    targets = _randn(TB, B, 4, seed=14)
    cm = gl.credit(trace, loss="all", targets=targets)
    g = 2 * (trace.states["l0"][1:] - targets) / targets.numel()
    expected = oracle_contributions([_oracle_layer(cell)], x, g)
    assert_matches_oracle(cm, expected)

    for block in ("l0.W_iz", "l0.W_in", "l0.b_iz", "l0.W_hz"):
        norms = cm.norms[block]
        scale = norms.max()
        early = range(1 if block == "l0.W_hz" else 0, M)  # (W_hz reads h_0 = 0 at the first step)
        for t in early:  # loss steps before the blocking step contribute their own sums
            assert norms[t, : t + 1].max() > 1e-3 * scale, (block, t)
        for t in range(M, TB):  # loss steps at or after it: sources before M are cut
            assert norms[t, :M].max() <= 1e-6 * scale, (block, t)
        assert cm.by_source[block][:M].abs().max() > 1e-3 * cm.by_source[block].abs().max()
        # ∂L_t/∂θ = Σ_k C(t, k), one loss step at a time: credit of that step alone against the oracle's row sum
        for t in early:
            single = torch.zeros_like(trace.output)
            single[t] = g[t]
            row_sum = gl.credit(trace, single).total[block]
            assert relative_error(row_sum, expected[block][t].sum(0)) <= TOL
            assert row_sum.abs().max() > 0
    assert cm.total["l0.W_iz"].abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# d. Bad input


@pytest.fixture
def trace() -> gl.Trace:
    return gl.Model(gl.GRU.random(I, 4, seed=0, dtype=F64)).trace(_randn(T, B, I), lengths=LENGTHS)


def test_out_grads_of_the_wrong_shape(trace: gl.Trace) -> None:
    with pytest.raises(ValueError, match=re.escape(f"shape {(T, B, 5)}, expected {(T, B, 4)}")):
        gl.credit(trace, torch.zeros(T, B, 5, dtype=F64))
    with pytest.raises(ValueError, match=re.escape(f"shape {(B, T, 4)}, expected {(T, B, 4)}")):
        gl.credit(trace, torch.zeros(B, T, 4, dtype=F64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_out_grads_not_finite(trace: gl.Trace, bad: float) -> None:
    out_grads = torch.zeros(T, B, 4, dtype=F64)
    out_grads[2, 1, 0] = bad
    with pytest.raises(ValueError, match="out_grads contains NaN or Inf"):
        gl.credit(trace, out_grads)


def test_out_grads_of_the_wrong_dtype(trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match=r"out_grads has dtype torch.float32 .*torch.float64"):
        gl.credit(trace, torch.zeros(T, B, 4))


def test_out_grads_and_loss_together(trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match=r"either out_grads or loss.*also given: loss, targets"):
        gl.credit(trace, torch.zeros(T, B, 4, dtype=F64), loss="all", targets=torch.zeros(T, B, 4, dtype=F64))


def test_neither_out_grads_nor_loss(trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match=r"out_grads .*'last' or 'all'"):
        gl.credit(trace)


def test_unknown_loss_name(trace: gl.Trace) -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'final'; expected one of 'last', 'all'"):
        gl.credit(trace, loss="final", targets=torch.zeros(B, 4, dtype=F64))


def test_missing_targets(trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match=r"loss='last' needs targets="):
        gl.credit(trace, loss="last")


@pytest.mark.parametrize(
    ("loss", "targets", "predictions"),
    [("last", (B, 3), (B, 4)), ("all", (T, B, 2), (T, B, 4)), ("all", (B, 4), (T, B, 4))],
)
def test_targets_do_not_fit_the_predictions(
    trace: gl.Trace, loss: str, targets: tuple[int, ...], predictions: tuple[int, ...]
) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"targets have shape {targets}") + r".*" + re.escape(str(predictions))
    ):
        gl.credit(trace, loss=loss, targets=torch.zeros(targets, dtype=F64))


def test_head_output_and_targets_mismatch(trace: gl.Trace) -> None:
    head = nn.Linear(4, 2).double()
    with pytest.raises(ValueError, match=re.escape(f"targets have shape {(B, 4)}") + r".*" + re.escape(str((B, 2)))):
        gl.credit(trace, loss="last", head=head, targets=torch.zeros(B, 4, dtype=F64))


def test_head_that_fails_names_the_shape_it_was_given(trace: gl.Trace) -> None:
    head = nn.Linear(7, 1).double()  # expects 7 features, the model outputs 4
    with pytest.raises(ValueError, match=re.escape(f"head failed on inputs of shape {(B, 4)}")):
        gl.credit(trace, loss="last", head=head, targets=torch.zeros(B, 1, dtype=F64))
    with pytest.raises(ValueError, match=re.escape(f"shape {(T, B, 4)}")):
        gl.credit(trace, loss="all", head=head, targets=torch.zeros(T, B, 1, dtype=F64))


def test_loss_fn_that_is_not_a_scalar(trace: gl.Trace) -> None:
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        gl.credit(
            trace,
            loss="all",
            targets=torch.zeros(T, B, 4, dtype=F64),
            loss_fn=lambda p, y: nn.functional.mse_loss(p, y, reduction="none"),
        )


# ---------------------------------------------------------------------------------------------------------------
# path shares against the adjoints autograd gives, and devices


def test_path_shares_use_the_adjoint_autograd_gives() -> None:
    """share_p[i] = ‖ā_i P_p[i]‖ / Σ_q ‖ā_i P_q[i]‖ with ā_i = ∂L/∂h_{i+1} taken from autograd through nn.GRUCell."""
    torch.manual_seed(3)
    gru = nn.GRU(I, 5).double()
    cell = nn.GRUCell(I, 5).double()
    cell.load_state_dict({name.removesuffix("_l0"): value for name, value in gru.state_dict().items()})
    x, g = _randn(T, B, I, seed=6), _randn(T, B, 5, seed=7)
    h = torch.zeros(B, 5, dtype=F64)
    states = []
    for step in range(T):
        h = cell(x[step], h)
        h.retain_grad()
        states.append(h)
    sum((state * g[step]).sum() for step, state in enumerate(states)).backward()
    adjoints = torch.stack([state.grad for state in states])  # (T, B, H)
    trace = gl.load(gru).trace(x)
    paths = trace.jacobian_paths()
    flows = {name: (adjoints.unsqueeze(-2) @ path).flatten(1).norm(dim=1) for name, path in paths.items()}
    total = sum(flows.values())
    shares = gl.credit(trace, g).path_shares
    assert set(shares) == {f"l0.{name}" for name in flows}
    for name, flow in flows.items():
        assert relative_error(shares[f"l0.{name}"], flow / total) <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_credit_and_propagation_on_cuda_equal_cpu() -> None:
    gru = nn.GRU(I, 4, num_layers=2).double()
    x, g = _randn(T, B, I, seed=8), _randn(T, B, 4, seed=9)
    cpu = gl.load(gru).trace(x, lengths=LENGTHS)
    cuda = gl.load(gru).trace(x.cuda(), lengths=LENGTHS)
    on_cpu, on_cuda = gl.credit(cpu, g), gl.credit(cuda, g.cuda())
    for field in ("total", "by_source", "by_lag", "norms", "path_shares"):
        for name, value in getattr(on_cpu, field).items():
            got = getattr(on_cuda, field)[name]
            assert got.device.type == "cuda"
            assert relative_error(got.cpu(), value) <= TOL
    spectra = [gl.propagation(t, anchors=[2, 5]).log_singular_values for t in (cpu, cuda)]
    assert torch.allclose(spectra[1].cpu(), spectra[0], equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Review findings: float32 range, cancellation across the batch, complete results, the loss's layout, grad modes


def test_float32_keeps_tiny_contributions_that_float32_can_hold() -> None:
    """A hard block (J ≈ 1e-24) leaves contributions of 1e-26: representable in float32, so they must not be 0."""
    x = _blocking_input()
    x[M, :, 0] = 60.0
    cell = _blocking_gru("after", "keep")
    g = torch.zeros(TB, B, 4, dtype=F64)
    g[-1] = 1.0
    exact = gl.credit(gl.Model(cell).trace(x), g)
    single = gl.credit(gl.Model(cell.to(torch.float32)).trace(x.float()), g.float())
    before = slice(TB - M, None)  # lags reaching sources before the blocking step
    assert torch.all(exact.by_lag["l0.W_in"][before] < 1e-20)
    assert torch.all(single.by_lag["l0.W_in"][before] > 0)
    assert relative_error(single.by_lag["l0.W_in"][before].double(), exact.by_lag["l0.W_in"][before]) <= 1e-3
    assert torch.all(single.norms["l0.W_in"][-1, :M] > 0)
    log_norm = gl.propagation(gl.Model(cell.to(torch.float32)).trace(x.float())).log_norm
    assert torch.isfinite(log_norm).all()
    exact_log_norm = gl.propagation(gl.Model(cell).trace(x)).log_norm
    assert (log_norm.double() - exact_log_norm).abs().max() <= 1e-3 * exact_log_norm.abs().max()


def test_norms_stay_exact_when_the_sequences_contributions_cancel() -> None:
    """Two nearly equal sequences with opposite gradients: each pair's contribution is a tiny difference."""
    cell = gl.GRU.random(3, 6, seed=1, dtype=F64)
    x1 = _randn(5, 1, 3, seed=20)
    x = torch.cat([x1, x1 + 1e-7 * _randn(5, 1, 3, seed=21)], dim=1)
    g1 = _randn(5, 1, 6, seed=22)
    cm = gl.credit(gl.Model(cell).trace(x), torch.cat([g1, -g1], dim=1))
    expected = oracle_contributions([_oracle_layer(cell)], x, torch.cat([g1, -g1], dim=1))
    for name, c in expected.items():
        assert relative_error(cm.norms[name], pair_norms(c)) <= 1e-8, name


def test_every_block_is_reported_even_without_gradient() -> None:
    module = nn.GRU(I, 4, bidirectional=True).double()
    trace = gl.load(module).trace(_randn(T, B, I))
    g = _randn(T, B, 8, seed=1)
    g[..., 4:] = 0  # nothing reaches the reverse direction
    cm = gl.credit(trace, g)
    names = list(trace.model.weights)
    for field in ("total", "by_source", "by_lag", "norms"):
        assert list(getattr(cm, field)) == names, field
    assert all(cm.by_lag[name].abs().max() == 0 for name in names if name.startswith("l0_reverse"))
    assert cm.norms["l0_reverse.W_hz"].shape == (T, T)


def test_class_targets_for_every_step_are_flattened_as_torch_losses_expect() -> None:
    """loss='all' with class indices: (T, B, C) predictions and (T, B) targets reach loss_fn as (T·B, C), (T·B,)."""
    torch.manual_seed(0)
    module, head = nn.GRU(I, 4).double(), nn.Linear(4, B).double()  # as many classes as sequences: no accident
    x, classes = _randn(T, B, I), torch.randint(0, B, (T, B))
    cm = gl.credit(gl.load(module).trace(x), loss="all", head=head, targets=classes, loss_fn=F.cross_entropy)
    output, _ = module(x)
    F.cross_entropy(head(output).reshape(-1, B), classes.reshape(-1)).backward()
    assert relative_error(cm.total["l0.W_hz"], module.weight_hh_l0.grad[4:8]) <= TOL


def test_real_valued_targets_must_match_the_predictions() -> None:
    trace = gl.load(nn.GRU(I, 4).double()).trace(_randn(T, B, I))
    with pytest.raises(ValueError, match="integer class indices"):
        gl.credit(trace, loss="last", head=nn.Linear(4, 1).double(), targets=torch.zeros(B, dtype=F64))


def test_credit_works_under_no_grad_and_inference_mode() -> None:
    module = nn.GRU(I, 4).double()
    x, y = _randn(T, B, I), _randn(B, 4, seed=3)
    expected = gl.credit(gl.load(module).trace(x), loss="last", targets=y).total
    with torch.no_grad():
        got = gl.credit(gl.load(module).trace(x), loss="last", targets=y).total
    with torch.inference_mode():
        got_inference = gl.credit(gl.load(module).trace(x), loss="last", targets=y).total
    for name, value in expected.items():
        assert torch.equal(got[name], value) and torch.equal(got_inference[name], value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"targets": "abc"}, TypeError, "targets must be a tensor"),
        ({"targets": [[1.0], [2.0, 3.0]]}, TypeError, "targets must be a tensor"),
        ({"targets": torch.zeros(B, 4, dtype=F64), "head": lambda y: (y, y)}, TypeError, "head must return a tensor"),
        (
            {"targets": torch.zeros(B, 4, dtype=F64), "loss_fn": lambda p, t: torch.tensor(1.0, dtype=F64)},
            ValueError,
            "does not depend on the model's outputs",
        ),
        ({"targets": torch.zeros(B, 4, dtype=F64), "loss_fn": lambda p, t: 1 / 0}, ValueError, "loss_fn failed"),
    ],
)
def test_bad_loss_inputs_give_one_clear_error(options: dict, error: type, message: str) -> None:
    trace = gl.load(nn.GRU(I, 4).double()).trace(_randn(T, B, I))
    with pytest.raises(error, match=message):
        gl.credit(trace, loss="last", **options)


def test_credit_needs_a_trace() -> None:
    with pytest.raises(TypeError, match="credit needs a Trace"):
        gl.credit(nn.GRU(I, 4), torch.zeros(T, B, 4))


@pytest.mark.parametrize("padded", [False, True])
def test_a_reverse_only_model_gets_the_reverse_half_of_a_bidirectional_modules_gradient(padded: bool) -> None:
    """Model(reverse=True) (an ONNX direction="reverse" node) against autograd on the reverse half of nn.GRU."""
    torch.manual_seed(5)
    module = nn.GRU(I, 4, bidirectional=True).double()
    x, lengths = _randn(T, B, I, seed=30), (LENGTHS if padded else None)
    g = _randn(T, B, 4, seed=31)
    reverse = gl.Model(gl.load(module).layers[0][1], reverse=True)
    cm = gl.credit(reverse.trace(x, lengths=lengths), g)
    output = _torch_output(module, x, lengths)
    (output[..., 4:] * g).sum().backward()
    assert relative_error(cm.total["l0_reverse.W_hz"], module.weight_hh_l0_reverse.grad[4:8]) <= TOL
    assert relative_error(cm.total["l0_reverse.W_in"], module.weight_ih_l0_reverse.grad[8:12]) <= TOL
    assert relative_error(cm.by_source["l0_reverse.W_in"].sum(0), cm.total["l0_reverse.W_in"]) <= TOL


def test_a_gradient_that_overflows_the_dtype_is_refused_with_its_step() -> None:
    """Regression: a chaotic float32 Elman (H = 64, W_hh ~ N(0, 16/H), T = 400) whose true gradient (~1e58) exceeds
    float32 gave NaN credit silently, which explain read as "no gradient". The float64 trace gives it."""
    weights, x = chaotic_elman()
    narrow = gl.Model(gl.Elman(weights).to(torch.float32)).trace(x.float())
    out_grads = _randn(*narrow.output.shape, seed=14)
    cm = gl.credit(narrow, out_grads.float())
    message = r"gradient overflowed float32 flowing back through l0: .* step index \d+ .*float64"
    for field in ("total", "by_source", "by_lag", "norms", "path_shares"):
        with pytest.raises(ValueError, match=message):
            getattr(cm, field)
    with pytest.raises(ValueError, match=message):
        gl.explain(narrow)
    exact = gl.credit(gl.Model(gl.Elman(weights)).trace(x), out_grads)
    total = exact.total["l0.W_hh"]
    assert bool(torch.isfinite(total).all()) and float(total.norm()) > 1e40
    assert all(bool(torch.isfinite(v).all()) for v in exact.by_lag.values())
