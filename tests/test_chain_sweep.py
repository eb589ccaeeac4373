"""The all-chains sweep behind ``by_lag`` and ``norms`` (``chain_sweep``), against itself and BPTT.

* Streamed equals unstreamed: windows of one step each (the smallest budget) give the lag sums, pair norms and summed
  adjoints of the default windows to 1e-10 in float64, for dense and sparse loss steps, padding, and every cell kind;
  the summed adjoints equal a BPTT sweep's.
* Moving the chains through Jacobians formed a window at a time equals moving them by the state VJP.
* ``CreditMap.compute`` gives what the properties give one at a time.
* float32 pair norms keep their digits far from 1: a loss scaled by 1e-30 or 1e25 scales every norm exactly.
* The windows cover every step once, stay at least half full and within their budget.
"""

from __future__ import annotations

import sys

import pytest
import torch

import gatelens as gl
from gatelens.analysis.credit import chain_sweep, summed_adjoints
from tests.cell_configs import relative_error

credit_module = sys.modules["gatelens.analysis.credit"]
F64 = torch.float64
T, B, I = 40, 3, 3
TOL = 1e-10

CELLS = {
    "gru-after": lambda: [gl.GRU.random(I, 5, seed=1, dtype=F64)],
    "gru-before-replace": lambda: [gl.GRU.random(I, 5, reset="before", update="replace", seed=1, dtype=F64)],
    "elman": lambda: [gl.Elman.random(I, 5, seed=2, dtype=F64)],
    "lstm-proj": lambda: [gl.LSTM.random(I, 4, projection=2, seed=3, dtype=F64)],
    "stack-gru-lstm": lambda: [gl.GRU.random(I, 4, seed=5, dtype=F64), gl.LSTM.random(4, 3, seed=6, dtype=F64)],
}
LOSS_STEPS = {"dense": slice(None), "sparse": [3, 4, 5, 17, 30, 39], "one": [25]}


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _stream(cells: str, loss_steps: str, padded: bool) -> tuple[gl.Recurrence, torch.Tensor]:
    trace = gl.Model(CELLS[cells]()).trace(_randn(T, B, I, seed=4), lengths=[T, 23, 31] if padded else None)
    out_grads = torch.zeros_like(trace.output)
    out_grads[LOSS_STEPS[loss_steps]] = _randn(*trace.output.shape, seed=5)[LOSS_STEPS[loss_steps]]
    ((rec, g),) = gl.credit(trace, out_grads).streams
    return rec, g


def _all_lags(sums: torch.Tensor, steps: int) -> torch.Tensor:
    """Lag sums over every lag 0..steps − 1: the sweep holds those its chains reached, the rest are 0."""
    return torch.cat([sums, sums.new_zeros(steps - len(sums), *sums.shape[1:])])


def _assert_same_sweep(got: credit_module.ChainSweep, expected: credit_module.ChainSweep, tol: float) -> None:
    assert set(got.lag_sums) == set(expected.lag_sums) and set(got.pair_norms) == set(expected.pair_norms)
    for name, sums in expected.lag_sums.items():
        assert relative_error(_all_lags(got.lag_sums[name], T), _all_lags(sums, T)) <= tol, name
    for name, norms in expected.pair_norms.items():
        assert relative_error(got.pair_norms[name], norms) <= tol, name
    assert relative_error(got.adjoints, expected.adjoints) <= tol


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("loss_steps", list(LOSS_STEPS))
@pytest.mark.parametrize("cells", list(CELLS))
def test_streamed_equals_unstreamed_and_the_adjoints_equal_bptt(cells: str, loss_steps: str, padded: bool) -> None:
    rec, g = _stream(cells, loss_steps, padded)
    options = {"lag_sums": True, "pair_norms": True, "adjoints": True}
    whole = chain_sweep(rec, g, **options)
    streamed = chain_sweep(rec, g, **options, budget=1)  # one step per window
    _assert_same_sweep(streamed, whole, TOL)
    assert relative_error(whole.adjoints, summed_adjoints(rec, g)) <= TOL


