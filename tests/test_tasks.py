"""Tasks and simulators against their definitions, re-implemented here as plain loops.

Tasks: the adding problem's markers and sums, the copy task's layout, the multi-timescale delays. Simulators: the
first-order and Wiener–Hammerstein recurrences written out with Python floats; Duffing against an RK4 written here
(same step: equal; a 40 times smaller step: close, with fourth-order convergence) and against the ODE itself
(finite-difference residual). Then reproducibility, dtype and layout options, splits and windows, output-noise
statistics and bad input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gatelens.experiments import (
    Dataset,
    adding_problem,
    aprbs,
    copy_task,
    duffing_oscillator,
    first_order_system,
    multi_timescale,
    wiener_hammerstein,
)

F64 = torch.float64
GENERATORS = {
    "adding_problem": lambda seed, **kw: adding_problem(12, 5, seed, **kw),
    "copy_task": lambda seed, **kw: copy_task(6, 5, seed, symbols=4, length=3, **kw),
    "multi_timescale": lambda seed, **kw: multi_timescale(30, 5, seed, **kw),
    "first_order_system": lambda seed, **kw: first_order_system(60, 5, seed, **kw),
    "wiener_hammerstein": lambda seed, **kw: wiener_hammerstein(60, 5, seed, **kw),
    "duffing_oscillator": lambda seed, **kw: duffing_oscillator(60, 5, seed, **kw),
}
SIMULATORS = ["first_order_system", "wiener_hammerstein", "duffing_oscillator"]


def _runs(row: np.ndarray) -> list[tuple[float, int]]:
    """(level, length) of each run of equal values."""
    runs: list[tuple[float, int]] = []
    for value in row.tolist():
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


# --- tasks against their definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3, 10, 11])
def test_adding_problem_two_markers_one_per_half_and_target_is_their_sum(steps: int) -> None:
    data = adding_problem(steps, 200, seed=3, dtype=F64)
    values, markers = data.inputs[..., 0], data.inputs[..., 1]
    assert data.inputs.shape == (steps, 200, 2) and data.targets.shape == (200, 1) and data.loss_steps == "last"
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    half = steps // 2
    assert (markers[:half].sum(0) == 1).all() and (markers[half:].sum(0) == 1).all()
    for n in range(200):
        marked = [values[t, n].item() for t in range(steps) if markers[t, n] == 1]
        assert data.targets[n, 0].item() == marked[0] + marked[1]
    if steps > 3:  # both halves are used, not one fixed step
        first = markers[:half].argmax(0)
        assert len(first.unique()) == half


def test_copy_task_layout() -> None:
    delay, length, symbols = 7, 4, 5
    data = copy_task(delay, 50, seed=1, symbols=symbols, length=length)
    steps = delay + 2 * length
    assert data.inputs.shape == (steps, 50, symbols + 2) and data.targets.shape == (steps, 50)
    assert data.categories == data.output_size == symbols + 2 and data.targets.dtype == torch.long
    assert data.loss_steps == "all"
    assert (data.inputs.sum(-1) == 1).all() and set(data.inputs.unique().tolist()) == {0.0, 1.0}  # one-hot
    shown = data.inputs.argmax(-1)
    blank, delimiter = 0, symbols + 1
    for n in range(50):
        sequence, target = shown[:, n].tolist(), data.targets[:, n].tolist()
        message = sequence[:length]
        assert all(1 <= symbol <= symbols for symbol in message)
        assert sequence[length:] == [blank] * (delay - 1) + [delimiter] + [blank] * length
        assert target == [blank] * (delay + length) + message
    assert len(shown[:length].unique()) == symbols  # every symbol occurs


def test_multi_timescale_targets_are_exact_delays() -> None:
    delays = (0, 1, 4, 9)
    data = multi_timescale(25, 6, seed=2, delays=delays)
    x = data.inputs[..., 0]
    assert data.inputs.shape == (25, 6, 1) and data.targets.shape == (25, 6, 4) and data.loss_steps == "all"
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    for j, delay in enumerate(delays):
        for t in range(25):
            expected = x[t - delay] if t >= delay else torch.zeros(6)
            assert torch.equal(data.targets[t, :, j], expected)


# --- simulators against their defining equations ---------------------------------------------------------------


def test_aprbs_holds_random_levels_for_random_durations() -> None:
    signal = aprbs(400, 8, seed=4, low=-0.5, high=2.0, min_hold=3, max_hold=9, dtype=F64)
    assert signal.shape == (400, 8, 1)
    lengths = []
    for n in range(8):
        runs = _runs(signal[:, n, 0].numpy())
        assert all(-0.5 <= level <= 2.0 for level, _ in runs)
        assert all(3 <= hold <= 9 for _, hold in runs[:-1]) and runs[-1][1] <= 9  # the last hold is cut at T
        lengths += [hold for _, hold in runs[:-1]]
    assert set(lengths) == set(range(3, 10))


def test_first_order_system_follows_its_recurrence() -> None:
    a, b = 0.8, 0.3
    data = first_order_system(150, 4, seed=5, a=a, b=b, low=-3.0, high=1.0, min_hold=2, max_hold=7, dtype=F64)
    u = data.inputs[..., 0]
    assert torch.equal(data.inputs, aprbs(150, 4, seed=5, low=-3.0, high=1.0, min_hold=2, max_hold=7, dtype=F64))
    for n in range(4):
        y = 0.0
        for t in range(150):
            y = a * y + b * math.tanh(u[t, n].item())
            assert data.targets[t, n, 0].item() == pytest.approx(y, rel=1e-12, abs=1e-14)


def test_wiener_hammerstein_follows_its_difference_equations() -> None:
    data = wiener_hammerstein(120, 3, seed=6, min_hold=1, max_hold=6, dtype=F64)
    u = data.inputs[..., 0]
    for n in range(3):
        u_prev = v1 = v2 = w_prev = y1 = y2 = 0.0
        for t in range(120):
            u_t = u[t, n].item()
            v = 1.5 * v1 - 0.7 * v2 + 0.1 * u_t + 0.1 * u_prev
            w = v + 0.3 * v**2 + 0.2 * v**3
            y = 1.4 * y1 - 0.45 * y2 + 0.025 * w + 0.025 * w_prev
            assert data.targets[t, n, 0].item() == pytest.approx(y, rel=1e-12, abs=1e-14)
            u_prev, v2, v1, w_prev, y2, y1 = u_t, v1, v, w, y1, y


def test_wiener_hammerstein_has_unit_static_gain_through_the_polynomial() -> None:
    """A constant input c settles at G2(1)·f(G1(1)·c) = f(c)."""
    data = wiener_hammerstein(400, 6, seed=7, min_hold=400, max_hold=400, dtype=F64)
    c = data.inputs[-1, :, 0]
    assert torch.allclose(data.targets[-1, :, 0], c + 0.3 * c**2 + 0.2 * c**3, atol=1e-9)


def _duffing_reference(u: list[float], m: float, c: float, k: float, k3: float, dt: float, substeps: int):
    """Classical RK4 for m·ÿ + c·ẏ + k·y + k3·y³ = u_t on each sample interval, with Python floats."""
    h, y, v, out = dt / substeps, 0.0, 0.0, []
    for force in u:

        def f(y: float, v: float) -> tuple[float, float]:
            return v, (force - c * v - k * y - k3 * y**3) / m

        for _ in range(substeps):
            a1, b1 = f(y, v)
            a2, b2 = f(y + h / 2 * a1, v + h / 2 * b1)
            a3, b3 = f(y + h / 2 * a2, v + h / 2 * b2)
            a4, b4 = f(y + h * a3, v + h * b3)
            y, v = y + h / 6 * (a1 + 2 * a2 + 2 * a3 + a4), v + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
        out.append(y)
    return np.array(out)


def test_duffing_matches_an_rk4_with_a_much_smaller_step_and_converges_at_fourth_order() -> None:
    params = dict(m=1.3, c=0.3, k=0.8, k3=2.0, dt=0.4)
    coarse = duffing_oscillator(80, 2, seed=8, substeps=8, rms=0.8, dtype=F64, **params)
    finer = duffing_oscillator(80, 2, seed=8, substeps=16, rms=0.8, dtype=F64, **params)
    default = duffing_oscillator(80, 2, seed=8, rms=0.8, dtype=F64, **params)  # substeps = 10
    assert torch.equal(coarse.inputs, finer.inputs)
    y = default.targets[..., 0].numpy()
    assert np.abs(params["k3"] * y**3).max() > np.abs(params["k"] * y).max()  # the cubic spring dominates somewhere
    for n in range(2):
        u = coarse.inputs[:, n, 0].tolist()
        assert np.abs(_duffing_reference(u, substeps=8, **params) - coarse.targets[:, n, 0].numpy()).max() < 1e-13
        fine = _duffing_reference(u, substeps=400, **params)
        assert np.abs(fine - y[:, n]).max() < 2e-5 * np.abs(fine).max()
        errors = [np.abs(fine - data.targets[:, n, 0].numpy()).max() for data in (coarse, finer)]
        assert 12 < errors[0] / errors[1] < 24  # halving the step divides the error by about 2⁴ = 16


def test_duffing_trajectory_satisfies_the_ode() -> None:
    """Central differences of y(t·dt) satisfy m·ÿ + c·ẏ + k·y + k3·y³ = u, with u the mean of the inputs held on
    the two intervals around each sample time (u jumps there), to the O(dt²) error of the differences; the same
    residual with a 1 % error in k3 is ten times the tolerance."""
    dt, m, c, k, k3 = 0.01, 1.0, 0.4, 2.0, 3.0
    data = duffing_oscillator(
        3000, 2, seed=9, m=m, c=c, k=k, k3=k3, dt=dt, substeps=2, bandwidth=3.0, rms=2.0, dtype=F64
    )
    y, u = data.targets[..., 0].numpy(), data.inputs[..., 0].numpy()
    accel = (y[2:] - 2 * y[1:-1] + y[:-2]) / dt**2
    speed = (y[2:] - y[:-2]) / (2 * dt)

    def residual(cubic: float) -> float:
        y_mid = y[1:-1]
        return np.abs(m * accel + c * speed + k * y_mid + cubic * y_mid**3 - (u[1:-1] + u[2:]) / 2).max()

    tolerance = 1e-3 * np.abs(m * accel).max()
    assert residual(k3) < tolerance
    assert residual(1.01 * k3) > 10 * tolerance


def test_duffing_input_is_band_limited_with_the_given_rms() -> None:
    data = duffing_oscillator(500, 3, seed=10, dt=0.5, bandwidth=1.5, rms=0.7, dtype=F64)
    u = data.inputs[..., 0].numpy()
    assert np.allclose(np.sqrt((u**2).mean(0)), 0.7) and np.allclose(u.mean(0), 0, atol=1e-12)
    omega = 2 * np.pi * np.fft.rfftfreq(500, d=0.5)
    power = np.abs(np.fft.rfft(u, axis=0)) ** 2
    assert power[omega > 1.5].max() < 1e-20 * power.max()


# --- noise, reproducibility, options ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIMULATORS)
def test_output_noise_only(name: str) -> None:
    clean = GENERATORS[name](11, dtype=F64)
    again = GENERATORS[name](11, dtype=F64, noise_std=0.0)
    noisy = GENERATORS[name](11, dtype=F64, noise_std=0.05)
    assert torch.equal(clean.targets, again.targets)
    assert torch.equal(clean.inputs, noisy.inputs)  # noise touches the measured output only
    residual = noisy.targets - clean.targets
    assert abs(residual.std().item() - 0.05) < 0.01 and abs(residual.mean().item()) < 0.01


@pytest.mark.parametrize("name", GENERATORS)
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    first, second, other = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    assert not torch.equal(first.inputs, other.inputs) and not torch.equal(first.targets, other.targets)
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(GENERATORS[name](0).inputs, first.inputs)  # the global RNG state plays no part
    assert first.config["seed"] == 0 and first.name == name
    assert json.loads(json.dumps(first.config)) == first.config


@pytest.mark.parametrize("name", GENERATORS)
def test_dtype_and_batch_first(name: str) -> None:
    base = GENERATORS[name](2)
    wide = GENERATORS[name](2, dtype=F64)
    flipped = GENERATORS[name](2, batch_first=True)
    assert base.inputs.dtype == torch.float32 and wide.inputs.dtype == F64
    assert torch.equal(wide.inputs.float(), base.inputs)
    assert base.targets.dtype == (torch.long if base.categories else torch.float32)
    assert wide.targets.dtype == (torch.long if base.categories else F64)
    assert torch.equal(flipped.inputs, base.inputs.transpose(0, 1))
    per_step = base.loss_steps == "all"
    assert torch.equal(flipped.targets, base.targets.transpose(0, 1) if per_step else base.targets)
    assert (flipped.steps, flipped.sequences) == (base.steps, base.sequences) == tuple(base.inputs.shape[:2])
    assert flipped.config["batch_first"] is True and wide.config["dtype"] == "float64"


# --- splits and windows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", ["adding_problem", "copy_task"])
def test_task_split_cuts_along_sequences(name: str, batch_first: bool) -> None:
    make = adding_problem if name == "adding_problem" else copy_task
    data = make(6, 21, 0, batch_first=batch_first)
    parts = data.split((0.5, 0.25, 0.25))  # cuts at round(10.5) = 10 and round(15.75) = 16
    assert list(parts) == ["train", "validation", "test"]
    assert [part.sequences for part in parts.values()] == [10, 6, 5]
    sequence_axis = 0 if batch_first else 1
    targets_axis = sequence_axis if data.loss_steps == "all" else 0
    assert torch.equal(torch.cat([p.inputs for p in parts.values()], sequence_axis), data.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts.values()], targets_axis), data.targets)
    assert all(p.steps == data.steps for p in parts.values())
    assert parts["test"].config["derived"][-1]["part"] == "test"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", SIMULATORS)
def test_simulation_split_cuts_contiguous_segments_along_time(name: str, batch_first: bool) -> None:
    data = GENERATORS[name](0, batch_first=batch_first)
    parts = data.split()
    time = 1 if batch_first else 0
    assert [part.steps for part in parts.values()] == [42, 9, 9]  # 0.7·60, then 0.15·60 each
    assert all(part.sequences == data.sequences for part in parts.values())
    assert torch.equal(torch.cat([p.inputs for p in parts.values()], time), data.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts.values()], time), data.targets)
    assert [(r["start"], r["stop"]) for r in (p.config["derived"][-1] for p in parts.values())] == [
        (0, 42),
        (42, 51),
        (51, 60),
    ]


@pytest.mark.parametrize("batch_first", [False, True])
def test_windows_cut_each_sequence(batch_first: bool) -> None:
    data = first_order_system(23, 3, seed=1, batch_first=batch_first)
    windows = data.windows(5, stride=4)  # starts 0, 4, 8, 12, 16: five windows, steps 21, 22 dropped
    assert (windows.steps, windows.sequences) == (5, 15)
    time_major = (lambda x: x.transpose(0, 1)) if batch_first else (lambda x: x)
    x, y, wx, wy = map(time_major, (data.inputs, data.targets, windows.inputs, windows.targets))
    for w in range(5):
        for b in range(3):
            assert torch.equal(wx[:, w * 3 + b], x[4 * w : 4 * w + 5, b])
            assert torch.equal(wy[:, w * 3 + b], y[4 * w : 4 * w + 5, b])
    assert windows.config["derived"] == [{"op": "windows", "length": 5, "stride": 4}]
    assert data.windows(5).sequences == 12  # stride defaults to length


def test_split_then_windows_records_both_and_class_targets_window_too() -> None:
    data = copy_task(10, 4, seed=0, symbols=3, length=5)
    train = duffing_oscillator(100, 2, seed=0).split()["train"].windows(10)
    assert [record["op"] for record in train.config["derived"]] == ["split", "windows"]
    assert train.split_along == "time" and train.steps == 10 and train.sequences == 14
    windows = data.windows(5)
    assert windows.targets.shape == (5, 16) and windows.categories == 5
    assert torch.equal(windows.targets[:, 3 * 4 + 1], data.targets[15:20, 1])


# --- bad input -------------------------------------------------------------------------------------------------

BAD_CALLS = [
    (lambda: adding_problem(1, 3, 0), ValueError, "steps must be an int ≥ 2, got 1"),
    (lambda: adding_problem(10.0, 3, 0), TypeError, "steps must be an int ≥ 2, got 10.0"),
    (lambda: adding_problem(10, 0, 0), ValueError, "sequences must be an int ≥ 1, got 0"),
    (lambda: adding_problem(10, True, 0), TypeError, "sequences must be an int"),
    (lambda: adding_problem(10, 3, -1), ValueError, "seed must be an int ≥ 0, got -1"),
    (lambda: adding_problem(10, 3, None), TypeError, "seed must be an int ≥ 0, got None"),
    (lambda: adding_problem(10, 3, 0, dtype=torch.int64), TypeError, "dtype must be a floating torch.dtype"),
    (lambda: adding_problem(10, 3, 0, dtype="float32"), TypeError, "dtype must be a floating torch.dtype"),
    (lambda: adding_problem(10, 3, 0, batch_first=1), TypeError, "batch_first must be True or False, got 1"),
    (lambda: adding_problem(10, 3, 0, noise_std=0.1), TypeError, "unexpected keyword argument 'noise_std'"),
    (lambda: copy_task(0, 3, 0), ValueError, "steps must be an int ≥ 1, got 0"),
    (lambda: copy_task(5, 3, 0, symbols=0), ValueError, "symbols must be an int ≥ 1, got 0"),
    (lambda: multi_timescale(10, 3, 0, delays=(1, 10)), ValueError, r"less than steps \(10\).*\[1, 10\]"),
    (lambda: multi_timescale(10, 3, 0, delays=(-1,)), ValueError, "each delay must be an int ≥ 0, got -1"),
    (lambda: multi_timescale(10, 3, 0, delays=5), TypeError, "delays must be a non-empty sequence of ints, got 5"),
    (lambda: multi_timescale(10, 3, 0, delays=()), TypeError, "non-empty sequence"),
    (lambda: aprbs(10, 3, 0, low=1.0, high=1.0), ValueError, "low must be less than high, got low=1.0, high=1.0"),
    (lambda: aprbs(10, 3, 0, min_hold=4, max_hold=2), ValueError, "min_hold must not exceed max_hold"),
    (lambda: aprbs(10, 3, 0, min_hold=0), ValueError, "min_hold must be an int ≥ 1, got 0"),
    (lambda: first_order_system(10, 3, 0, a=1.0), ValueError, r"\|a\| < 1 for a stable system, got 1.0"),
    (lambda: first_order_system(10, 3, 0, b=float("nan")), ValueError, "b must be a finite number, got nan"),
    (lambda: first_order_system(10, 3, 0, noise_std=-0.1), ValueError, "noise_std must be a finite number ≥ 0"),
    (lambda: wiener_hammerstein(10, 3, 0, noise_std="0.1"), TypeError, "noise_std must be a finite number ≥ 0"),
    (lambda: duffing_oscillator(10, 3, 0, m=0.0), ValueError, "m must be a finite number > 0, got 0.0"),
    (lambda: duffing_oscillator(10, 3, 0, k3=-1.0), ValueError, "k3 must be a finite number ≥ 0, got -1.0"),
    (lambda: duffing_oscillator(10, 3, 0, bandwidth=7.0), ValueError, r"Nyquist frequency π/dt = 6.283"),
    (lambda: duffing_oscillator(4, 3, 0), ValueError, r"frequency resolution 2π/\(steps·dt\) = 3.142"),
    (lambda: duffing_oscillator(50, 3, 0, rms=100.0, dt=2.0, substeps=1, bandwidth=1.0), ValueError, "diverged"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_CALLS)
def test_bad_arguments_say_what_was_expected(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "fractions",
    [(0.5, 0.5), (0.8, 0.2, 0.0), (0.7, 0.2, 0.2), (0.7, -0.15, 0.45), "abc", 0.5, (0.7, 0.15, "0.15")],
)
def test_bad_fractions(fractions) -> None:
    with pytest.raises(ValueError, match="fractions must be three positive numbers .* summing to 1"):
        adding_problem(10, 20, 0).split(fractions)


def test_split_and_windows_refuse_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"cannot split 3 sequences by fractions \(0.7, 0.15, 0.15\)"):
        adding_problem(10, 3, 0).split()
    with pytest.raises(ValueError, match="windows needs a target at every step"):
        adding_problem(10, 3, 0).windows(5)
    data = first_order_system(10, 3, 0)
    with pytest.raises(ValueError, match=r"length must be at most the number of steps \(10\), got 11"):
        data.windows(11)
    with pytest.raises(ValueError, match="stride must be an int ≥ 1, got 0"):
        data.windows(5, stride=0)


def test_dataset_checks_what_it_is_given() -> None:
    x, y = torch.zeros(6, 2, 3), torch.zeros(6, 2, 1)
    assert Dataset("mine", x, y, "all").output_size == 1  # a user's own data
    with pytest.raises(ValueError, match="loss_steps must be one of"):
        Dataset("mine", x, y, "every")
    with pytest.raises(ValueError, match=r"targets for loss_steps='last' must have shape \(N, O\)"):
        Dataset("mine", x, y, "last")
    with pytest.raises(ValueError, match=r"\(T, N, O\) with leading axes \(6, 2\) .* got \(5, 2, 1\)"):
        Dataset("mine", x, y[:5], "all")
    with pytest.raises(ValueError, match=r"inputs must be 3-D \(N, T, I\)"):
        Dataset("mine", x[0], y, "all", batch_first=True)
    with pytest.raises(TypeError, match="targets must be integer class indices"):
        Dataset("mine", x, y[..., 0], "all", categories=3)
    with pytest.raises(ValueError, match="class indices must lie in 0..2, got min 0, max 3"):
        Dataset("mine", x, torch.tensor([[0, 3]] * 6), "all", categories=3)
    with pytest.raises(ValueError, match="split_along='time' needs a target at every step"):
        Dataset("mine", x, y[0], "last", split_along="time")
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        Dataset("mine", x, y, "all", config={"tensor": torch.zeros(1)})
