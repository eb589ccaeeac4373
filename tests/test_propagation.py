"""Propagation: singular values of ∂h_t/∂h_{t−ℓ} against explicit products, closed forms and autograd."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gatelens as gl

F64 = torch.float64
T, B, I = 7, 3, 3
LENGTHS = [7, 3, 5]


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def explicit_products(jacobians: Tensor, anchor: int) -> list[Tensor]:
    """Π_ℓ = J_t J_{t−1} ⋯ J_{t−ℓ+1} (t = anchor + 1) for ℓ = 0..t by plain matrix products: a list of (B, S, S)."""
    size = jacobians.shape[-1]
    product = torch.eye(size, dtype=jacobians.dtype).expand(jacobians.shape[1], size, size)
    products = [product]
    for lag in range(1, anchor + 2):
        product = product @ jacobians[anchor - lag + 1]
        products.append(product)
    return products


def _scaled_module(module: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)
    return module


def _torch(kind: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    return _scaled_module({"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind](I, 4, **options).double(), 2.0)


CASES = {
    # name: (model, layer, direction, lengths)
    "gru": (lambda: gl.load(_torch("GRU")), None, "forward", None),
    "gru-padded": (lambda: gl.load(_torch("GRU")), None, "forward", LENGTHS),
    "gru-2layer-stack": (lambda: gl.load(_torch("GRU", num_layers=2)), None, "forward", LENGTHS),
    "gru-2layer-layer1": (lambda: gl.load(_torch("GRU", num_layers=2)), 1, "forward", None),
    "gru-bi-reverse": (lambda: gl.load(_torch("GRU", bidirectional=True)), 0, "reverse", None),
    "gru-bi-reverse-padded": (lambda: gl.load(_torch("GRU", bidirectional=True, num_layers=2)), 1, "reverse", LENGTHS),
    "gru-before-replace": (
        lambda: gl.Model(gl.GRU.random(I, 4, reset="before", update="replace", seed=3, dtype=F64)),
        None,
        "forward",
        None,
    ),
    "lstm-proj": (lambda: gl.load(_torch("LSTM", proj_size=2)), None, "forward", LENGTHS),
    "rnn-tanh": (lambda: gl.load(_torch("RNN")), None, "forward", None),
    "rnn-relu-bi-reverse": (
        lambda: gl.load(_torch("RNN", nonlinearity="relu", bidirectional=True)),
        0,
        "reverse",
        LENGTHS,
    ),
}
ANCHORS = [T - 1, 0, 3, 3, 5]


@pytest.mark.parametrize("case", list(CASES))
def test_singular_values_equal_those_of_explicit_products(case: str) -> None:
    build, layer, direction, lengths = CASES[case]
    trace = build().trace(_randn(T, B, I, seed=1), lengths=lengths)
    pr = gl.propagation(trace, anchors=ANCHORS, layer=layer, direction=direction)
    jacobians = trace.jacobians(layer=layer, direction=direction)
    size = jacobians.shape[-1]
    assert pr.anchors.tolist() == sorted(set(ANCHORS))
    assert pr.log_singular_values.shape == (len(pr.anchors), T + 1, B, size)
    assert pr.log_norm.shape == pr.log_frobenius.shape == (len(pr.anchors), T + 1, B)
    for a, anchor in enumerate(pr.anchors.tolist()):
        for lag, product in enumerate(explicit_products(jacobians, anchor)):
            expected = torch.linalg.svdvals(product)  # (B, S), descending
            top = expected[:, :1]
            got = pr.log_singular_values[a, lag].exp()
            assert torch.all((got - expected).abs() <= 1e-10 * top), (anchor, lag)
            assert torch.allclose(pr.singular_values(lag)[a], got, rtol=1e-12, atol=0)
            log_top = top.squeeze(1).log()
            assert torch.all((pr.log_norm[a, lag] - log_top).abs() <= 1e-10 * log_top.abs().clamp_min(1)), (anchor, lag)
            log_fro = torch.linalg.matrix_norm(product).log()
            assert torch.all((pr.log_frobenius[a, lag] - log_fro).abs() <= 1e-10 * log_fro.abs().clamp_min(1))
        assert torch.all(pr.log_singular_values[a, 0] == 0)  # Π_0 = I
        assert torch.all(torch.isnan(pr.log_singular_values[a, anchor + 2 :]))  # ℓ > t: no such state
        assert not torch.any(torch.isnan(pr.log_singular_values[a, : anchor + 2]))


def test_products_equal_autograd_through_the_torch_cell() -> None:
    """∂h_t/∂h_{t−ℓ} by torch.func.jacrev through nn.GRUCell steps (not through gatelens' Jacobians)."""
    module = _torch("GRU")
    cell = nn.GRUCell(I, 4).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, f"{name}_l0"))
    x = _randn(T, B, I, seed=2)
    trace = gl.load(module).trace(x)
    states = trace.states["l0"]
    anchor = T - 2
    pr = gl.propagation(trace, anchors=anchor)
    for lag in (1, 2, 4, anchor + 1):
        for b in range(B):

            def run(h: Tensor, lag: int = lag, b: int = b) -> Tensor:
                for step in range(anchor + 1 - lag, anchor + 1):
                    h = cell(x[step, b], h)
                return h

            product = torch.func.jacrev(run)(states[anchor + 1 - lag, b])
            expected = torch.linalg.svdvals(product)
            got = pr.singular_values(lag)[0, b]
            assert torch.all((got - expected).abs() <= 1e-10 * expected[0]), (lag, b)