@pytest.mark.parametrize("cells", ["gru-after", "lstm-proj", "stack-gru-lstm"])
def test_chains_moved_through_formed_jacobians_equal_the_state_vjp(cells: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rec, g = _stream(cells, "dense", padded=True)
    assert credit_module._formed_jacobians(rec, 0, 3, T) is not None  # T chains ≥ S: formed
    formed = chain_sweep(rec, g, lag_sums=True, pair_norms=True, adjoints=True)
    monkeypatch.setattr(credit_module, "_formed_jacobians", lambda *_: None)
    _assert_same_sweep(chain_sweep(rec, g, lag_sums=True, pair_norms=True, adjoints=True), formed, 1e-12)


@pytest.mark.parametrize("loss_steps", ["dense", "one"])
def test_compute_gives_what_the_properties_give_one_at_a_time(loss_steps: str) -> None:
    trace = gl.Model(CELLS["stack-gru-lstm"]()).trace(_randn(T, B, I, seed=4), lengths=[T, 23, 31])
    out_grads = torch.zeros_like(trace.output)
    out_grads[LOSS_STEPS[loss_steps]] = _randn(*trace.output.shape, seed=5)[LOSS_STEPS[loss_steps]]
    together = gl.credit(trace, out_grads).compute()
    apart = gl.credit(trace, out_grads)
    assert set(together.to_dict()) == {"total", "by_source", "by_lag", "norms"}
    for field in ("total", "by_source", "by_lag", "norms"):
        for name, value in getattr(apart, field).items():
            assert relative_error(getattr(together, field)[name], value) <= 1e-12, (field, name)


def test_compute_names_the_fields_it_knows() -> None:
    trace = gl.Model(CELLS["gru-after"]()).trace(_randn(5, B, I, seed=4))
    with pytest.raises(ValueError, match="unknown field.*'lags'.*by_lag"):
        gl.credit(trace, torch.ones_like(trace.output)).compute("lags")


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_float32_pair_norms_keep_their_digits_far_from_one(scale: float) -> None:
    """Each cell of the lag layout is scaled by a power of two before its sums of squares: the norms of a loss
    scaled by 1e-30 (squares below float32's range) or 1e25 (above it) are those of the loss, scaled."""
    cell = gl.GRU.random(I, 8, seed=1)
    trace = gl.Model(cell).trace(_randn(30, B, I, seed=4).float())
    out_grads = _randn(*trace.output.shape, seed=5).float()
    reference = gl.credit(trace, out_grads).norms
    scaled = gl.credit(trace, out_grads * scale).norms
    for name, norms in reference.items():
        kept = norms > 1e-30  # far above the range where float32 flushes the scaled values
        assert relative_error(scaled[name][kept].double() / scale, norms[kept].double()) <= 1e-5, name


@pytest.mark.parametrize("by_lag", [True, False], ids=["by-lag", "by-chain"])
@pytest.mark.parametrize("losses", [list(range(50)), [0, 1, 2, 20, 21, 40, 49], [7], list(range(0, 50, 5))])
@pytest.mark.parametrize("budget", [1, 4000, 1 << 24])
def test_windows_cover_every_step_once_at_least_half_full_within_budget(
    losses: list[int], budget: int, by_lag: bool
) -> None:
    per_cell, last, steps = 6, losses[-1], []
    while last >= 0:
        first, low, high = credit_module._window(losses, len(losses), last, per_cell, budget, by_lag=by_lag)
        steps += range(last, first - 1, -1)
        chains = [[t - step for t in losses if t >= step] for step in range(first, last + 1)]
        assert low == min(lags[0] for lags in chains) and high == max(lags[-1] for lags in chains)
        cells = ((high + 1 - low) if by_lag else len(chains[0])) * (last + 1 - first)
        assert first == last or 2 * sum(map(len, chains)) >= cells
        assert first == last or cells * per_cell * credit_module.PAIR_TEMPORARIES <= budget
        last = first - 1
    assert steps == list(range(losses[-1], -1, -1))


@pytest.mark.parametrize("losses", [[40, 41, 42, 150, 299], [40, 42, 43, 44, 45, 299]], ids=["runs", "gaps"])
def test_chains_that_vanish_to_zero_are_dropped_and_read_zero(losses: list[int]) -> None:
    """A contracting float32 GRU: chains flushed to exactly 0 leave the sweep (with ``gaps``, every chain has left
    when the next loss steps, not consecutive, start a window). Its results equal float64's (where chains stay far
    above 0) wherever those are normal float32 numbers, and are 0 where those are below them."""
    cell = gl.GRU({name: weight * 0.3 for name, weight in gl.GRU.random(I, 6, seed=1, dtype=F64).weights.items()})
    x = _randn(300, B, I, seed=4)
    out_grads = torch.zeros(300, B, 6, dtype=F64)
    out_grads[losses] = _randn(len(losses), B, 6, seed=5)
    sweeps: dict[torch.dtype, credit_module.ChainSweep] = {}
    for dtype in (torch.float32, F64):
        trace = gl.Model(cell.to(dtype)).trace(x.to(dtype))
        ((rec, g),) = gl.credit(trace, out_grads.to(dtype)).streams
        sweeps[dtype] = chain_sweep(rec, g, lag_sums=True, pair_norms=True, adjoints=True)
    single, exact = sweeps[torch.float32], sweeps[F64]
    tiny = torch.finfo(torch.float32).tiny
    assert bool((exact.pair_norms["l0.W_hz"][-1, :100] < tiny).all()), "the last chain should vanish in float32"
    for name, norms in exact.pair_norms.items():
        normal = norms >= 1e3 * tiny
        assert relative_error(single.pair_norms[name][normal].double(), norms[normal]) <= 1e-4, name
        assert bool((single.pair_norms[name][norms < tiny / 2] == 0).all()), name
    for name, sums in exact.lag_sums.items():
        profile = _all_lags(sums, 300).flatten(1).norm(dim=1)
        single_profile = _all_lags(single.lag_sums[name].double(), 300).flatten(1).norm(dim=1)
        normal = profile >= 1e3 * tiny
        assert relative_error(single_profile[normal], profile[normal]) <= 1e-4, name
