"""The report's figures draw exactly the analyses' numbers.

Each figure is built from analysis results of a GRU, an Elman RNN, an LSTM and a 2-layer GRU stack, in float32 and
float64, with and without padding (lengths that leave the last steps with no valid sequence at all), and then
rendered to PNG, so warnings raised while drawing (pytest turns them into errors) fail the test. The data of each
artist is read back from the figure and compared with the analysis arrays or with an independent recomputation:
Jacobian norms and path shares from ``trace.jacobians`` / ``trace.jacobian_paths``, heatmap images against
``CreditMap.norms``, lag lines against ``by_lag`` and ``Propagation.log_norm``, the regime image against the codes,
timescales, local gradients and Lyapunov exponents against their results. Bad input must raise one TypeError or
ValueError naming what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct

import numpy as np
import pytest
import torch
from matplotlib.collections import Collection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

import gatelens as gl
from gatelens.analysis.regimes import PADDING, REGIMES, UNIT_KINDS
from gatelens.report import figures
from tests.cell_configs import scaled

T, B, I = 12, 4, 3
LENGTHS = [10, 7, 3, 9]  # steps 11 and 12 lie past the end of every sequence
KINDS = ["gru", "elman", "lstm", "stack"]
DTYPES = [torch.float32, torch.float64]
F32, F64 = DTYPES
# (kind, dtype, padded): every kind in both dtypes, padded in one of them; the padded case of each kind is also
# rendered (rendering takes most of the time, and draws the same way in either dtype)
CASES = [
    ("gru", F32, True),
    ("gru", F64, False),
    ("elman", F32, False),
    ("elman", F64, True),
    ("lstm", F32, True),
    ("lstm", F64, False),
    ("stack", F32, False),
    ("stack", F64, True),
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _id(case: tuple) -> str:
    kind, dtype, padded = case
    return f"{kind}-{str(dtype).split('.')[-1]}" + ("-padded" if padded else "")


def _cells(kind: str, dtype: torch.dtype) -> list[gl.Cell]:
    """Small cells with weights scaled up, so that gates saturate and every regime occurs."""
    if kind == "gru":
        return [scaled(gl.GRU.random(I, 6, seed=1, dtype=dtype), 3.0)]
    if kind == "elman":
        return [gl.Elman.random(I, 6, seed=2, dtype=dtype)]
    if kind == "lstm":
        return [scaled(gl.LSTM.random(I, 5, seed=3, dtype=dtype), 2.0)]
    return [scaled(gl.GRU.random(I, 5, seed=4, dtype=dtype), 3.0), gl.GRU.random(5, 4, seed=5, dtype=dtype)]


@functools.cache
def _trace(kind: str, dtype: torch.dtype, padded: bool, batch: int = B) -> gl.Trace:
    x = torch.randn(T, batch, I, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return gl.Model(_cells(kind, dtype)).trace(x, lengths=LENGTHS[:batch] if padded else None)


@functools.cache
def _credit(kind: str, dtype: torch.dtype, padded: bool) -> gl.CreditMap:
    """A loss on the second half of the steps only: the rows of the first half are exactly zero."""
    trace = _trace(kind, dtype, padded)
    out_grads = torch.randn(trace.output.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out_grads[: T // 2] = 0.0
    return gl.credit(trace, out_grads)


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().to(torch.float64).numpy()


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


def _valid(trace: gl.Trace) -> np.ndarray:
    """(T, B): the steps inside each sequence."""
    if trace.lengths is None:
        return np.ones((T, trace.inputs.shape[1]), dtype=bool)
    return np.arange(T)[:, None] < trace.lengths.numpy()[None, :]


def _line(ax, label: str):
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


def _envelope(collection: Collection) -> dict[float, tuple[float, float]]:
    """x ↦ (lowest, highest) y over the vertices of a filled area (fill_between, one layer of a stackplot)."""
    bounds: dict[float, tuple[float, float]] = {}
    for path in collection.get_paths():
        for x, y in path.vertices:
            low, high = bounds.get(float(x), (math.inf, -math.inf))
            bounds[float(x)] = (min(low, y), max(high, y))
    return bounds


def _assert_edges(collection: Collection, x: np.ndarray, low: np.ndarray, high: np.ndarray, rtol: float) -> None:
    """The area spans low..high at every x where they are defined, and has no vertex where they are not."""
    bounds = _envelope(collection)
    for xi, lo, hi in zip(x, low, high):
        if np.isnan(hi):
            assert float(xi) not in bounds
            continue
        np.testing.assert_allclose(bounds[float(xi)], (lo, hi), rtol=rtol, atol=1e-12)


def _png(figure: Figure) -> bytes:
    """Render (a warning raised while drawing fails the test) and check that the bytes are a PNG."""
    png = figures.to_png(figure)
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    return png


# ---------------------------------------------------------------------------------------------------------------
# Jacobian norms and path shares.


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_jacobian_figure_draws_norms_and_path_shares(case):
    kind, dtype, padded = case
    trace = _trace(*case)
    figure = figures.jacobian_figure(trace)
    top, bottom = figure.axes[:2]
    steps = np.arange(1, T + 1)
    valid = _valid(trace)
    rtol = _tolerance(dtype)

    norms = np.where(valid, _numpy(torch.linalg.matrix_norm(trace.jacobians(), ord=2)), np.nan)
    median, low, high = (np.full(T, np.nan) for _ in range(3))
    for i in range(T):
        if valid[i].any():
            median[i], low[i], high[i] = (np.quantile(norms[i, valid[i]], q) for q in (0.5, 0.1, 0.9))
    line = _line(top, "median over sequences")
    np.testing.assert_array_equal(line.get_xdata(), steps)
    spectral = max(rtol, 1e-5)  # ‖J_t‖₂ by subspace iteration: within 1e-6 relative (figures.jacobian_figure)
    np.testing.assert_allclose(line.get_ydata(), median, rtol=spectral)
    _assert_edges(top.collections[0], steps, low, high, spectral)
    if padded:
        assert np.isnan(line.get_ydata()[-2:]).all()  # no sequence reaches steps 11 and 12

    paths = trace.jacobian_paths()
    paths.pop("padding", None)
    names = list(trace.recurrence().cell.path_names)
    assert list(paths) == names
    flows = np.stack([_numpy(torch.linalg.matrix_norm(paths[name])) for name in names])  # (P, T, B)
    total = flows.sum(0)
    shares = np.divide(flows, total, out=np.full_like(flows, np.nan), where=valid & (total > 0))
    mean = np.full((len(names), T), np.nan)  # (P, T): over the sequences inside each step
    for i in range(T):
        if valid[i].any():
            mean[:, i] = shares[:, i, valid[i]].mean(1)
    layers = bottom.collections
    assert len(layers) == len(names)
    for index, layer in enumerate(layers):
        _assert_edges(layer, steps, mean[:index].sum(0), mean[: index + 1].sum(0), rtol)
    legend = [text.get_text() for text in bottom.get_legend().get_texts()]
    assert legend == names[::-1]  # the top of the stack first
    if kind == "stack":
        assert names[0] == "l0.carry" and "l1.reset" in names
    if padded:
        _png(figure)


def test_jacobian_figure_chooses_the_recurrence():
    x = torch.randn(T, 2, I, generator=torch.Generator().manual_seed(3))
    bidirectional = gl.Model([(gl.GRU.random(I, 4, seed=6), gl.GRU.random(I, 4, seed=7))]).trace(x)
    figure = figures.jacobian_figure(bidirectional, layer=0, direction="reverse")
    assert "l0_reverse" in figure.axes[0].get_title()
    assert "reverse" in figure.axes[1].get_xlabel()
    expected = np.median(_numpy(torch.linalg.matrix_norm(bidirectional.jacobians(0, "reverse"), ord=2)), axis=1)
    np.testing.assert_allclose(_line(figure.axes[0], "median over sequences").get_ydata(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="bidirectional model is not one recurrence"):
        figures.jacobian_figure(bidirectional)
    layer = figures.jacobian_figure(_trace("stack", torch.float64, False), layer=1)
    assert [t.get_text() for t in layer.axes[1].get_legend().get_texts()] == ["reset", "candidate", "update", "carry"]
    with pytest.raises(TypeError, match=r"jacobian_figure needs a Trace .*, got Tensor"):
        figures.jacobian_figure(bidirectional.output)


# ---------------------------------------------------------------------------------------------------------------
# Credit maps and lags.


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_credit_heatmap_shows_the_norms_on_one_log_scale(case):
    kind, dtype, padded = case
    credit = _credit(*case)
    figure = figures.credit_heatmap(credit)
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(credit.norms) == list(credit.trace.model.weights)
    images = [ax.images[0] for ax in panels]
    norm = images[0].norm
    assert isinstance(norm, LogNorm) and all(image.norm is norm for image in images)
    largest = max(float(values.max()) for values in credit.norms.values())
    assert norm.vmax == pytest.approx(largest, rel=1e-15)
    for image, values in zip(images, credit.norms.values()):
        expected = _numpy(values)
        shown = image.get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(shown), expected <= 0)  # k > t, and t before the loss
        np.testing.assert_array_equal(shown.compressed(), expected[expected > 0])
        assert np.ma.getmaskarray(shown)[: T // 2].all() and np.ma.getmaskarray(shown)[T // 2 :].sum() < T * T
        assert image.get_extent() == [0.5, T + 0.5, T + 0.5, 0.5]  # rows t = 1..T from the top, columns k = 1..T
    assert figure.axes[-1].get_ylabel() == "‖C(t, k)‖_F"  # the shared colour bar
    if kind == "stack" and padded:  # 24 panels, the slowest to draw: one of them is enough
        _png(figure)


def test_credit_heatmap_blocks():
    credit = _credit("stack", torch.float64, False)
    figure = figures.credit_heatmap(credit, blocks=["l1.W_hz", "l0.W_iz"])
    assert [ax.get_title() for ax in figure.axes if ax.images] == ["l1.W_hz", "l0.W_iz"]
    np.testing.assert_array_equal(figure.axes[0].images[0].get_array().filled(0.0), _numpy(credit.norms["l1.W_hz"]))
    one = figures.credit_heatmap(credit, blocks="l0.b_hn")
    assert [ax.get_title() for ax in one.axes if ax.images] == ["l0.b_hn"]
    _png(one)
    with pytest.raises(
        ValueError, match=r"unknown weight block 'l0\.W_zz'; this model's blocks are l0\.W_ir, .*l1\.b_hn"
    ):
        figures.credit_heatmap(credit, blocks=["l0.W_iz", "l0.W_zz"])
    with pytest.raises(ValueError, match="blocks is empty; choose from l0.W_ir"):
        figures.credit_heatmap(credit, blocks=[])
    with pytest.raises(TypeError, match="blocks must be a block name or a list of them, got 3"):
        figures.credit_heatmap(credit, blocks=3)
    with pytest.raises(TypeError, match=r"credit_heatmap needs a CreditMap \(from gl.credit\), got Trace"):
        figures.credit_heatmap(credit.trace)


def test_credit_heatmap_says_when_reverse_blocks_are_in_processing_order():
    trace = gl.load(torch.nn.GRU(2, 3, bidirectional=True).double()).trace(torch.randn(6, 2, 2, dtype=torch.float64))
    credit = gl.credit(trace, torch.randn_like(trace.output))
    both = figures.credit_heatmap(credit, blocks=["l0.W_hz", "l0_reverse.W_hz"])
    forward = figures.credit_heatmap(credit, blocks=["l0.W_hz"])
    assert "processing order" in both._suptitle.get_text() and "processing order" not in forward._suptitle.get_text()


def test_credit_heatmap_without_any_credit():
    """A zero loss: nothing positive to colour, and no warning from LogNorm."""
    trace = _trace("gru", torch.float32, False)
    credit = gl.credit(trace, torch.zeros_like(trace.output))
    figure = figures.credit_heatmap(credit, blocks=["l0.W_hz"])
    assert figure.axes[0].images[0].get_array().mask.all()
    assert [t.get_text() for t in figure.axes[0].texts] == ["no credit"]
    _png(figure)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lag_profile_draws_by_lag_and_propagation(case):
    kind, dtype, padded = case
    credit = _credit(*case)
    trace = credit.trace
    flow = gl.propagation(trace, anchors=[T - 1, 4])
    eps = 0.05
    figure = figures.lag_profile(credit, flow, eps=eps)
    left, right = figure.axes
    assert [line.get_label() for line in left.get_lines()] == list(credit.by_lag)
    for line, values in zip(left.get_lines(), credit.by_lag.values()):
        expected = _numpy(values)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(T))
        np.testing.assert_array_equal(line.get_ydata(), np.where(expected > 0, expected, np.nan))

    log_norm = _numpy(flow.log_norm)  # (A, T+1, B)
    assert _line(right, f"ln ε (ε = {eps:g})").get_ydata()[0] == pytest.approx(math.log(eps))
    for index, anchor in enumerate(flow.anchors.tolist()):
        line = _line(right, f"median, t = {anchor + 1}")
        median = np.array([np.median(row) if not np.isnan(row).any() else np.nan for row in log_norm[index]])
        np.testing.assert_array_equal(line.get_xdata(), np.arange(T + 1))
        np.testing.assert_allclose(line.get_ydata(), median, rtol=1e-12)
        below = np.flatnonzero(median < math.log(eps))
        horizons = [ln for ln in right.get_lines() if ln.get_label().endswith(f"(t = {anchor + 1})")]
        assert [ln.get_xdata()[0] for ln in horizons] == below[:1].tolist()
    if kind == "stack" and padded:  # the most lines; drawing every case would add seconds, not coverage
        _png(figure)


def test_lag_profile_alone_and_bad_input():
    credit = _credit("gru", torch.float64, True)
    figure = figures.lag_profile(credit, blocks=["l0.W_hz", "l0.W_hr"])
    assert len(figure.axes) == 1
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["l0.W_hz", "l0.W_hr"]
    assert figure.axes[0].get_yscale() == "log"
    _png(figure)
    with pytest.raises(TypeError, match=r"lag_profile needs a Propagation \(from gl.propagation\) or None, got dict"):
        figures.lag_profile(credit, {})
    with pytest.raises(ValueError, match="eps must be a positive finite number, got 0"):
        figures.lag_profile(credit, eps=0)
    with pytest.raises(ValueError, match="unknown weight block 'W_hz'"):
        figures.lag_profile(credit, blocks=["W_hz"])
    with pytest.raises(TypeError, match="lag_profile needs a CreditMap"):
        figures.lag_profile(gl.propagation(credit.trace))


# ---------------------------------------------------------------------------------------------------------------
# Gate regimes and timescales.


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_regime_map_shows_the_codes(case):
    kind, dtype, padded = case
    regimes = gl.regimes(_trace(*case))
    sequence = 2  # the shortest sequence when padded: length 3
    figure = figures.regime_map(regimes, sequence=sequence)
    ax = figure.axes[0]
    codes = regimes.codes[:, sequence, :].T.numpy()  # (U, T)
    np.testing.assert_array_equal(ax.images[0].get_array(), codes)
    assert [t.get_text() for t in ax.get_yticklabels()] == regimes.unit_labels
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    valid = (codes != PADDING).sum()
    assert legend[:4] == [f"{name} ({(codes == code).sum() / valid:.0%})" for code, name in enumerate(REGIMES)]
    assert (legend[4:] == ["past the end"]) == padded
    if padded:
        assert (codes[:, 3:] == PADDING).all() and (codes[:, :3] != PADDING).all()
    colours = ax.images[0].cmap(ax.images[0].norm(np.arange(PADDING, len(REGIMES))))
    assert len({tuple(colour) for colour in colours}) == len(REGIMES) + 1  # one colour per category
    if padded:
        _png(figure)


def test_regime_map_bad_input():
    regimes = gl.regimes(_trace("gru", torch.float64, False))
    with pytest.raises(ValueError, match=r"sequence must lie in 0..3 \(the batch has 4 sequences\), got 4"):
        figures.regime_map(regimes, sequence=4)
    with pytest.raises(TypeError, match="sequence must be an int, got '0'"):
        figures.regime_map(regimes, sequence="0")
    with pytest.raises(TypeError, match=r"regime_map needs a Regimes \(from gl.regimes\), got Trace"):
        figures.regime_map(_trace("gru", torch.float64, False))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_unit_timescales_draws_sorted_tau(case):
    kind, dtype, padded = case
    regimes = gl.regimes(_trace(*case))
    figure = figures.unit_timescales(regimes)
    ax = figure.axes[0]
    tau = _numpy(regimes.timescale)
    points = {}
    for line in ax.get_lines():
        if line.get_marker() == "o":
            kind = line.get_label().split(" (")[0]
            assert kind in UNIT_KINDS and line.get_color() == figures.KIND_COLOURS[kind]
            points |= {int(x): (float(y), kind) for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert sorted(points) == list(range(1, tau.size + 1))
    order = np.argsort(-tau, kind="stable")
    np.testing.assert_array_equal([points[rank][0] for rank in sorted(points)], tau[order])
    assert [points[rank][1] for rank in sorted(points)] == [regimes.unit_kind[j] for j in order]
    assert [t.get_text() for t in ax.get_xticklabels()] == [regimes.unit_labels[j] for j in order]
    bounds = [line.get_ydata()[0] for line in ax.get_lines() if "bound" in line.get_label()]
    assert bounds == [regimes.long_term, regimes.short_term]
    assert ax.get_yscale() == "log"
    if padded:
        _png(figure)


def test_unit_timescales_marks_infinite_tau():
    regimes = gl.regimes(_trace("gru", torch.float64, False), long_term=5, short_term=1.5)
    carry, leak = regimes.carry.clone(), regimes.leak.clone()
    carry[..., 2], leak[..., 2] = 1.0, 0.0  # unit h2 always keeps its value: τ = ∞
    pinned = dataclasses.replace(regimes, carry=carry, leak=leak)
    figure = figures.unit_timescales(pinned)
    ax = figure.axes[0]
    (top,) = [line for line in ax.get_lines() if line.get_marker() == "^"]
    assert top.get_label() == "τ = ∞ (1)" and list(top.get_xdata()) == [1]
    assert ax.get_xticklabels()[0].get_text() == "h2"
    finite = np.concatenate([line.get_ydata() for line in ax.get_lines() if line.get_marker() == "o"])
    assert finite.size == 5 and np.isfinite(finite).all()
    assert [line.get_ydata()[0] for line in ax.get_lines() if "bound" in line.get_label()] == [5, 1.5]
    _png(figure)
    with pytest.raises(TypeError, match="unit_timescales needs a Regimes"):
        figures.unit_timescales({"gru": regimes})


# ---------------------------------------------------------------------------------------------------------------
# Local gradients and Lyapunov exponents.


@pytest.mark.parametrize(("dtype", "padded"), [(F32, True), (F64, False)], ids=["float32-padded", "float64"])
def test_local_gradients_figure_compares_models(dtype, padded):
    named = {kind.upper(): gl.local_gradients(_trace(kind, dtype, padded)) for kind in KINDS}
    figure = figures.local_gradients_figure(named)
    over_time, spread = figure.axes
    assert [line.get_label() for line in over_time.get_lines()] == list(named)
    stairs = spread.patches
    assert len(stairs) == len(named)
    edges = stairs[0].get_data().edges
    for line, patch, result in zip(over_time.get_lines(), stairs, named.values()):
        total = _numpy(result.total)  # (T, B), NaN on padded steps
        valid = ~np.isnan(total)
        largest = np.array([total[i, valid[i]].max() if valid[i].any() else np.nan for i in range(T)])
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, T + 1))
        np.testing.assert_array_equal(line.get_ydata(), largest)
        values = total[valid]
        np.testing.assert_array_equal(patch.get_data().edges, edges)  # shared bins
        shares = patch.get_data().values
        np.testing.assert_allclose(shares * values.size, np.histogram(values, bins=edges)[0], rtol=1e-12)
        assert shares.sum() == pytest.approx(1.0)  # every value is positive and inside the bins
    positive = np.concatenate([_numpy(r.total)[~np.isnan(_numpy(r.total))] for r in named.values()])
    assert edges[0] == pytest.approx(positive.min()) and edges[-1] == pytest.approx(positive.max())
    if padded:
        _png(figure)


def test_local_gradients_figure_one_model_and_bad_input():
    result = gl.local_gradients(_trace("gru", torch.float32, False))
    for named in ({"GRU": result}, result):
        figure = figures.local_gradients_figure(named)
        label = "GRU" if isinstance(named, dict) else "l0"
        assert [line.get_label() for line in figure.axes[0].get_lines()] == [label]
    _png(figure)
    with pytest.raises(ValueError, match="local_gradients_figure needs at least one model.*got an empty one"):
        figures.local_gradients_figure({})
    with pytest.raises(TypeError, match=r"needs a mapping from model names to LocalGradients .*, got list"):
        figures.local_gradients_figure([result])
    with pytest.raises(TypeError, match="for every model; 'Elman' is a Tensor"):
        figures.local_gradients_figure({"GRU": result, "Elman": result.total})
    with pytest.raises(TypeError, match="model names that are strings, got 0"):
        figures.local_gradients_figure({0: result})


def _errorbars(ax):
    """(x, y, half-length of each error bar) of every errorbar series, by label."""
    series = {}
    for container in ax.containers:
        line, _, (bars,) = container.lines
        half = np.array([(s[1][1] - s[0][1]) / 2 if len(s) else np.nan for s in bars.get_segments()])
        series[container.get_label()] = (line.get_xdata(), line.get_ydata(), half)
    return series


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lyapunov_spectrum_draws_sorted_exponents(dtype):
    one = {kind: gl.lyapunov(_trace(kind, dtype, False, batch=1), windows=4) for kind in KINDS}
    figure = figures.lyapunov_spectrum(one)
    ax = figure.axes[0]
    series = _errorbars(ax)
    assert list(series) == KINDS
    for kind, result in one.items():
        x, y, half = series[kind]
        order = np.argsort(-_numpy(result.exponents[0]))
        np.testing.assert_array_equal(x, np.arange(1, order.size + 1))
        np.testing.assert_array_equal(y, _numpy(result.exponents[0])[order])
        np.testing.assert_allclose(half, _numpy(result.stderr[0])[order], rtol=1e-9)
        assert (np.diff(y) <= 0).all()
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("_")][-1] == 0.0
    assert ax.get_ylabel() == "λ_j (nats/step)"
    if dtype == F32:
        _png(figure)


def test_lyapunov_spectrum_pools_sequences_by_counted_steps():
    """With padding and warm-up, sequences weigh by their counted steps; one that counts none is left out."""
    trace = _trace("lstm", torch.float64, True)
    result = gl.lyapunov(trace, warmup=3, windows=2)  # sequence 2 (length 3) counts no step
    figure = figures.lyapunov_spectrum(result)
    ((x, y, half),) = _errorbars(figure.axes[0]).values()
    counted = result.counted.numpy().astype(float)
    assert counted[2] == 0 and np.isnan(_numpy(result.exponents[2])).all()
    exponents, stderr, mean, square = _numpy(result.exponents), _numpy(result.stderr), 0.0, 0.0
    for b in range(B):
        if counted[b]:
            order = np.argsort(-exponents[b])
            mean = mean + counted[b] / counted.sum() * exponents[b][order]
            square = square + (counted[b] / counted.sum() * stderr[b][order]) ** 2
    np.testing.assert_allclose(y, mean, rtol=1e-12)
    np.testing.assert_allclose(half, np.sqrt(square), rtol=1e-9)
    assert np.isnan(half).any() == np.isnan(stderr[counted > 0]).any()  # no bar where a sequence has no error
    _png(figure)


def test_lyapunov_spectrum_bad_input():
    with pytest.raises(ValueError, match="lyapunov_spectrum needs at least one model"):
        figures.lyapunov_spectrum({})
    local = gl.local_gradients(_trace("gru", torch.float64, False))
    with pytest.raises(
        TypeError, match=r"needs Lyapunov results \(from gl.lyapunov\) for every model; 'GRU' is a Local"
    ):
        figures.lyapunov_spectrum({"GRU": local})
    with pytest.raises(TypeError, match="lyapunov_spectrum needs a mapping from model names to Lyapunov results"):
        figures.lyapunov_spectrum(local)


# ---------------------------------------------------------------------------------------------------------------
# A step that cuts the gradient: every figure still draws, without warnings.


def test_figures_across_a_zero_jacobian():
    """z = r = 0 clamped on every unit at step 6 (0-based 5) makes J_6 = 0 exactly (reset "after", update "keep"):
    its norm is 0, it has no path shares, products across it are exactly 0 (ln = −inf) and so is every Lyapunov
    exponent."""
    trace = gl.what_if(_trace("gru", F64, False), clamp={"z": 0.0, "r": 0.0}, steps=[5])
    assert not bool(trace.jacobians()[5].any())

    jacobian = figures.jacobian_figure(trace)
    top, bottom = jacobian.axes[:2]
    assert _line(top, "median over sequences").get_ydata()[5] == 0.0
    for layer in bottom.collections:
        assert 6.0 not in _envelope(layer)  # no shares at step 6: a gap in the stack
    _png(jacobian)

    flow = gl.propagation(trace)
    assert np.isneginf(_numpy(flow.log_norm)[0, T - 5 :]).all()  # lags reaching back across step 6
    lags = figures.lag_profile(gl.credit(trace, torch.ones_like(trace.output)), flow, eps=1e-30)
    right = lags.axes[1]
    median = _line(right, f"median, t = {T}").get_ydata()
    assert np.isfinite(median[: T - 5]).all() and np.isnan(median[T - 5 :]).all()  # −inf is not drawn
    horizon = [line for line in right.get_lines() if line.get_label().startswith("horizon")]
    assert [line.get_xdata()[0] for line in horizon] == [T - 5]  # but counts as below every eps
    _png(lags)

    exponents = gl.lyapunov(trace)
    assert np.isneginf(_numpy(exponents.exponents)).all()
    spectrum = figures.lyapunov_spectrum({"clamped": exponents, "free": gl.lyapunov(_trace("gru", F64, False))})
    labels = [container.get_label() for container in spectrum.axes[0].containers]
    assert labels == ["clamped (6 at −∞)", "free"]
    _png(spectrum)

    zero = gl.credit(trace, torch.zeros_like(trace.output))
    empty = figures.lag_profile(zero, blocks="l0.W_hz")
    assert empty.axes[0].get_yscale() == "linear"  # nothing positive to put on a log scale
    _png(empty)


# ---------------------------------------------------------------------------------------------------------------
# PNG output.


def test_to_png():
    figure = figures.jacobian_figure(_trace("gru", torch.float32, True))
    png = _png(figure)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert png[12:16] == b"IHDR" and (width, height) == (900, 600)
    small = figures.to_png(figure, dpi=50)
    assert struct.unpack(">II", small[16:24]) == (450, 300)
    assert png == figures.to_png(figures.jacobian_figure(_trace("gru", torch.float32, True)))  # reproducible
    with pytest.raises(TypeError, match="to_png needs a matplotlib Figure, got bytes"):
        figures.to_png(png)
    with pytest.raises(ValueError, match="dpi must be a positive number, got 0"):
        figures.to_png(figure, dpi=0)