def test_max_lag_stops_the_products() -> None:
    trace = gl.load(_torch("LSTM")).trace(_randn(T, B, I, seed=1))
    full = gl.propagation(trace, anchors=[2, 6])
    limited = gl.propagation(trace, anchors=[2, 6], max_lag=2)
    assert torch.equal(limited.log_singular_values[:, :3], full.log_singular_values[:, :3])
    assert torch.all(torch.isnan(limited.log_singular_values[:, 3:]))


def test_default_anchor_is_the_last_step() -> None:
    trace = gl.load(_torch("GRU")).trace(_randn(T, B, I, seed=1))
    pr = gl.propagation(trace)
    assert pr.anchors.tolist() == [T - 1]
    assert torch.equal(pr.log_singular_values, gl.propagation(trace, anchors=[T - 1]).log_singular_values)


# ---------------------------------------------------------------------------------------------------------------
# b. A GRU whose update gate is open (z ≈ 1, keep) on a stretch copies the state there: ‖Π‖ = 1.

STRETCH = (3, 9)  # 0-based steps with z ≈ 1
TZ = 12


def test_open_update_gate_on_a_stretch_keeps_the_norm() -> None:
    base = gl.GRU.random(I + 1, 4, seed=4, dtype=F64)
    weights = {k: v * 2.0 for k, v in base.weights.items()}
    weights["W_iz"][:, 0] = 1.0  # feature 0 drives a_z to ≈ +40 on the stretch and is zero elsewhere
    weights["W_ir"][:, 0] = 0.0
    weights["W_in"][:, 0] = 0.0
    x = torch.cat([torch.zeros(TZ, B, 1, dtype=F64), _randn(TZ, B, I, seed=5)], dim=-1)
    x[STRETCH[0] : STRETCH[1], :, 0] = 40.0
    trace = gl.Model(gl.GRU(weights)).trace(x)
    anchor = STRETCH[1] - 1
    pr = gl.propagation(trace, anchors=[anchor, TZ - 1])
    span = STRETCH[1] - STRETCH[0]
    inside = pr.log_singular_values[0, : span + 1]  # Π over steps of the stretch only
    assert inside.abs().max() < 1e-12  # every singular value ≈ 1: Π ≈ I
    outside = pr.log_norm[0, span + 1 : anchor + 2]  # the product reaches steps before the stretch
    assert torch.all(outside.abs() > 1e-3)
    # from the last step: the norm stays constant while the product crosses the stretch (lags 3..9)
    after = TZ - STRETCH[1]  # lags covering only the steps after the stretch
    crossing = pr.log_norm[1, after : after + span + 1]
    assert torch.all((crossing - pr.log_norm[1, after]).abs() < 1e-12)
    assert torch.all((pr.log_norm[1, after + span + 1] - pr.log_norm[1, after]).abs() > 1e-3)


def test_open_update_gate_by_bias_everywhere() -> None:
    base = gl.GRU.random(I, 4, seed=6, dtype=F64)
    weights = dict(base.weights)
    weights["b_iz"] = torch.full((4,), 20.0, dtype=F64)
    weights["b_hz"] = torch.full((4,), 20.0, dtype=F64)
    trace = gl.Model(gl.GRU(weights)).trace(_randn(T, B, I, seed=7))
    pr = gl.propagation(trace, anchors=list(range(T)))
    values = pr.log_singular_values
    assert values[~torch.isnan(values)].abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# c. Elman with W_hh = a·Q at h = 0: J = a·Q, so every singular value of Π_ℓ is a^ℓ.


