"""Blocking events and explain() against independent oracles.

* The parts of an event (before / across / after / total, per block and loss) against an unrolled recurrence written
  here from docs/notation.md, in which every step k has its own copy θ_k of the parameters, so that autograd gives
  each contribution C(t, k) of source step k to loss step t on its own; the loss is restricted to the event's
  sequence. Clamped gates (what_if) are constants of the oracle's step.
* The transmission ‖ā_m J_m‖ / ‖ā_m‖ against the adjoint of the later losses that autograd gives.
* The blocking gate case (z ≈ r ≈ 0 at one step: that step's Jacobian rows vanish), detection (row norms counted
  from trace.jacobians()), bad input.
* explain(): every finding's number against the analysis it rests on, computed here without gatelens where cheap
  (gates, Jacobian products, autograd local gradients).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import gatelens as gl
from gatelens.analysis import Finding
from tests.test_local_lyapunov import OFF, _nonnegative_inputs, _relu_with_units_off

F64 = torch.float64
T, B, I, H = 8, 2, 3, 3
M = 3  # 0-based index of the blocking step (J_{M+1})
REL = 1e-10
SEED = 3  # a probe seed other than the default


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _scaled(cell: gl.Cell, factor: float) -> gl.Cell:
    options = {k: getattr(cell, k) for k in ("reset", "update", "nonlinearity") if hasattr(cell, k)}
    return type(cell)({k: w * factor for k, w in cell.weights.items()}, **options)


def _gru(reset: str = "after", update: str = "keep", seed: int = 1, factor: float = 2.0) -> gl.GRU:
    return _scaled(gl.GRU.random(I, H, reset=reset, update=update, seed=seed, dtype=F64), factor)


def _lstm(seed: int = 3) -> gl.LSTM:
    return _scaled(gl.LSTM.random(I, H, seed=seed, dtype=F64), 2.0)


def _elman(seed: int = 2) -> gl.Elman:
    return _scaled(gl.Elman.random(I, H, seed=seed, dtype=F64), 1.5)


def _mask(lengths: list[int] | None, steps: int = T, batch: int = B) -> Tensor:
    if lengths is None:
        return torch.ones(steps, batch, dtype=torch.bool)
    return torch.arange(steps)[:, None] < torch.tensor(lengths)[None, :]


# ---------------------------------------------------------------------------------------------------------------
# The oracle: one sequence unrolled, a copy of every weight per step. Written from docs/notation.md.


def _sigmoid(a: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-a))


def _lin(w: dict[str, Tensor], weight: str, bias: str, v: Tensor) -> Tensor:
    return v @ w[weight].T + (w[bias] if bias in w else 0.0)


def gru_step(w: dict[str, Tensor], x: Tensor, h: Tensor, cell: gl.GRU, clamp: dict[str, float]) -> Tensor:
    r = _sigmoid(_lin(w, "W_ir", "b_ir", x) + _lin(w, "W_hr", "b_hr", h))
    z = _sigmoid(_lin(w, "W_iz", "b_iz", x) + _lin(w, "W_hz", "b_hz", h))
    r = torch.full_like(r, clamp["r"]) if "r" in clamp else r  # a clamped gate is a constant
    z = torch.full_like(z, clamp["z"]) if "z" in clamp else z
    if cell.reset == "after":
        n = torch.tanh(_lin(w, "W_in", "b_in", x) + r * _lin(w, "W_hn", "b_hn", h))
    else:
        n = torch.tanh(_lin(w, "W_in", "b_in", x) + _lin(w, "W_hn", "b_hn", r * h))
    return z * h + (1 - z) * n if cell.update == "keep" else (1 - z) * h + z * n


def lstm_step(w: dict[str, Tensor], x: Tensor, s: Tensor, cell: gl.LSTM, clamp: dict[str, float]) -> Tensor:
    assert "W_proj" not in w
    h, c = s[:, :H], s[:, H:]

    def gate(name: str, activation: Callable[[Tensor], Tensor]) -> Tensor:
        value = activation(_lin(w, f"W_i{name}", f"b_i{name}", x) + _lin(w, f"W_h{name}", f"b_h{name}", h))
        return torch.full_like(value, clamp[name]) if name in clamp else value

    i, f, g, o = gate("i", _sigmoid), gate("f", _sigmoid), gate("g", torch.tanh), gate("o", _sigmoid)
    c_new = f * c + i * g
    return torch.cat([o * torch.tanh(c_new), c_new], dim=-1)


def elman_step(w: dict[str, Tensor], x: Tensor, h: Tensor, cell: gl.Elman, clamp: dict[str, float]) -> Tensor:
    assert cell.nonlinearity == "tanh" and not clamp
    return torch.tanh(_lin(w, "W_ih", "b_ih", x) + _lin(w, "W_hh", "b_hh", h))


@dataclass(frozen=True)
class Layer:
    """One oracle layer: block names are f"{prefix}.{block}"; clamps: step index ↦ gate ↦ value."""

    cell: gl.Cell
    prefix: str = "l0"
    clamps: dict[int, dict[str, float]] = field(default_factory=dict)

    def step(self, w: dict[str, Tensor], x: Tensor, s: Tensor, k: int) -> Tensor:
        assert getattr(self.cell, "gate", "sigmoid") == "sigmoid"
        assert getattr(self.cell, "candidate", "tanh") == "tanh"
        kind = {gl.GRU: gru_step, gl.LSTM: lstm_step, gl.Elman: elman_step}[type(self.cell)]
        return kind(w, x, s, self.cell, self.clamps.get(k, {}))


@dataclass(frozen=True)
class Oracle:
    """contributions[name]: (T, T, *shape), C(t, k) at [t, k]; adjoints[i] = ∂(Σ_{t≥i} g_t·y_t)/∂s_{i+1} (S,);
    outputs (T, F) of the top layer."""

    contributions: dict[str, Tensor]
    adjoints: Tensor
    outputs: Tensor


def unrolled(layers: list[Layer], x: Tensor, g: Tensor, valid: Tensor) -> Oracle:
    """One sequence: x (T, I) in the recurrence's processing order, g (T, F) at the top layer's output, valid (T,)
    False past the sequence's end (those steps carry the state unchanged)."""
    steps = x.shape[0]
    keys = [(index, block) for index, layer in enumerate(layers) for block in layer.cell.weights]
    copies = [
        {
            (index, block): layers[index].cell.weights[block].detach().clone().requires_grad_(True)
            for index, block in keys
        }
        for _ in range(steps)
    ]
    states = [torch.zeros(1, layer.cell.state_size, dtype=F64) for layer in layers]
    outputs, history = [], []  # history[k]: every layer's state after step k
    for k in range(steps):
        layer_input = x[k : k + 1]
        for index, layer in enumerate(layers):
            w = {block: copies[k][(i, block)] for i, block in keys if i == index}
            if bool(valid[k]):
                states[index] = layer.step(w, layer_input, states[index], k)
            layer_input = states[index][:, : layer.cell.output_size]
        outputs.append(layer_input)
        history.append(list(states))
    terms = [(outputs[t] * g[t : t + 1]).sum() for t in range(steps)]
    names = [f"{layers[index].prefix}.{block}" for index, block in keys]
    contributions = {
        name: torch.zeros(steps, steps, *layers[index].cell.weights[block].shape, dtype=F64)
        for name, (index, block) in zip(names, keys)
    }
    for t in range(steps):
        leaves = [copies[k][key] for k in range(t + 1) for key in keys]
        grads = torch.autograd.grad(terms[t], leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
        for position, grad in enumerate(grads):
            contributions[names[position % len(keys)]][t, position // len(keys)] = grad
    adjoints = [_later_adjoint(layers, x, g, valid, [s.detach() for s in history[i]], i) for i in range(steps)]
    return Oracle(contributions, torch.stack(adjoints), torch.cat(outputs).detach())


def _later_adjoint(layers: list[Layer], x: Tensor, g: Tensor, valid: Tensor, states: list[Tensor], i: int) -> Tensor:
    """∂(Σ_{t≥i} g_t·y_t)/∂s_{i+1}, the whole state s_{i+1} = [s⁰, s¹, …] a leaf: every layer's part is its own
    coordinate (in a stack, s¹_{i+1} is not recomputed from s⁰_{i+1})."""
    leaf = torch.cat(states, dim=-1).requires_grad_(True)
    states = list(leaf.split([layer.cell.state_size for layer in layers], dim=-1))
    loss = (states[-1][:, : layers[-1].cell.output_size] * g[i : i + 1]).sum()
    for k in range(i + 1, x.shape[0]):
        layer_input = x[k : k + 1]
        for index, layer in enumerate(layers):
            if bool(valid[k]):
                states[index] = layer.step(dict(layer.cell.weights), layer_input, states[index], k)
            layer_input = states[index][:, : layer.cell.output_size]
        loss = loss + (layer_input * g[k : k + 1]).sum()
    (adjoint,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
    return adjoint[0]


PARTS = ("before", "across", "after", "total")


def expected_parts(oracle: Oracle, i: int) -> dict[str, dict[str, float]]:
    """Norms of the four parts of every block around the event at step index i (1-based step m = i + 1)."""
    steps = oracle.adjoints.shape[0]
    t, k = torch.arange(steps)[:, None], torch.arange(steps)[None, :]
    masks = {
        "before": (t < i) & (k <= t),
        "across": (t >= i) & (k < i),
        "after": (t >= i) & (k >= i),
        "total": k <= t,
    }
    parts = {}
    for name, c in oracle.contributions.items():
        view = (steps, steps) + (1,) * (c.dim() - 2)
        parts[name] = {part: float((c * mask.view(view)).sum((0, 1)).norm()) for part, mask in masks.items()}
    return parts


def assert_parts_match(got: dict[str, dict[str, float]], expected: dict[str, dict[str, float]], where: str) -> None:
    assert set(got) == set(expected), where
    for block, parts in expected.items():
        assert set(got[block]) == set(PARTS), (where, block)
        scale = max(parts.values())
        for part in PARTS:
            allowed = REL * scale if scale > 0 else 0.0
            assert abs(got[block][part] - parts[part]) <= allowed, (where, block, part, got[block], parts)


def expected_transmission(oracle: Oracle, jacobian: Tensor, i: int) -> float:
    adjoint = oracle.adjoints[i]
    return float((adjoint @ jacobian).norm() / adjoint.norm())


def assert_transmission_matches(got: float, expected: float, where: str) -> None:
    if math.isnan(expected):
        assert math.isnan(got), (where, got)
    else:
        assert abs(got - expected) <= REL * max(1.0, expected), (where, got, expected)


def readout(trace: gl.Trace, seed: int) -> Tensor:
    """The probes' readout w_t ~ N(0, I) from ``seed``, laid out like trace.output (here time-major)."""
    return torch.randn(trace.output.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# 1, 2. Every part and transmission against the oracle; one-recurrence models with clamps, large tol and padding


@dataclass(frozen=True)
class Case:
    build: Callable[[], gl.Cell]
    clamp: dict[str, float] | None  # clamped on every unit at step M
    tol: float
    lengths: list[int] | None = None


CASES = {
    "gru-after-keep-clamped": Case(lambda: _gru("after", "keep"), {"z": 0.0, "r": 0.0}, 0.1),
    "gru-before-keep-clamped": Case(lambda: _gru("before", "keep"), {"z": 0.0, "r": 0.0}, 0.1),
    "gru-after-replace-clamped": Case(lambda: _gru("after", "replace"), {"z": 1.0, "r": 0.0}, 0.1),
    "gru-before-replace-clamped": Case(lambda: _gru("before", "replace"), {"z": 1.0, "r": 0.0}, 0.1),
    "gru-every-step-padded": Case(lambda: _gru("after", "keep", seed=4), None, 10.0, [5, 8]),
    "lstm-clamped": Case(_lstm, {"f": 0.0, "i": 0.0}, 0.1),
    "lstm-every-step": Case(_lstm, None, 10.0),
    "elman-every-step-padded": Case(_elman, None, 10.0, [8, 5]),
}


def _case_trace(case: Case) -> tuple[gl.Trace, Layer, Tensor]:
    cell = case.build()
    x = _randn(T, B, I, seed=7)
    trace = gl.Model(cell).trace(x, lengths=case.lengths)
    if case.clamp is not None:
        trace = gl.what_if(trace, case.clamp, steps=[M])
    layer = Layer(cell, "l0", {M: case.clamp} if case.clamp else {})
    return trace, layer, x


@pytest.mark.parametrize("name", list(CASES))
def test_parts_and_transmission_match_the_unrolled_oracle(name: str) -> None:
    case = CASES[name]
    trace, layer, x = _case_trace(case)
    valid = _mask(case.lengths)
    user_grads = _randn(*trace.output.shape, seed=8)  # also past the ends: dropped there
    user = gl.credit(trace, user_grads)
    probes = gl.probe_credits(trace, seed=SEED)
    results = {
        "user": gl.blocking(trace, user, tol=case.tol, max_events=100),
        "probes": gl.blocking(trace, tol=case.tol, max_events=100, seed=SEED),
    }
    assert results["user"].losses == ["loss"]
    assert results["probes"].losses == ["many-to-one", "many-to-many"]
    gradients = {
        "loss": torch.where(valid[..., None], user_grads, 0.0),
        **{loss: cm.out_grads for loss, cm in probes.items()},
    }
    # the probes: one readout from the seed, at every step or at each sequence's last step only
    w = readout(trace, SEED)
    assert torch.equal(gradients["many-to-many"], torch.where(valid[..., None], w, 0.0))
    last = torch.arange(T)[:, None] == (valid.sum(0) - 1)[None, :]
    assert torch.equal(gradients["many-to-one"], torch.where(last[..., None], w, 0.0))

    jacobians = trace.jacobians()
    oracles: dict[tuple[str, int], Oracle] = {}
    for b in range(B):
        for loss, g in gradients.items():
            oracles[loss, b] = unrolled([layer], x[:, b], g[:, b], valid[:, b])
        difference = oracles["loss", b].outputs - trace.output[:, b]
        assert difference[valid[:, b]].abs().max() <= 1e-12  # the same network (its output is 0 past the end)
    checked = 0
    for result in results.values():
        assert result.total_events == len(result.events) > 0
        for event in result.events:
            assert event.recurrence == "l0"
            assert set(event.parts) == set(event.transmission) == set(result.losses)
            for loss in result.losses:
                oracle = oracles[loss, event.sequence]
                where = f"{loss} step {event.step} sequence {event.sequence}"
                assert_parts_match(event.parts[loss], expected_parts(oracle, event.step), where)
                jacobian = jacobians[event.step, event.sequence]
                assert_transmission_matches(
                    event.transmission[loss], expected_transmission(oracle, jacobian, event.step), where
                )
                checked += 1
    if case.clamp is not None:  # J_{M+1} = 0 exactly: every row of every sequence collapses there
        assert torch.equal(jacobians[M], torch.zeros_like(jacobians[M]))
        for result in results.values():
            at_m = [e for e in result.events if e.step == M]
            assert sorted(e.sequence for e in at_m) == list(range(B))
            assert all(e.jacobian_norm == 0.0 and e.rows == trace.recurrence().cell.state_labels() for e in at_m)
            assert all(e.transmission[loss] == 0.0 for e in at_m for loss in result.losses)
    else:  # tol above every row norm: every valid step of every sequence is an event
        assert results["user"].total_events == int(valid.sum())
    assert checked >= 3 * B


def test_transmission_is_nan_and_only_before_survives_when_no_later_loss_reaches_the_step() -> None:
    cell = _gru()
    x = _randn(T, B, I, seed=7)
    trace = gl.Model(cell).trace(x)
    g = torch.zeros(T, B, H, dtype=F64)
    g[1] = _randn(B, H, seed=9)  # one loss at step index 1 only
    result = gl.blocking(trace, gl.credit(trace, g), tol=10.0, max_events=100)
    late = [e for e in result.events if e.step > 1]
    assert late
    for event in late:
        assert math.isnan(event.transmission["loss"])
        assert event.to_dict()["transmission"]["loss"] is None
        for parts in event.parts["loss"].values():
            assert parts["across"] == 0.0 and parts["after"] == 0.0
            assert abs(parts["before"] - parts["total"]) <= REL * parts["total"]
    json.dumps(result.to_dict(), allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# 3. The blocking gate case: z = r = 0 on every unit at step m, so J_m = 0


@pytest.mark.parametrize(("reset", "update"), [("after", "keep"), ("before", "keep"), ("after", "replace")])
def test_clamped_block_many_to_one_keeps_only_the_gradient_after_it(reset: str, update: str) -> None:
    trace = gl.Model(_gru(reset, update)).trace(_randn(T, B, I, seed=7))
    closed = 0.0 if update == "keep" else 1.0
    trace = gl.what_if(trace, {"z": closed, "r": 0.0}, steps=[M])
    result = gl.blocking(trace, seed=SEED)
    for b in range(B):
        (event,) = [e for e in result.events if e.step == M and e.sequence == b]
        assert event.rows == ["h0", "h1", "h2"]
        assert event.jacobian_norm == 0.0
        many_to_one, many_to_many = event.parts["many-to-one"], event.parts["many-to-many"]
        assert "l0.W_iz" in many_to_one
        for block, parts in many_to_one.items():
            assert parts["total"] > 0, block
            assert parts["before"] <= 1e-12 * parts["total"], block  # no loss before the block
            assert parts["across"] == 0.0, block  # J_{M+1} = 0 exactly: nothing crosses
            assert abs(parts["after"] - parts["total"]) <= 1e-12 * parts["total"], block
        for block, parts in many_to_many.items():
            assert parts["before"] > 1e-6 * parts["total"], block
            assert parts["across"] == 0.0, block
            assert parts["after"] > 1e-6 * parts["total"], block
        assert event.transmission == {"many-to-one": 0.0, "many-to-many": 0.0}


def _saturating_gru(reset: str, update: str) -> gl.GRU:
    """Input feature 0 is zero except at step M; it drives a_z and a_r to ∓50 there and touches nothing else."""
    weights = dict(_scaled(gl.GRU.random(I + 1, H, reset=reset, update=update, seed=12, dtype=F64), 2.0).weights)
    for block, value in (("W_iz", 1.0 if update == "replace" else -1.0), ("W_ir", -1.0), ("W_in", 0.0)):
        weights[block] = weights[block].clone()
        weights[block][:, 0] = value
    return gl.GRU(weights, reset=reset, update=update)


@pytest.mark.parametrize(("reset", "update"), [("after", "keep"), ("before", "keep"), ("after", "replace")])
def test_saturated_block_cuts_credit_across_it(reset: str, update: str) -> None:
    x = torch.cat([torch.zeros(T, B, 1, dtype=F64), _randn(T, B, I, seed=13)], dim=-1)
    x[M, :, 0] = 50.0
    trace = gl.Model(_saturating_gru(reset, update)).trace(x)
    assert 0 < trace.jacobians()[M].abs().max() < 1e-15  # the premise: nearly, not exactly, zero
    result = gl.blocking(trace)
    assert [(e.step, len(e.rows)) for e in result.events[:B]] == [(M, H)] * B  # the most severe come first
    for event in result.events[:B]:
        for loss in result.losses:
            for block, parts in event.parts[loss].items():
                assert parts["total"] > 0, (loss, block)
                assert parts["across"] < 1e-6 * parts["total"], (loss, block)
            assert event.transmission[loss] < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# 4. Detection


def _row_norms(trace: gl.Trace, layer: int | None = None, direction: str | None = None) -> Tensor:
    return trace.jacobians(layer, direction).norm(dim=-1)  # (T, B, S): ‖J[i][j, :]‖₂


def test_collapsed_counts_equal_a_direct_count_and_padded_steps_never_count() -> None:
    lengths = [8, 5]
    trace = gl.Model(_gru(seed=5, factor=3.0)).trace(_randn(T, B, I, seed=14), lengths=lengths)
    valid = _mask(lengths)
    rows = _row_norms(trace)
    tol = float(rows[valid].median())  # about half the rows of valid steps collapse
    result = gl.blocking(trace, tol=tol, max_events=1000)
    expected = ((rows < tol) & valid[..., None]).sum(-1)
    assert set(result.collapsed) == {"l0"}
    assert torch.equal(result.collapsed["l0"], expected)
    assert 0 < int(expected.sum()) < int(valid.sum()) * H
    assert result.total_events == int((expected > 0).sum()) == len(result.events)
    labels = trace.recurrence().cell.state_labels()
    for event in result.events:
        assert valid[event.step, event.sequence]
        below = rows[event.step, event.sequence] < tol
        assert event.rows == [labels[j] for j in range(H) if below[j]]
        assert event.jacobian_norm == pytest.approx(float(trace.jacobians()[event.step, event.sequence].norm()), 1e-12)
    keys = [(-len(e.rows), e.jacobian_norm) for e in result.events]
    assert keys == sorted(keys)  # most rows first, then smallest ‖J‖_F
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["total_events"] == result.total_events and len(data["events"]) == len(result.events)
    assert data["tol"] == tol and data["losses"] == ["many-to-one", "many-to-many"]

    # a tol above every row norm: every row of every valid step, none of the padded ones
    everything = gl.blocking(trace, tol=1e6, max_events=0)
    assert torch.equal(everything.collapsed["l0"], valid.long() * H)
    assert everything.total_events == int(valid.sum()) and everything.events == []


def test_to_dict_counts_the_steps_with_events_of_each_sequence() -> None:
    """ "steps_with_events" per recurrence: for each sequence, how many of its steps have an event."""
    trace = gl.Model(_gru()).trace(_randn(T, B, I, seed=7), lengths=[8, 5])
    clamped = gl.what_if(trace, {"z": 0.0, "r": 0.0}, steps=[1, M])
    result = gl.blocking(clamped, tol=1e-6)  # only the two clamped steps, in both sequences
    assert result.total_events == 2 * B
    assert result.to_dict()["steps_with_events"] == {"l0": [2] * B}


def test_max_events_caps_the_events_not_their_count() -> None:
    trace = gl.Model(_gru(seed=5, factor=3.0)).trace(_randn(T, B, I, seed=14))
    rows = _row_norms(trace)
    tol = float(rows.median())
    every = gl.blocking(trace, tol=tol, max_events=1000)
    assert every.total_events > 3
    top = gl.blocking(trace, tol=tol, max_events=3)
    assert top.total_events == every.total_events and len(top.events) == 3
    key = [(-len(e.rows), e.jacobian_norm) for e in every.events]
    assert [(-len(e.rows), e.jacobian_norm) for e in top.events] == key[:3]
    assert all(k >= key[2] for k in key[3:])  # none left out is more severe
    for got, full in zip(top.events, every.events):  # the parts do not depend on which other events are chosen
        assert (got.step, got.sequence) == (full.step, full.sequence)
        for loss in top.losses:
            assert_parts_match(got.parts[loss], full.parts[loss], "capped")
    none = gl.blocking(trace, tol=tol, max_events=0)
    assert none.events == [] and none.total_events == every.total_events
    assert torch.equal(none.collapsed["l0"], every.collapsed["l0"])


def test_a_zero_row_of_w_hh_collapses_that_row_only_at_every_step() -> None:
    weights = dict(_elman().weights)
    weights["W_hh"] = weights["W_hh"].clone()
    weights["W_hh"][1] = 0.0  # ∂h'_1/∂h = φ'(a_1) W_hh[1, :] = 0
    trace = gl.Model(gl.Elman(weights)).trace(_randn(T, B, I, seed=15))
    rows = _row_norms(trace)
    assert rows[..., 1].max() == 0.0 and rows[..., [0, 2]].min() > 1e-3  # the premise: only row 1 below 1e-3
    result = gl.blocking(trace, tol=1e-3, max_events=100)
    assert result.total_events == T * B
    assert torch.equal(result.collapsed["l0"], torch.ones(T, B, dtype=torch.long))
    assert all(e.rows == ["h1"] for e in result.events)


def test_unbatched_and_batch_first_traces() -> None:
    cell = _gru()
    x = _randn(T, B, I, seed=7)
    reference = gl.blocking(gl.Model(cell).trace(x), tol=10.0, max_events=100, seed=SEED)
    batch_first = gl.blocking(
        gl.Model(cell, batch_first=True).trace(x.transpose(0, 1)), tol=10.0, max_events=100, seed=SEED
    )
    assert torch.equal(batch_first.collapsed["l0"], reference.collapsed["l0"])
    single = gl.Model(cell).trace(x[:, 0])
    unbatched = gl.blocking(single, tol=10.0, max_events=100, seed=SEED)
    assert unbatched.collapsed["l0"].shape == (T, 1)
    assert unbatched.total_events == T
    # many-to-one reads the last step only: every earlier loss is absent, so before = 0 at every event
    for event in unbatched.events:
        assert event.sequence == 0
        assert all(p["before"] == 0.0 for p in event.parts["many-to-one"].values())


def test_float32_agrees_with_float64() -> None:
    cell = _gru(seed=4)
    x = _randn(T, B, I, seed=7)
    exact = gl.blocking(gl.Model(cell).trace(x), tol=10.0, max_events=100)
    single = gl.blocking(gl.Model(cell.to(torch.float32)).trace(x.float()), tol=10.0, max_events=100)
    assert [(e.step, e.sequence) for e in single.events] == [(e.step, e.sequence) for e in exact.events]
    for got, expected in zip(single.events, exact.events):
        assert got.jacobian_norm == pytest.approx(expected.jacobian_norm, rel=1e-5)
        for loss in exact.losses:
            assert got.transmission[loss] == pytest.approx(expected.transmission[loss], rel=1e-4, abs=1e-6)
            for block, parts in expected.parts[loss].items():
                scale = max(parts.values())
                for part, value in parts.items():
                    assert abs(got.parts[loss][block][part] - value) <= 1e-4 * scale, (loss, block, part)


def test_probe_losses_do_not_depend_on_the_models_layout() -> None:
    """The same network on the same batch, batch-first or time-major, gets the same probe losses and findings."""
    cell = _gru(seed=4)
    x = _randn(T, B, I, seed=7)
    time_major = gl.Model(cell).trace(x)
    batch_first = gl.Model(cell, batch_first=True).trace(x.transpose(0, 1))
    for loss, cm in gl.probe_credits(time_major).items():
        assert torch.equal(gl.probe_credits(batch_first)[loss].out_grads, cm.out_grads), loss


# ---------------------------------------------------------------------------------------------------------------
# 4b. Several recurrences: a bidirectional GRU (l0, l0_reverse) with padding, and a two-layer stack ("stack")


def _bidirectional_module() -> nn.GRU:
    torch.manual_seed(0)
    module = nn.GRU(I, H, bidirectional=True).double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)
    return module


def test_bidirectional_events_per_direction_match_the_oracle() -> None:
    steps, lengths = 6, [6, 4]
    model = gl.load(_bidirectional_module())
    forward, reverse = model.layers[0]
    x = _randn(steps, B, I, seed=16)
    trace = model.trace(x, lengths=lengths)
    valid = _mask(lengths, steps)
    user_grads = _randn(steps, B, 2 * H, seed=17)
    maps = {"user": gl.credit(trace, user_grads), **gl.probe_credits(trace, seed=SEED)}
    result = gl.blocking(trace, maps, tol=10.0, max_events=100)
    assert set(result.collapsed) == {"l0", "l0_reverse"}
    for name in ("l0", "l0_reverse"):
        assert torch.equal(result.collapsed[name], valid.long() * H)
    assert result.total_events == len(result.events) == 2 * int(valid.sum())
    assert {e.recurrence for e in result.events} == {"l0", "l0_reverse"}

    oracles = {}
    for b, length in enumerate(lengths):
        order = [length - 1 - i for i in range(length)] + list(range(length, steps))  # reverse step i reads x[L−1−i]
        for loss, cm in maps.items():
            g = cm.out_grads[:, b]
            oracles["l0", loss, b] = unrolled([Layer(forward, "l0")], x[:, b], g[:, :H], valid[:, b])
            oracles["l0_reverse", loss, b] = unrolled(
                [Layer(reverse, "l0_reverse")], x[order, b], g[order, H:], valid[:, b]
            )
    jacobians = {"l0": trace.jacobians(0, "forward"), "l0_reverse": trace.jacobians(0, "reverse")}
    nan_seen = False
    for event in result.events:
        for loss in result.losses:
            oracle = oracles[event.recurrence, loss, event.sequence]
            where = f"{event.recurrence} {loss} step {event.step} sequence {event.sequence}"
            parts = event.parts[loss]
            assert {block.split(".")[0] for block in parts} == {event.recurrence}
            assert_parts_match(parts, expected_parts(oracle, event.step), where)
            jacobian = jacobians[event.recurrence][event.step, event.sequence]
            expected = expected_transmission(oracle, jacobian, event.step)
            assert_transmission_matches(event.transmission[loss], expected, where)
            nan_seen |= math.isnan(expected)
    # the many-to-one probe reads each direction's last processed step (time L−1 forward, time 0 reverse), so some
    # loss lies at or after every event of both directions
    assert not nan_seen
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_reverse_only_model_counts_steps_in_its_own_order() -> None:
    lengths = [8, 5]
    cell = _gru("before", "keep", seed=4)
    x = _randn(T, B, I, seed=7)
    trace = gl.Model(cell, reverse=True).trace(x, lengths=lengths)
    valid = _mask(lengths)
    cm = gl.credit(trace, _randn(T, B, H, seed=8))
    result = gl.blocking(trace, {"user": cm, **gl.probe_credits(trace, seed=SEED)}, tol=10.0, max_events=100)
    assert set(result.collapsed) == {"l0_reverse"}
    assert torch.equal(result.collapsed["l0_reverse"], valid.long() * H)
    jacobians = trace.jacobians()
    maps = {"user": cm, **gl.probe_credits(trace, seed=SEED)}
    for event in result.events:
        length = lengths[event.sequence]
        order = [length - 1 - i for i in range(length)] + list(range(length, T))
        for loss in result.losses:
            g = maps[loss].out_grads[order, event.sequence]
            oracle = unrolled([Layer(cell, "l0_reverse")], x[order, event.sequence], g, valid[:, event.sequence])
            where = f"{loss} step {event.step} sequence {event.sequence}"
            assert_parts_match(event.parts[loss], expected_parts(oracle, event.step), where)
            expected = expected_transmission(oracle, jacobians[event.step, event.sequence], event.step)
            assert_transmission_matches(event.transmission[loss], expected, where)


def test_two_layer_stack_is_one_recurrence_and_matches_the_oracle() -> None:
    bottom, top = _gru(seed=5), _scaled(gl.GRU.random(H, 2, reset="before", seed=6, dtype=F64), 2.0)
    steps = 6
    x = _randn(steps, B, I, seed=18)
    trace = gl.Model([bottom, top]).trace(x)
    user_grads = _randn(steps, B, 2, seed=19)
    result = gl.blocking(trace, gl.credit(trace, user_grads), tol=10.0, max_events=100)
    assert set(result.collapsed) == {"stack"}
    assert result.total_events == len(result.events) == steps * B
    labels = ["l0.h0", "l0.h1", "l0.h2", "l1.h0", "l1.h1"]
    jacobians = trace.jacobians()
    assert jacobians.shape[-1] == len(labels)
    oracles = [
        unrolled(
            [Layer(bottom, "l0"), Layer(top, "l1")], x[:, b], user_grads[:, b], torch.ones(steps, dtype=torch.bool)
        )
        for b in range(B)
    ]
    for event in result.events:
        assert event.recurrence == "stack" and event.rows == labels
        oracle = oracles[event.sequence]
        where = f"step {event.step} sequence {event.sequence}"
        assert_parts_match(event.parts["loss"], expected_parts(oracle, event.step), where)
        expected = expected_transmission(oracle, jacobians[event.step, event.sequence], event.step)
        assert_transmission_matches(event.transmission["loss"], expected, where)


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input


@pytest.fixture
def trace() -> gl.Trace:
    return gl.Model(_gru()).trace(_randn(T, B, I, seed=7))


@pytest.mark.parametrize("tol", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_tol(trace: gl.Trace, tol: object) -> None:
    with pytest.raises(ValueError, match="tol must be a positive number"):
        gl.blocking(trace, tol=tol)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_events", [-1, 1.0, 2.5, True, None, "3"])
def test_bad_max_events(trace: gl.Trace, max_events: object) -> None:
    with pytest.raises(ValueError, match="max_events must be an int"):
        gl.blocking(trace, max_events=max_events)  # type: ignore[arg-type]


def test_credits_of_another_trace(trace: gl.Trace) -> None:
    other = gl.Model(_gru()).trace(_randn(T, B, I, seed=7))  # equal numbers, another trace
    cm = gl.credit(other, _randn(T, B, H, seed=1))
    with pytest.raises(ValueError, match="computed from this trace"):
        gl.blocking(trace, cm)
    with pytest.raises(ValueError, match="computed from this trace"):
        gl.blocking(trace, {"mine": gl.credit(trace, _randn(T, B, H, seed=1)), "theirs": cm})
    with pytest.raises(ValueError, match="computed from this trace"):
        gl.explain(trace, cm)


@pytest.mark.parametrize("credits", [{}, [0], "loss", _randn(T, B, H), {"loss": _randn(T, B, H)}])
def test_credits_that_are_not_credit_maps(trace: gl.Trace, credits: object) -> None:
    with pytest.raises(TypeError, match="credits must be a CreditMap"):
        gl.blocking(trace, credits)  # type: ignore[arg-type]


def test_credits_as_a_list_of_maps_is_refused(trace: gl.Trace) -> None:
    with pytest.raises(TypeError, match="credits must be a CreditMap"):
        gl.blocking(trace, [gl.credit(trace, _randn(T, B, H))])  # type: ignore[arg-type]


@pytest.mark.parametrize("function", [gl.blocking, gl.explain])
def test_not_a_trace(trace: gl.Trace, function: Callable[..., object]) -> None:
    for bad in (trace.model, _randn(T, B, I), None):
        with pytest.raises(TypeError, match="needs a Trace"):
            function(bad)


# ---------------------------------------------------------------------------------------------------------------
# 6. explain


TOPICS = ["regimes", "timescales", "horizon", "blocking", "local gradients", "lyapunov"]
EXPLAIN_B = 3  # odd: the median horizon is one sequence's


def _gates(cell: gl.GRU, trace: gl.Trace, x: Tensor, name: str = "l0") -> tuple[Tensor, Tensor]:
    """r, z (T, B, H) from the states of the trace, by the equations (reset after, gates unclamped)."""
    assert cell.reset == "after" and cell.update == "keep"
    w, h = cell.weights, trace.states[name][:-1]
    r = _sigmoid(_lin(dict(w), "W_ir", "b_ir", x) + _lin(dict(w), "W_hr", "b_hr", h))
    z = _sigmoid(_lin(dict(w), "W_iz", "b_iz", x) + _lin(dict(w), "W_hz", "b_hz", h))
    return r, z


def _top_lyapunov(jacobians: Tensor) -> Tensor:
    """λ₁ with k = 1 from Q_0 = e_1: the QR steps telescope to (1/T) log ‖J_T ⋯ J_1 e_1‖, per sequence."""
    vector = torch.zeros(jacobians.shape[1], jacobians.shape[-1], dtype=F64)
    vector[:, 0] = 1.0
    for jacobian in jacobians:
        vector = (jacobian @ vector[..., None])[..., 0]
    return vector.norm(dim=-1).log() / jacobians.shape[0]


def _horizons(jacobians: Tensor, eps: float, lengths: list[int] | None = None) -> list[int]:
    """First lag ℓ with ‖J_L ⋯ J_{L−ℓ+1}‖₂ < eps from each sequence's own last step L (−1 if none)."""
    steps, batch, size = jacobians.shape[:3]
    horizons = []
    for b in range(batch):
        last = steps if lengths is None else lengths[b]
        product, found = torch.eye(size, dtype=F64), -1
        for lag in range(1, last + 1):
            product = product @ jacobians[last - lag, b]
            if torch.linalg.matrix_norm(product, ord=2) < eps:
                found = lag
                break
        horizons.append(found)
    return horizons


def _largest_local_gradient(cell: gl.GRU, trace: gl.Trace, x: Tensor) -> tuple[float, str, int, int]:
    """max over steps, sequences and blocks of ‖∂⁺h_k/∂θ‖_F, by autograd on the step (h_{k−1} held fixed)."""
    names = list(cell.weights)
    best = (-1.0, "", -1, -1)
    for k in range(x.shape[0]):
        h = trace.states["l0"][k]

        def step(*weights: Tensor, k: int = k, h: Tensor = h) -> Tensor:
            return gru_step(dict(zip(names, weights)), x[k], h, cell, {})

        jacobians = torch.autograd.functional.jacobian(step, tuple(cell.weights[n] for n in names))
        for name, jac in zip(names, jacobians):  # (B, H, *shape): sequence b's state only reads its own input
            norms = jac.flatten(2).norm(dim=-1).norm(dim=-1)
            for b, value in enumerate(norms.tolist()):
                if value > best[0]:
                    best = (value, f"l0.{name}", k, b)
    return best


def _by_topic(explanation: gl.Explanation) -> dict[tuple[str, str], Finding]:
    found: dict[tuple[str, str], Finding] = {}
    for finding in explanation.findings:
        assert (finding.topic, finding.recurrence) not in found
        found[finding.topic, finding.recurrence] = finding
    return found


def test_explain_findings_match_their_analyses() -> None:
    cell = _gru(seed=21, factor=2.5)
    x = _randn(T, EXPLAIN_B, I, seed=22)
    trace = gl.Model(cell).trace(x)
    eps = 0.05
    explanation = gl.explain(trace, eps=eps, tol=0.3, seed=SEED)
    assert [f.topic for f in explanation.findings] == TOPICS
    found = _by_topic(explanation)

    # regimes: the census from the gates themselves (c = z, admit = r for reset "after", update "keep")
    r, z = _gates(cell, trace, x)
    lo, hi = 0.1, 0.9
    census = {
        "carry": float((z > hi).double().mean()),
        "blocked": float(((z < lo) & (r < lo)).double().mean()),
        "elman": float(((z < lo) & (r > hi)).double().mean()),
    }
    census["mixed"] = 1.0 - sum(census.values())
    regime = found["regimes", "l0"]
    assert regime.value == pytest.approx(census["blocked"], abs=1e-12)
    assert regime.details["census"] == pytest.approx(census, abs=1e-12)

    # timescales: τ = 1 / (1 − mean z)
    taus = 1 / (1 - z.mean((0, 1)))
    timescale = found["timescales", "l0"]
    assert timescale.value == pytest.approx(float(taus.max()), rel=1e-12)
    longest = int(taus.argmax())
    assert f"h{longest}" in timescale.text
    assert timescale.details["short_term"] == [f"h{j}" for j in range(H) if taus[j] <= 2]
    assert set(timescale.details["long_term"]) == {f"h{j}" for j in range(H) if taus[j] >= 10}

    # horizon: the median over sequences of the first lag where ‖∂h_T/∂h_{T−ℓ}‖₂ < eps
    horizons = _horizons(trace.jacobians(), eps)
    assert all(h > 0 for h in horizons), horizons  # the premise: every sequence reaches eps (odd count)
    horizon = found["horizon", "l0"]
    assert horizon.value == statistics.median(horizons)
    assert horizon.details["horizon"] == horizons and horizon.details["eps"] == eps
    assert f"ℓ = {statistics.median(horizons):.0f}" in horizon.text

    # local gradients: the largest ‖∂⁺h_k/∂θ‖_F
    value, block, step, sequence = _largest_local_gradient(cell, trace, x)
    local = found["local gradients", "l0"]
    assert local.value == pytest.approx(value, rel=1e-10)
    assert local.details["largest"]["block"] == block
    assert (local.details["largest"]["step"], local.details["largest"]["sequence"]) == (step, sequence)

    # lyapunov: the mean over sequences of λ₁
    lyapunov = found["lyapunov", "l0"]
    top = sorted(_top_lyapunov(trace.jacobians()).tolist())
    assert lyapunov.value == pytest.approx(top[len(top) // 2], rel=1e-10)  # the (upper) median over sequences
    assert lyapunov.details["per_sequence"] == pytest.approx(_top_lyapunov(trace.jacobians()).tolist(), rel=1e-10)

    # blocking: the count of events at that tol, the most severe one's step
    result = gl.blocking(trace, tol=0.3, seed=SEED)
    assert result.total_events > 0  # the premise
    (blocking,) = [f for f in explanation.findings if f.topic == "blocking"]
    assert blocking.value == result.total_events
    assert blocking.recurrence == result.events[0].recurrence
    assert f"step index {result.events[0].step} of sequence {result.events[0].sequence}" in blocking.text
    assert blocking.details == json.loads(json.dumps(result.to_dict()))

    # output
    data = explanation.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert [f["topic"] for f in json.loads(text)["findings"]] == TOPICS
    rendered = explanation.render()
    assert str(explanation) == rendered
    assert rendered.splitlines()[0] == repr(trace.model)
    for finding in explanation.findings:
        assert f"- {finding.topic} ({finding.recurrence}): {finding.text}" in rendered.splitlines()


def test_explain_passes_thresholds_and_seed_through() -> None:
    cell = _gru(seed=21, factor=2.5)
    x = _randn(T, EXPLAIN_B, I, seed=22)
    trace = gl.Model(cell).trace(x)
    found = _by_topic(gl.explain(trace, thresholds=0.3, tol=0.5, seed=SEED))
    r, z = _gates(cell, trace, x)
    census = {
        "carry": float((z > 0.7).double().mean()),
        "blocked": float(((z < 0.3) & (r < 0.3)).double().mean()),
        "elman": float(((z < 0.3) & (r > 0.7)).double().mean()),
    }
    assert found["regimes", "l0"].details["census"] == pytest.approx(
        census | {"mixed": 1.0 - sum(census.values())}, abs=1e-12
    )
    assert "(c > 0.7)" in found["regimes", "l0"].text
    (blocking,) = [f for (topic, _), f in found.items() if topic == "blocking"]
    assert blocking.details == json.loads(json.dumps(gl.blocking(trace, tol=0.5, seed=SEED).to_dict()))
    assert blocking.details != json.loads(json.dumps(gl.blocking(trace, tol=0.5, seed=0).to_dict()))


def test_explain_horizon_starts_at_each_sequences_own_last_step() -> None:
    lengths = [8, 5, 6]
    cell = _gru(seed=21, factor=2.5)
    trace = gl.Model(cell).trace(_randn(T, EXPLAIN_B, I, seed=22), lengths=lengths)
    eps = 0.1
    (horizon,) = [f for f in gl.explain(trace, eps=eps).findings if f.topic == "horizon"]
    horizons = _horizons(trace.jacobians(), eps, lengths)
    assert all(h > 0 for h in horizons), horizons  # the premise
    assert horizons != _horizons(trace.jacobians(), eps)  # the premise: padding would add identity lags
    assert horizon.details["horizon"] == horizons
    assert horizon.value == statistics.median(horizons)
    (never,) = [f for f in gl.explain(trace, eps=1e-12).findings if f.topic == "horizon"]
    assert never.value is None and never.details["horizon"] == [-1] * EXPLAIN_B


def test_explain_a_clamped_block() -> None:
    cell = _gru(seed=21, factor=2.5)
    x = _randn(T, EXPLAIN_B, I, seed=22)
    trace = gl.what_if(gl.Model(cell).trace(x), {"z": 0.0, "r": 0.0}, steps=[M])
    explanation = gl.explain(trace, tol=1e-6)
    found = _by_topic(explanation)
    blocking = found["blocking", "l0"]
    assert blocking.value == EXPLAIN_B  # at 1e-6 only the clamped step: one event per sequence
    assert f"step index {M} of sequence 0" in blocking.text
    assert "many-to-one" in blocking.text and "many-to-many" in blocking.text
    # the regimes see the clamped gates: every unit of step M is blocked, on top of the natural ones
    r, z = _gates(cell, gl.Model(cell).trace(x), x)
    blocked = (z < 0.1) & (r < 0.1)
    blocked[M] = True
    assert found["regimes", "l0"].value == pytest.approx(float(blocked.double().mean()), abs=1e-12)
    # J_{M+1} = 0: ‖∂h_T/∂h_{T−ℓ}‖ is exactly 0 from ℓ = T − M, and λ₁ = −inf; JSON has neither
    assert found["horizon", "l0"].value <= T - M
    assert found["lyapunov", "l0"].value == -math.inf
    assert "a zero Jacobian product" in found["lyapunov", "l0"].text
    data = json.loads(json.dumps(explanation.to_dict(), allow_nan=False))
    (lyapunov,) = [f for f in data["findings"] if f["topic"] == "lyapunov"]
    assert lyapunov["value"] is None


def test_explain_with_a_user_credit_map_and_no_event() -> None:
    trace = gl.Model(_gru(seed=21)).trace(_randn(T, EXPLAIN_B, I, seed=22))
    cm = gl.credit(trace, _randn(T, EXPLAIN_B, H, seed=23))
    assert _row_norms(trace).min() > 1e-4  # the premise
    quiet = _by_topic(gl.explain(trace, cm, tol=1e-4))
    assert quiet["blocking", "all"].value == 0.0
    assert f"below {1e-4:g} at any step" in quiet["blocking", "all"].text
    loud = _by_topic(gl.explain(trace, cm, tol=10.0))
    (blocking,) = [f for (topic, _), f in loud.items() if topic == "blocking"]
    assert blocking.value == T * EXPLAIN_B
    assert blocking.details["losses"] == ["loss"] and "): loss: " in blocking.text


def test_explain_a_bidirectional_model_per_direction() -> None:
    model = gl.load(_bidirectional_module())
    trace = model.trace(_randn(6, EXPLAIN_B, I, seed=24))
    explanation = gl.explain(trace)
    found = _by_topic(explanation)
    per_recurrence = [topic for topic in TOPICS if topic != "blocking"]
    for name, direction in (("l0", "forward"), ("l0_reverse", "reverse")):
        for topic in per_recurrence:
            assert (topic, name) in found, (topic, name)
        regime = gl.regimes(trace, layer=0, direction=direction)
        assert found["regimes", name].value == float(regime.census[1])
        assert found["timescales", name].value == float(regime.timescale.max())
        local = gl.local_gradients(trace, layer=0, direction=direction)
        assert found["local gradients", name].value == local.largest["value"]
        lyapunov = gl.lyapunov(trace, k=1, windows=6, layer=0, direction=direction)
        top = sorted(lyapunov.largest.tolist())
        assert found["lyapunov", name].value == pytest.approx(top[len(top) // 2], rel=1e-12)
        jacobians = trace.jacobians(0, direction)
        top = sorted(_top_lyapunov(jacobians).tolist())
        assert found["lyapunov", name].value == pytest.approx(top[len(top) // 2], rel=1e-10)
        assert found["horizon", name].details["horizon"] == _horizons(jacobians, 1e-3)
    assert len([f for f in explanation.findings if f.topic == "blocking"]) == 1
    assert len(explanation.findings) == 2 * len(per_recurrence) + 1
    json.dumps(explanation.to_dict(), allow_nan=False)


def test_explain_lists_long_term_units() -> None:
    weights = dict(_gru(seed=21).weights)
    weights["b_iz"] = weights["b_iz"].clone()
    weights["b_iz"][:2] = 12.0  # z ≈ 1 on units 0 and 1: they keep their value, τ ≫ 10 steps
    cell = gl.GRU(weights)
    x = _randn(T, EXPLAIN_B, I, seed=22)
    trace = gl.Model(cell).trace(x)
    (timescale,) = [f for f in gl.explain(trace).findings if f.topic == "timescales"]
    _, z = _gates(cell, trace, x)
    taus = 1 / (1 - z.mean((0, 1)))
    assert taus[:2].min() > 1e3 and taus[2] < 10  # the premise
    assert set(timescale.details["long_term"]) == {"h0", "h1"}
    for unit in ("h0", "h1"):
        assert timescale.details["long_term"][unit] == pytest.approx(float(taus[int(unit[1])]), rel=1e-6)
    assert timescale.text.startswith("2 of 3 units are long-term")
    assert timescale.value == pytest.approx(float(taus.max()), rel=1e-6)


def test_probes_read_each_directions_final_state() -> None:
    x = _randn(7, 2, I, seed=21)
    reverse_only = gl.Model(gl.GRU.random(I, H, seed=2, dtype=F64), reverse=True).trace(x, lengths=[7, 4])
    many_to_one = gl.probe_credits(reverse_only)["many-to-one"].out_grads
    assert torch.count_nonzero(many_to_one[1:]) == 0 and torch.count_nonzero(many_to_one[0]) == 2 * H
    bidirectional = gl.load(_bidirectional_module()).trace(x[:6], lengths=[6, 4])
    many_to_one = gl.probe_credits(bidirectional)["many-to-one"].out_grads
    assert torch.count_nonzero(many_to_one[1:, :, H:]) == 0  # reverse half: time 0 only
    assert torch.count_nonzero(many_to_one[5, 0, :H]) == H and torch.count_nonzero(many_to_one[3, 1, :H]) == H


def test_an_underflowed_adjoint_is_reported_as_such() -> None:
    torch.manual_seed(0)
    model = gl.load(torch.nn.GRU(3, 8))
    x = torch.randn(400, 2, 3)
    trace = gl.what_if(model.trace(x), {"z": 0.0, "r": 0.0}, steps=[20])
    event = gl.blocking(trace).events[0]
    assert event.step == 20 and event.underflow["many-to-one"] and math.isnan(event.transmission["many-to-one"])
    assert not event.underflow["many-to-many"]
    assert "underflows to 0 in float32" in str(gl.explain(trace))
    exact = gl.what_if(model.to(torch.float64).trace(x.double()), {"z": 0.0, "r": 0.0}, steps=[20])
    event = gl.blocking(exact).events[0]
    assert not event.underflow["many-to-one"] and event.transmission["many-to-one"] == 0.0


def test_explain_finds_a_horizon_beyond_the_first_sweep() -> None:
    """A slowly decaying GRU (z ≈ 0.97): the horizon lies past the first 64 lags, so the sweep has to grow."""
    cell = gl.GRU.random(I, H, seed=4, dtype=F64)
    weights = dict(cell.weights, b_iz=torch.full((H,), 3.5, dtype=F64))
    trace = gl.Model(gl.GRU(weights)).trace(_randn(300, 2, I, seed=5), lengths=[300, 260])
    horizon = next(f for f in gl.explain(trace, eps=1e-2).findings if f.topic == "horizon")
    expected = _horizons(trace.jacobians(), 1e-2, [300, 260])
    assert horizon.details["horizon"] == expected and min(expected) > 64


# ---------------------------------------------------------------------------------------------------------------
# 7. explain's wording: one basis per comparison, ratios defined, signs counted, short estimates and ranks said


def _finding(explanation: gl.Explanation, topic: str) -> Finding:
    (finding,) = [f for f in explanation.findings if f.topic == topic]
    return finding


def test_explain_local_gradients_compares_like_with_like() -> None:
    """The largest single-block value sits next to that block's own median, and the all-blocks norm is given with
    its own median and max, so no per-block largest is set against an all-blocks median."""
    trace = gl.Model(_gru(seed=21, factor=2.5)).trace(_randn(T, EXPLAIN_B, I, seed=22))
    local = _finding(gl.explain(trace), "local gradients")
    result = gl.local_gradients(trace)
    largest, summary = result.largest, result.summary()
    block, overall = summary[largest["block"]], summary["all"]
    assert local.value == largest["value"]
    assert f"‖∂⁺h_k/∂{largest['block']}‖_F = {largest['value']:.3g}" in local.text
    assert f"that block's median per step is {block['median']:.3g} (p95 {block['p95']:.3g})" in local.text
    assert (
        f"all blocks together, ‖∂⁺h_k/∂θ‖_F has median {overall['median']:.3g} per step "
        f"(p95 {overall['p95']:.3g}, max {overall['max']:.3g})" in local.text
    )
    assert overall["max"] >= largest["value"]  # the all-blocks norm bounds every block's
    assert local.details["block"] == block and local.details["all"] == overall


@pytest.mark.parametrize(("seed", "above_one"), [(6, True), (4, False)])
def test_explain_blocking_says_what_the_share_is(seed: int, above_one: bool) -> None:
    """‖G_across‖/‖G‖ is a ratio of norms: named with its block, and, above 1, explained (the parts cancel)."""
    trace = gl.Model(_gru(seed=seed, factor=2.5)).trace(_randn(T, EXPLAIN_B, I, seed=22))
    blocking = _finding(gl.explain(trace, tol=0.3, seed=SEED), "blocking")
    event = gl.blocking(trace, tol=0.3, seed=SEED).events[0]
    shares = {
        (loss, name): part["across"] / part["total"]
        for loss, parts in event.parts.items()
        for name, part in parts.items()
        if part["total"] > 0
    }
    assert (max(shares.values()) > 1) == above_one  # the premise
    for loss in event.parts:
        name = max((s, n) for (lo, n), s in shares.items() if lo == loss)[1]
        assert f"is at most ‖G_across‖/‖G‖ = {shares[loss, name]:.2g} (for {name})" in blocking.text
    assert "‖G_across‖/‖G‖ is a ratio of norms: the part of a block's gradient that credits" in blocking.text
    assert "of any weight's gradient" not in blocking.text
    assert ("partly cancel" in blocking.text) == above_one


def _one_unit_elman() -> gl.Elman:
    """h' = tanh(x₀ + 1.5 h): λ₁ = log 1.5 > 0 for x = 0 (h stays 0), and ≈ −7.6 for x₀ = 3 (tanh saturates)."""
    zero = torch.zeros(1, dtype=F64)
    w_ih = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    return gl.Elman({"W_ih": w_ih, "W_hh": torch.tensor([[1.5]], dtype=F64), "b_ih": zero, "b_hh": zero.clone()})


@pytest.mark.parametrize("steps", [8, 120])
def test_explain_lyapunov_counts_the_signs_and_says_when_it_is_short(steps: int) -> None:
    x = torch.zeros(steps, 3, I, dtype=F64)
    x[:, 1:, 0] = 3.0
    trace = gl.Model(_one_unit_elman()).trace(x)
    finding = _finding(gl.explain(trace), "lyapunov")
    per_sequence = gl.lyapunov(trace).exponents[:, 0]
    assert per_sequence[0] == pytest.approx(math.log(1.5), rel=1e-12) and bool((per_sequence[1:] < -1).all())
    assert finding.value == pytest.approx(float(per_sequence[1]), rel=1e-12)  # the (upper) median: negative
    assert "1 of 3 sequences have λ₁ > 0" in finding.text
    assert "2 have λ₁ < 0" in finding.text
    assert finding.details["positive"] == 1
    assert f"{steps} steps from h_0 with no warm-up" in finding.text
    short = steps < 100
    assert ("short estimate" in finding.text) == short and finding.details["short"] == short
    json.dumps(gl.explain(trace).to_dict(), allow_nan=False)


def test_explain_horizon_over_a_one_step_trace_says_it_is_too_short() -> None:
    trace = gl.Model(_gru(seed=21)).trace(_randn(1, EXPLAIN_B, I, seed=22))
    horizon = _finding(gl.explain(trace, eps=1e-9), "horizon")
    assert horizon.value is None
    assert "T = 1" in horizon.text and "too short" in horizon.text
    long = gl.Model(_gru(seed=21)).trace(_randn(120, EXPLAIN_B, I, seed=22))
    never = _finding(gl.explain(long, eps=1e-300), "horizon")
    assert never.value is None and "T = 120" in never.text and "too short" not in never.text


def test_explain_reports_exponents_beyond_the_numerical_rank() -> None:
    """Two of five ReLU units never switch on: λ₁ is finite, and the finding says that only 3 of the 5 exponents
    are finite, the other 2 being −inf."""
    trace = gl.Model(_relu_with_units_off()).trace(_nonnegative_inputs(12, EXPLAIN_B))
    explanation = gl.explain(trace)
    finding = _finding(explanation, "lyapunov")
    spectrum = gl.lyapunov(trace)
    assert spectrum.rank.tolist() == [5 - len(OFF)] * EXPLAIN_B  # the premise
    assert finding.details["rank"] == [3] * EXPLAIN_B and finding.details["exponents_followed"] == 5
    assert math.isfinite(finding.value)
    assert "only 3 of the 5 exponents are finite" in finding.text
    assert "the other 2 are −inf" in finding.text
    data = json.loads(json.dumps(explanation.to_dict(), allow_nan=False))
    (lyapunov,) = [f for f in data["findings"] if f["topic"] == "lyapunov"]
    assert lyapunov["details"]["rank"] == [3] * EXPLAIN_B


def test_explain_follows_the_top_exponents_only() -> None:
    """With more units than the k exponents followed, the finding follows the top ones and says so; λ₁ is the
    same."""
    trace = gl.Model(_relu_with_units_off()).trace(_nonnegative_inputs(12, EXPLAIN_B))
    whole = _finding(gl.explain(trace), "lyapunov")
    top = _finding(gl.explain(trace, k=4), "lyapunov")
    assert top.value == whole.value and top.details["exponents_followed"] == 4
    assert top.details["rank"] == [3] * EXPLAIN_B
    assert "only 3 of the 4 exponents followed (of 5) are finite and the other 1 is −inf" in top.text


def test_the_before_part_of_a_single_final_loss_is_exactly_zero() -> None:
    """Regression: G_before was formed as G − G_{t ≥ m}, a difference that left round-off (2.5e-7 here, float32)
    where no loss lies before the step. It is now contracted from the earlier losses' own adjoint: exactly 0."""
    torch.manual_seed(0)
    model = gl.load(nn.GRU(3, 16, num_layers=2))
    trace = model.trace(torch.randn(100, 8, 3))
    blocked = gl.what_if(trace, clamp={"z": 0.0, "r": 0.0}, steps=[49])  # every unit blocks at step 50
    result = gl.blocking(blocked, tol=0.1)
    assert len(result.events) == 8 and {event.step for event in result.events} == {49}
    for event in result.events:
        for block, norms in event.parts["many-to-one"].items():
            assert norms["before"] == 0.0, block
            assert norms["total"] > 0, block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_adjoint_cut_exactly_by_a_later_step_is_not_called_an_underflow(dtype: torch.dtype) -> None:
    """Regression: steps 21 and 41 both blocked: no later loss's credit reaches step 21 (step 41 cuts it exactly),
    which was reported as a float underflow ("trace in float64", even for a float64 trace)."""
    torch.manual_seed(0)
    model = gl.load(nn.GRU(3, 8)).to(dtype)
    trace = gl.what_if(model.trace(torch.randn(60, 2, 3, dtype=dtype)), {"z": 0.0, "r": 0.0}, steps=[20, 40])
    events = {event.step: event for event in gl.blocking(trace).events}
    assert set(events) == {20, 40}
    assert not events[20].underflow["many-to-one"] and math.isnan(events[20].transmission["many-to-one"])
    assert events[40].transmission["many-to-one"] == 0.0
    text = str(gl.explain(trace))
    assert "underflow" not in text and "a later step already cuts all of it" in text