def _orthogonal_elman(a: float, size: int, dtype: torch.dtype) -> gl.Model:
    q, _ = torch.linalg.qr(_randn(size, size, seed=8))
    weights = {"W_ih": torch.zeros(size, 1, dtype=F64), "W_hh": a * q}
    return gl.Model(gl.Elman({k: v.to(dtype) for k, v in weights.items()}))


@pytest.mark.parametrize("a", [0.5, 2.0, 1.0])
def test_scaled_orthogonal_elman_float64(a: float) -> None:
    steps = 300
    trace = _orthogonal_elman(a, 5, F64).trace(torch.zeros(steps, 2, 1, dtype=F64))
    pr = gl.propagation(trace, anchors=[steps - 1, 100])
    lags = torch.arange(steps + 1, dtype=F64)
    expected = lags * math.log(a)
    assert pr.anchors.tolist() == [100, steps - 1]
    got = pr.log_singular_values[1]  # (T+1, B, S)
    assert torch.all((got - expected[:, None, None]).abs() <= 1e-10 * lags.clamp_min(1)[:, None, None])
    assert torch.all((pr.log_norm[0, :102] - expected[:102, None]).abs() <= 1e-10 * lags[:102, None].clamp_min(1))
    assert torch.all(torch.isnan(pr.log_norm[0, 102:]))
    frobenius = expected + 0.5 * math.log(5)
    assert torch.all((pr.log_frobenius[1] - frobenius[:, None]).abs() <= 1e-10 * lags.clamp_min(1)[:, None])


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_scaled_orthogonal_elman_float32_long_lags_do_not_underflow(a: float) -> None:
    steps = 10_000
    trace = _orthogonal_elman(a, 4, torch.float32).trace(torch.zeros(steps, 1, 1))
    pr = gl.propagation(trace)
    values = pr.log_singular_values[0, :, 0]  # (T+1, S)
    assert values.dtype == torch.float32
    assert torch.all(torch.isfinite(values))
    lags = torch.arange(steps + 1, dtype=F64)
    expected = lags * math.log(a)
    error = (values.double() - expected[:, None]).abs()
    assert torch.all(error <= 1e-3 * expected.abs()[:, None] + 1e-5), float(error.max())
    assert abs(float(pr.log_norm[0, steps, 0]) - steps * math.log(a)) <= 1e-3 * steps * abs(math.log(a))


# ---------------------------------------------------------------------------------------------------------------
# d. horizon


def oracle_horizon(jacobians: Tensor, anchors: list[int], eps: float) -> Tensor:
    result = torch.full((len(anchors), jacobians.shape[1]), -1, dtype=torch.long)
    for a, anchor in enumerate(anchors):
        for lag, product in enumerate(explicit_products(jacobians, anchor)):
            norm = torch.linalg.matrix_norm(product, ord=2)
            result[a] = torch.where((result[a] < 0) & (norm < eps), lag, result[a])
    return result


@pytest.mark.parametrize("eps", [2.0, 0.9, 0.3, 1e-2, 1e-4, 1e-300])
@pytest.mark.parametrize("case", ["rnn-tanh", "gru-padded", "lstm-proj"])
def test_horizon_matches_the_oracle(case: str, eps: float) -> None:
    build, layer, direction, lengths = CASES[case]
    trace = build().trace(_randn(T, B, I, seed=1), lengths=lengths)
    pr = gl.propagation(trace, anchors=ANCHORS, layer=layer, direction=direction)
    expected = oracle_horizon(trace.jacobians(layer=layer, direction=direction), pr.anchors.tolist(), eps)
    horizon = pr.horizon(eps)
    assert horizon.shape == (len(pr.anchors), B)
    assert horizon.tolist() == expected.tolist()


def test_horizon_of_the_orthogonal_elman() -> None:
    steps = 40
    trace = _orthogonal_elman(0.5, 3, F64).trace(torch.zeros(steps, 1, 1, dtype=F64))
    pr = gl.propagation(trace, anchors=[0, 8, 9, steps - 1])
    # 0.5^ℓ < 1e-3 first at ℓ = 10 (0.5^10 ≈ 9.8e-4); anchor a reaches lags up to a + 1
    assert pr.horizon(1e-3).flatten().tolist() == [-1, -1, 10, 10]
    assert pr.horizon(0.6).flatten().tolist() == [1, 1, 1, 1]
    assert pr.horizon(1e-300).flatten().tolist() == [-1, -1, -1, -1]
    never = gl.propagation(_orthogonal_elman(1.0, 3, F64).trace(torch.zeros(steps, 1, 1, dtype=F64)))
    assert never.horizon(0.999).tolist() == [[-1]]


# ---------------------------------------------------------------------------------------------------------------
# e. Bad input


@pytest.fixture
def trace() -> gl.Trace:
    return gl.load(_torch("GRU")).trace(_randn(T, B, I, seed=1))


@pytest.mark.parametrize("anchors", [-1, T, [0, T], [-1, 2], np.int64(T)])
def test_anchors_out_of_range(trace: gl.Trace, anchors: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"anchors must lie in 0..{T - 1}")):
        gl.propagation(trace, anchors=anchors)


@pytest.mark.parametrize("anchors", [[], 1.5, [1.0, 2.0], True, [True]])
def test_anchors_not_ints(trace: gl.Trace, anchors: object) -> None:
    with pytest.raises(TypeError, match="anchors must be an int or a non-empty list of ints"):
        gl.propagation(trace, anchors=anchors)


def test_anchors_are_sorted_and_unique(trace: gl.Trace) -> None:
    pr = gl.propagation(trace, anchors=torch.tensor([5, 1, 5, 0]))
    assert pr.anchors.tolist() == [0, 1, 5]
    assert pr.log_singular_values.shape[0] == 3


@pytest.mark.parametrize("eps", [0, 0.0, -1e-3, math.nan, math.inf, True, "0.1", None])
def test_horizon_eps_must_be_positive_and_finite(trace: gl.Trace, eps: object) -> None:
    pr = gl.propagation(trace)
    with pytest.raises(ValueError, match=re.escape(f"eps must be a positive finite number, got {eps!r}")):
        pr.horizon(eps)  # type: ignore[arg-type]


@pytest.mark.parametrize("lag", [1.0, "1", True, None, -1, T + 1])
def test_singular_values_lag_must_be_an_int_in_range(trace: gl.Trace, lag: object) -> None:
    pr = gl.propagation(trace)
    with pytest.raises(ValueError, match=re.escape(f"lag must be an int in 0..{T}, got {lag!r}")):
        pr.singular_values(lag)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_lag", [0, -2, 1.5, True])
def test_max_lag_must_be_a_positive_int(trace: gl.Trace, max_lag: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"max_lag must be a positive int, got {max_lag!r}")):
        gl.propagation(trace, max_lag=max_lag)  # type: ignore[arg-type]


def test_recurrence_choice_is_checked() -> None:
    bidirectional = gl.load(_torch("GRU", bidirectional=True)).trace(_randn(T, B, I, seed=1))
    with pytest.raises(ValueError, match="pass layer="):
        gl.propagation(bidirectional)
    with pytest.raises(ValueError, match=re.escape("layer must be an int in 0..0, got 1")):
        gl.propagation(bidirectional, layer=1, direction="reverse")
    with pytest.raises(ValueError, match="unknown direction 'backward'"):
        gl.propagation(bidirectional, layer=0, direction="backward")
    unidirectional = gl.load(_torch("GRU")).trace(_randn(T, B, I, seed=1))
    with pytest.raises(ValueError, match="direction='reverse': this unidirectional model reads sequences forward only"):
        gl.propagation(unidirectional, direction="reverse")


def test_to_dict_is_json(trace: gl.Trace) -> None:
    data = json.loads(json.dumps(gl.propagation(trace, anchors=[1, 4]).to_dict()))
    assert data["anchors"] == [1, 4]
    assert data["log_norm"][0][0] == [0.0] * B
    assert data["log_norm"][0][3] == [None] * B  # lag 3 > t = 2


def test_an_exactly_zero_product_is_minus_infinity_and_none_in_json() -> None:
    module = nn.RNN(3, 4, nonlinearity="relu").double()
    with torch.no_grad():
        module.bias_ih_l0.fill_(-100.0)  # every unit off: J = 0
    pr = gl.propagation(gl.load(module).trace(torch.randn(5, 2, 3, dtype=torch.float64)))
    assert pr.log_norm[0, 1:, :].isneginf().all()
    data = json.loads(json.dumps(pr.to_dict(), allow_nan=False))
    assert data["log_norm"][0][0] == [0.0, 0.0] and data["log_norm"][0][1] == [None, None]


@pytest.mark.parametrize(
    ("anchors", "error"), [("3", TypeError), (["a"], TypeError), ([1, None], TypeError), ([[1, 2]], ValueError)]
)
def test_anchors_that_are_not_step_indices(anchors: object, error: type) -> None:
    trace = gl.load(nn.GRU(3, 4).double()).trace(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(error, match="anchors must be"):
        gl.propagation(trace, anchors=anchors)
