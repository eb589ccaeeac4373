"""Toy tasks and simulated systems with known temporal structure, generated reproducibly from a seed.

Shapes: T steps, N sequences, I input features, O outputs. Arrays are time-major (T, N, ·), or (N, T, ·) with
``batch_first=True``. Each generator draws from its own ``numpy.random.default_rng(seed)`` (never the global state),
computes in float64 and returns torch tensors of ``dtype``. Below, t = 1..T counts steps as in the notation (the
state h_t is the one after reading x_t); code indices are t − 1.

Tasks (long-range credit: the lag the network must bridge is known):

    adding problem     x_t = (v_t, m_t), v_t ~ U[0, 1), m_t ∈ {0, 1} with exactly two markers, one at a step in
                       1..⌊T/2⌋ and one in ⌊T/2⌋+1..T; one target per sequence, read at the last step:
                       y = Σ_t m_t·v_t, shape (N, 1)   (Hochreiter & Schmidhuber 1997; Le et al. 2015)
    copy memory        categories 0 = blank, 1..K = symbols, K + 1 = delimiter. With delay D and length L the input
                       is L random symbols, D − 1 blanks, the delimiter, L blanks (T = D + 2L), one-hot (T, N, K + 2);
                       the target is blank for the first D + L steps, then the L symbols in order: class indices
                       (T, N), so symbol i is recalled D + L steps after it was shown   (Arjovsky et al. 2016)
    multi-timescale    x_t = ±1 with equal probability; target j is y_{t,j} = x_{t−d_j} for t > d_j, 0 before:
                       a unit that serves target j must hold the input for exactly d_j steps

Simulated systems (system identification): the noiseless output y° is a deterministic function of the input, from a
zero initial state; only the measurement is noisy, y_t = y°_t + σ·e_t with e_t ~ N(0, 1) (``noise_std`` = σ):

    first order          y°_t = a·y°_{t−1} + b·tanh(u_t)      defaults a = 0.9, b = 0.1: one state, pole a
                         (timescale 1/(1 − a) = 10 steps), static gain b/(1 − a)·tanh(u) saturating in u
    Wiener–Hammerstein   G1  v_t = 1.5·v_{t−1} − 0.7·v_{t−2} + 0.1·u_t + 0.1·u_{t−1}     poles 0.75 ± 0.37i, gain 1
                         f   w_t = v_t + 0.3·v_t² + 0.2·v_t³        increasing for every v (1 + 0.6v + 0.6v² > 0)
                         G2  y°_t = 1.4·y°_{t−1} − 0.45·y°_{t−2} + 0.025·w_t + 0.025·w_{t−1}   poles 0.9, 0.5, gain 1
    Duffing (Silverbox)  m·ÿ + c·ẏ + k·y + k3·y³ = u(τ), u(τ) = u_t held on ((t − 1)·dt, t·dt]; classical RK4 with
                         step dt / substeps; y°_t = y(t·dt). Defaults m = k = k3 = 1, c = 0.2 (ω0 = 1 rad/s,
                         damping ratio 0.1), dt = 0.5 (12.6 samples per natural period)

The first two are driven by an APRBS (:func:`aprbs`: random levels held for random durations); Duffing by
band-limited Gaussian noise (white noise with every frequency above ``bandwidth`` rad/s removed in the Fourier
domain, scaled to RMS ``rms`` per sequence). The input is drawn before the noise, so the same seed gives the same
input whatever ``noise_std`` is, and a simulator's input equals :func:`aprbs` called with the same seed and levels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

LOSS_STEPS = ("last", "all")
SPLIT_ALONG = ("sequences", "time")
PARTS = ("train", "validation", "test")
WH_G1 = ((0.1, 0.1), (1.5, -0.7))  # (numerator b0, b1), (feedback a1, a2): y_t = a1·y_{t−1} + a2·y_{t−2} + b0·x_t + …
WH_G2 = ((0.025, 0.025), (1.4, -0.45))
WH_POLYNOMIAL = (1.0, 0.3, 0.2)  # w = v + 0.3·v² + 0.2·v³


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs and targets of one task or simulation, with the parameters that generated them.

    ``inputs`` (T, N, I). ``targets``: with ``loss_steps="all"`` one per step, (T, N, O), or (T, N) class indices when
    ``categories`` is set; with ``"last"`` one per sequence, read at the last step, (N, O) or (N,). With
    ``batch_first`` the first two axes of every per-step array are (N, T). ``split_along`` says how :meth:`split`
    cuts: "sequences" (independent sequences) or "time" (one long record per sequence, cut into contiguous
    segments). ``config`` holds every parameter as JSON, and under "derived" each split or windowing applied since.
    """

    name: str
    inputs: Tensor
    targets: Tensor
    loss_steps: str
    config: dict[str, Any] = field(default_factory=dict)
    categories: int | None = None
    batch_first: bool = False
    split_along: str = "sequences"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if self.loss_steps not in LOSS_STEPS:
            raise ValueError(f"loss_steps must be one of {LOSS_STEPS}, got {self.loss_steps!r}")
        if self.split_along not in SPLIT_ALONG:
            raise ValueError(f"split_along must be one of {SPLIT_ALONG}, got {self.split_along!r}")
        if self.split_along == "time" and self.loss_steps != "all":
            raise ValueError("split_along='time' needs a target at every step (loss_steps='all')")
        _flag(self.batch_first, "batch_first")
        if not isinstance(self.inputs, Tensor) or not self.inputs.is_floating_point():
            raise TypeError(f"inputs must be a floating-point tensor, got {_describe(self.inputs)}")
        if self.inputs.ndim != 3:
            raise ValueError(f"inputs must be 3-D {self._layout('I')}, got shape {tuple(self.inputs.shape)}")
        if self.categories is not None:
            _count(self.categories, "categories", 2)
        self._check_targets()
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict, got {type(self.config).__name__}")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as error:
            raise TypeError(f"config must be JSON-serialisable: {error}") from None

    def _layout(self, features: str | None) -> str:
        """The shape of a per-step array in this layout, e.g. "(T, N, I)"."""
        axes = "N, T" if self.batch_first else "T, N"
        return f"({axes}, {features})" if features else f"({axes})"

    def _check_targets(self) -> None:
        classes = self.categories is not None
        if not isinstance(self.targets, Tensor):
            raise TypeError(f"targets must be a tensor, got {type(self.targets).__name__}")
        dtype = self.targets.dtype
        if classes and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
            raise TypeError(f"targets must be integer class indices when categories is set, got {self.targets.dtype}")
        if not classes and not self.targets.is_floating_point():
            raise TypeError(f"targets must be floating point (or set categories for classes), got {self.targets.dtype}")
        if self.loss_steps == "all":  # the leading axes must be those of the inputs
            expected, leading = self._layout(None if classes else "O"), tuple(self.inputs.shape[:2])
        else:
            expected, leading = ("(N,)" if classes else "(N, O)"), (self.sequences,)
        ndim = len(leading) + (0 if classes else 1)
        if self.targets.ndim != ndim or tuple(self.targets.shape[: len(leading)]) != leading:
            raise ValueError(
                f"targets for loss_steps={self.loss_steps!r} must have shape {expected} with leading axes "
                f"{leading} from the inputs {tuple(self.inputs.shape)}, got {tuple(self.targets.shape)}"
            )
        if classes and self.targets.numel():
            low, high = int(self.targets.min()), int(self.targets.max())
            if low < 0 or high >= self.categories:
                raise ValueError(f"class indices must lie in 0..{self.categories - 1}, got min {low}, max {high}")

    @property
    def steps(self) -> int:
        """T, the number of steps of every sequence."""
        return self.inputs.shape[1 if self.batch_first else 0]

    @property
    def sequences(self) -> int:
        """N, the number of sequences."""
        return self.inputs.shape[0 if self.batch_first else 1]

    @property
    def input_size(self) -> int:
        """I, the number of input features."""
        return self.inputs.shape[-1]

    @property
    def output_size(self) -> int:
        """The number of model outputs: ``categories`` for class targets, O otherwise."""
        return self.categories if self.categories is not None else self.targets.shape[-1]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, inputs {tuple(self.inputs.shape)}, targets {tuple(self.targets.shape)}, "
            f"loss_steps={self.loss_steps!r}, {self.inputs.dtype})"
        )

    def split(self, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, Dataset]:
        """Train, validation and test parts, in this order, cut at the rounded cumulative ``fractions``.

        Tasks (``split_along="sequences"``) are cut along the sequences, which are independent draws. Simulations
        (``"time"``) are cut along time into contiguous segments, train first, every sequence at the same steps:
        a random cut would put neighbouring, strongly correlated steps into different parts. A later segment does
        not start from the system's zero state, so cut it into :meth:`windows` and leave the first steps of each
        window out of the loss (a washout) while the model's state settles.
        """
        fractions = _fractions(fractions)
        time = self.split_along == "time"
        size = self.steps if time else self.sequences
        bounds = [0, *(round(size * edge) for edge in np.cumsum(fractions)[:-1]), size]
        if any(start >= stop for start, stop in zip(bounds[:-1], bounds[1:])):
            unit = "steps" if time else "sequences"
            raise ValueError(f"cannot split {size} {unit} by fractions {fractions} with no part empty (cuts {bounds})")
        parts = {}
        for part, start, stop in zip(PARTS, bounds[:-1], bounds[1:]):
            record = {"op": "split", "along": self.split_along, "part": part, "fractions": list(fractions)}
            inputs = self._take(self.inputs, True, time, start, stop)
            targets = self._take(self.targets, self.loss_steps == "all", time, start, stop)
            parts[part] = self._derive(inputs, targets, record | {"start": start, "stop": stop})
        return parts

    def _take(self, values: Tensor, per_step: bool, time: bool, start: int, stop: int) -> Tensor:
        """Steps (``time``) or sequences start..stop−1 of a per-step array, or sequences of a per-sequence one."""
        if time:
            axis = 1 if self.batch_first else 0
        else:
            axis = 1 if per_step and not self.batch_first else 0
        return values.narrow(axis, start, stop - start)

    def windows(self, length: int, stride: int | None = None) -> Dataset:
        """Every window of ``length`` steps starting at steps 0, stride, 2·stride, … (``stride`` defaults to
        ``length``: no overlap; a tail shorter than ``length`` is dropped), each as a sequence of its own.

        Window w of sequence b becomes sequence w·N + b. Needs a target at every step (loss_steps "all").
        """
        if self.loss_steps != "all":
            raise ValueError("windows needs a target at every step (loss_steps='all'); these targets are per sequence")
        length = _count(length, "length")
        stride = length if stride is None else _count(stride, "stride")
        if length > self.steps:
            raise ValueError(f"length must be at most the number of steps ({self.steps}), got {length}")

        def cut(values: Tensor) -> Tensor:
            values = values.transpose(0, 1) if self.batch_first else values  # (T, N, ·)
            windows = values.unfold(0, length, stride).movedim(-1, 0)  # (length, W, N, ·)
            windows = windows.reshape(length, -1, *values.shape[2:])  # (length, W·N, ·)
            return windows.transpose(0, 1) if self.batch_first else windows

        record = {"op": "windows", "length": length, "stride": stride}
        return self._derive(cut(self.inputs), cut(self.targets), record)

    def _derive(self, inputs: Tensor, targets: Tensor, record: dict[str, Any]) -> Dataset:
        config = self.config | {"derived": [*self.config.get("derived", []), record]}
        return Dataset(
            self.name, inputs, targets, self.loss_steps, config, self.categories, self.batch_first, self.split_along
        )


def adding_problem(
    steps: int, sequences: int, seed: int, *, dtype: torch.dtype = torch.float32, batch_first: bool = False
) -> Dataset:
    """The adding problem (module docstring): inputs (T, N, 2) = (value, marker), targets (N, 1), loss at the
    last step. ``steps`` ≥ 2, so that each half holds a marker; for odd T the second half is one step longer."""
    steps, sequences, seed = _count(steps, "steps", 2), _count(sequences, "sequences"), _count(seed, "seed", 0)
    config = _config(steps=steps, sequences=sequences, seed=seed, dtype=dtype, batch_first=batch_first)
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 1.0, (steps, sequences))
    half, columns = steps // 2, np.arange(sequences)
    first, second = rng.integers(0, half, sequences), rng.integers(half, steps, sequences)
    markers = np.zeros((steps, sequences))
    markers[first, columns] = markers[second, columns] = 1.0
    target = values[first, columns] + values[second, columns]
    inputs = np.stack([values, markers], axis=-1)
    return _dataset("adding_problem", inputs, target[:, None], "last", config, dtype, batch_first)


def copy_task(
    steps: int,
    sequences: int,
    seed: int,
    *,
    symbols: int = 8,
    length: int = 10,
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Dataset:
    """The copy memory task (module docstring) with delay D = ``steps``: T = D + 2·``length`` steps, inputs one-hot
    (T, N, symbols + 2), targets class indices (T, N) with ``categories`` = symbols + 2, loss at every step."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    symbols, length = _count(symbols, "symbols"), _count(length, "length")
    config = _config(
        steps=steps, sequences=sequences, seed=seed, symbols=symbols, length=length, dtype=dtype,
        batch_first=batch_first,
    )  # fmt: skip
    categories, total = symbols + 2, steps + 2 * length
    data = np.random.default_rng(seed).integers(1, symbols + 1, (length, sequences))
    shown = np.zeros((total, sequences), dtype=np.int64)
    shown[:length] = data
    shown[length + steps - 1] = symbols + 1  # the delimiter: recall starts at the next step
    recalled = np.zeros((total, sequences), dtype=np.int64)
    recalled[length + steps :] = data
    inputs = np.eye(categories)[shown]
    return _dataset("copy_task", inputs, recalled, "all", config, dtype, batch_first, categories=categories)


def multi_timescale(
    steps: int,
    sequences: int,
    seed: int,
    *,
    delays: Sequence[int] = (1, 5, 20),
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Dataset:
    """Delayed copies of a random ±1 input (module docstring): inputs (T, N, 1), targets (T, N, len(delays)),
    loss at every step. Each delay is an int in 0..steps − 1."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    if isinstance(delays, (str, bytes)) or not isinstance(delays, Sequence) or not delays:
        raise TypeError(f"delays must be a non-empty sequence of ints, got {delays!r}")
    delays = [_count(delay, "each delay", 0) for delay in delays]
    if max(delays) >= steps:
        raise ValueError(f"each delay must be less than steps ({steps}), or its target is all zeros; got {delays}")
    config = _config(steps=steps, sequences=sequences, seed=seed, delays=delays, dtype=dtype, batch_first=batch_first)
    signal = 2.0 * np.random.default_rng(seed).integers(0, 2, (steps, sequences)) - 1.0
    targets = np.zeros((steps, sequences, len(delays)))
    for j, delay in enumerate(delays):
        targets[delay:, :, j] = signal[: steps - delay]
    return _dataset("multi_timescale", signal[..., None], targets, "all", config, dtype, batch_first)


def aprbs(
    steps: int,
    sequences: int,
    seed: int,
    *,
    low: float = -1.0,
    high: float = 1.0,
    min_hold: int = 5,
    max_hold: int = 50,
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Tensor:
    """An amplitude-modulated pseudo-random binary signal (APRBS), (T, N, 1): levels drawn from U[low, high], each
    held for a number of steps drawn uniformly from min_hold..max_hold; the last hold is cut at T."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    _check_output(dtype, batch_first)
    signal = _aprbs(np.random.default_rng(seed), steps, sequences, *_levels(low, high, min_hold, max_hold))
    return _tensor(signal[..., None], dtype, batch_first)


def first_order_system(
    steps: int,
    sequences: int,
    seed: int,
    *,
    a: float = 0.9,
    b: float = 0.1,
    low: float = -2.0,
    high: float = 2.0,
    min_hold: int = 5,
    max_hold: int = 50,
    noise_std: float = 0.0,
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Dataset:
    """y°_t = a·y°_{t−1} + b·tanh(u_t) from y°_0 = 0 (module docstring), |a| < 1, driven by :func:`aprbs` with the
    given levels and holds (the default ±2 reaches well into tanh's saturation). Inputs u and targets y, both
    (T, N, 1), loss at every step; split along time."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    a, b, noise_std = _real(a, "a"), _real(b, "b"), _real(noise_std, "noise_std", 0.0)
    if not abs(a) < 1:
        raise ValueError(f"a must satisfy |a| < 1 for a stable system, got {a}")
    levels = _levels(low, high, min_hold, max_hold)
    config = _config(
        steps=steps, sequences=sequences, seed=seed, a=a, b=b, low=levels[0], high=levels[1], min_hold=levels[2],
        max_hold=levels[3], noise_std=noise_std, dtype=dtype, batch_first=batch_first,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    u = _aprbs(rng, steps, sequences, *levels)
    drive, y, state = b * np.tanh(u), np.empty_like(u), np.zeros(sequences)
    for t in range(steps):
        state = a * state + drive[t]
        y[t] = state
    return _simulation("first_order_system", u, y, rng, noise_std, config, dtype, batch_first)


def wiener_hammerstein(
    steps: int,
    sequences: int,
    seed: int,
    *,
    low: float = -1.0,
    high: float = 1.0,
    min_hold: int = 5,
    max_hold: int = 50,
    noise_std: float = 0.0,
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Dataset:
    """G1 → f → G2 with the coefficients of the module docstring (:data:`WH_G1`, :data:`WH_POLYNOMIAL`,
    :data:`WH_G2`), zero initial state, driven by :func:`aprbs`. Inputs u and targets y, both (T, N, 1), loss at
    every step; split along time."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    noise_std = _real(noise_std, "noise_std", 0.0)
    levels = _levels(low, high, min_hold, max_hold)
    config = _config(
        steps=steps, sequences=sequences, seed=seed, low=levels[0], high=levels[1], min_hold=levels[2],
        max_hold=levels[3], noise_std=noise_std, dtype=dtype, batch_first=batch_first,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    u = _aprbs(rng, steps, sequences, *levels)
    v = _filter(*WH_G1, u)
    w = sum(coefficient * v ** (power + 1) for power, coefficient in enumerate(WH_POLYNOMIAL))
    return _simulation("wiener_hammerstein", u, _filter(*WH_G2, w), rng, noise_std, config, dtype, batch_first)


def duffing_oscillator(
    steps: int,
    sequences: int,
    seed: int,
    *,
    m: float = 1.0,
    c: float = 0.2,
    k: float = 1.0,
    k3: float = 1.0,
    dt: float = 0.5,
    substeps: int = 10,
    bandwidth: float = 2.0,
    rms: float = 0.5,
    noise_std: float = 0.0,
    dtype: torch.dtype = torch.float32,
    batch_first: bool = False,
) -> Dataset:
    """m·ÿ + c·ẏ + k·y + k3·y³ = u (module docstring), at rest at τ = 0, RK4 with ``substeps`` steps per sample
    time ``dt``. The input is Gaussian noise band-limited to ``bandwidth`` rad/s (at most the Nyquist frequency
    π/dt, at least the frequency resolution 2π/(steps·dt)) with RMS ``rms``. m > 0, c ≥ 0, k3 ≥ 0 (a hardening or
    linear spring: bounded for bounded input). Inputs u and targets y, both (T, N, 1), loss at every step; split
    along time."""
    steps, sequences, seed = _count(steps, "steps"), _count(sequences, "sequences"), _count(seed, "seed", 0)
    m, c, k, k3 = _real(m, "m", 0.0, strict=True), _real(c, "c", 0.0), _real(k, "k"), _real(k3, "k3", 0.0)
    dt, substeps = _real(dt, "dt", 0.0, strict=True), _count(substeps, "substeps")
    rms, noise_std = _real(rms, "rms", 0.0, strict=True), _real(noise_std, "noise_std", 0.0)
    bandwidth, lowest, nyquist = _real(bandwidth, "bandwidth"), 2 * math.pi / (steps * dt), math.pi / dt
    if not lowest <= bandwidth <= nyquist:
        raise ValueError(
            f"bandwidth must lie between the frequency resolution 2π/(steps·dt) = {lowest:.4g} and the Nyquist "
            f"frequency π/dt = {nyquist:.4g} rad/s, got {bandwidth}"
        )
    config = _config(
        steps=steps, sequences=sequences, seed=seed, m=m, c=c, k=k, k3=k3, dt=dt, substeps=substeps,
        bandwidth=bandwidth, rms=rms, noise_std=noise_std, dtype=dtype, batch_first=batch_first,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    u = _band_limited(rng, steps, sequences, dt, bandwidth, rms)
    y = _rk4_duffing(u, m, c, k, k3, dt / substeps, substeps)
    if not np.isfinite(y).all():
        raise ValueError("the Duffing integration diverged: lower rms or dt, or raise substeps")
    return _simulation("duffing_oscillator", u, y, rng, noise_std, config, dtype, batch_first)


def _aprbs(
    rng: np.random.Generator, steps: int, sequences: int, low: float, high: float, lo: int, hi: int
) -> np.ndarray:
    """(T, N) APRBS: enough holds are drawn to cover T steps even if all are ``lo`` long."""
    holds = rng.integers(lo, hi + 1, (sequences, -(-steps // lo)))
    levels = rng.uniform(low, high, holds.shape)
    ends = np.cumsum(holds, axis=1)  # a new level starts at each end before T
    starts = np.zeros((sequences, steps), dtype=np.int64)
    rows = np.broadcast_to(np.arange(sequences)[:, None], ends.shape)
    inside = ends < steps
    starts[rows[inside], ends[inside]] = 1
    return np.take_along_axis(levels, starts.cumsum(axis=1), axis=1).T


def _filter(numerator: tuple[float, ...], feedback: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """y_t = Σ_i feedback[i]·y_{t−1−i} + Σ_i numerator[i]·x_{t−i} along axis 0, zero before the first step."""
    past_x, past_y = len(numerator) - 1, len(feedback)
    xs = np.concatenate([np.zeros((past_x, *x.shape[1:])), x])
    ys = np.zeros((past_y + len(x), *x.shape[1:]))
    for t in range(len(x)):
        ys[past_y + t] = sum(b * xs[past_x + t - i] for i, b in enumerate(numerator)) + sum(
            a * ys[past_y + t - 1 - i] for i, a in enumerate(feedback)
        )
    return ys[past_y:]


def _band_limited(
    rng: np.random.Generator, steps: int, sequences: int, dt: float, bandwidth: float, rms: float
) -> np.ndarray:
    """(T, N) zero-mean Gaussian noise keeping only the frequencies 0 < ω ≤ bandwidth, RMS ``rms`` per sequence."""
    spectrum = np.fft.rfft(rng.standard_normal((steps, sequences)), axis=0)
    omega = 2 * math.pi * np.fft.rfftfreq(steps, d=dt)
    spectrum[(omega == 0) | (omega > bandwidth)] = 0
    signal = np.fft.irfft(spectrum, n=steps, axis=0)
    return rms * signal / np.sqrt(np.mean(signal**2, axis=0))


def _rk4_duffing(u: np.ndarray, m: float, c: float, k: float, k3: float, h: float, substeps: int) -> np.ndarray:
    """Positions y(t·dt), t = 1..T, of m·ÿ + c·ẏ + k·y + k3·y³ = u_t on each interval; classical RK4 of step h."""

    def accel(y: np.ndarray, v: np.ndarray, force: np.ndarray) -> np.ndarray:
        return (force - c * v - k * y - k3 * y**3) / m

    y, v, out = np.zeros(u.shape[1]), np.zeros(u.shape[1]), np.empty_like(u)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by the caller
        for t, force in enumerate(u):
            for _ in range(substeps):
                dy1, dv1 = v, accel(y, v, force)
                dy2, dv2 = v + h / 2 * dv1, accel(y + h / 2 * dy1, v + h / 2 * dv1, force)
                dy3, dv3 = v + h / 2 * dv2, accel(y + h / 2 * dy2, v + h / 2 * dv2, force)
                dy4, dv4 = v + h * dv3, accel(y + h * dy3, v + h * dv3, force)
                y = y + h / 6 * (dy1 + 2 * dy2 + 2 * dy3 + dy4)
                v = v + h / 6 * (dv1 + 2 * dv2 + 2 * dv3 + dv4)
            out[t] = y
    return out


def _simulation(
    name: str,
    u: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    noise_std: float,
    config: dict[str, Any],
    dtype: torch.dtype,
    batch_first: bool,
) -> Dataset:
    """A simulator's Dataset: u and the measured y = y° + σ·e, both (T, N, 1), split along time."""
    measured = y + noise_std * rng.standard_normal(y.shape)
    return _dataset(name, u[..., None], measured[..., None], "all", config, dtype, batch_first, split_along="time")


def _dataset(
    name: str,
    inputs: np.ndarray,
    targets: np.ndarray,
    loss_steps: str,
    config: dict[str, Any],
    dtype: torch.dtype,
    batch_first: bool,
    *,
    categories: int | None = None,
    split_along: str = "sequences",
) -> Dataset:
    """Wrap float64 / int64 numpy arrays (time-major) as a Dataset of ``dtype`` in the requested layout."""
    per_step = loss_steps == "all"
    if categories is None:
        targets = _tensor(targets, dtype, batch_first and per_step)
    else:
        targets = torch.as_tensor(targets, dtype=torch.long)
        targets = targets.transpose(0, 1).contiguous() if batch_first and per_step else targets
    inputs = _tensor(inputs, dtype, batch_first)
    return Dataset(name, inputs, targets, loss_steps, config, categories, batch_first, split_along)


def _tensor(array: np.ndarray, dtype: torch.dtype, batch_first: bool) -> Tensor:
    values = torch.as_tensor(array, dtype=dtype)
    return values.transpose(0, 1).contiguous() if batch_first else values


def _config(**parameters: Any) -> dict[str, Any]:
    """The parameters as JSON values, with dtype and batch_first checked (the other values are checked already)."""
    _check_output(parameters["dtype"], parameters["batch_first"])
    return parameters | {"dtype": str(parameters["dtype"]).removeprefix("torch.")}


def _check_output(dtype: Any, batch_first: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.float64, …), got {dtype!r}")
    _flag(batch_first, "batch_first")


def _levels(low: Any, high: Any, min_hold: Any, max_hold: Any) -> tuple[float, float, int, int]:
    """APRBS settings, checked: low < high, 1 ≤ min_hold ≤ max_hold."""
    low, high = _real(low, "low"), _real(high, "high")
    if not low < high:
        raise ValueError(f"low must be less than high, got low={low}, high={high}")
    min_hold, max_hold = _count(min_hold, "min_hold"), _count(max_hold, "max_hold")
    if min_hold > max_hold:
        raise ValueError(f"min_hold must not exceed max_hold, got min_hold={min_hold}, max_hold={max_hold}")
    return low, high, min_hold, max_hold


def _fractions(fractions: Any) -> tuple[float, float, float]:
    """Three positive numbers summing to 1 (train, validation, test)."""
    expected = "fractions must be three positive numbers (train, validation, test) summing to 1"
    try:
        values = tuple(_real(value, "fraction", 0.0, strict=True) for value in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"{expected}; got {fractions!r:.80}") from None
    if len(values) != 3 or abs(sum(values) - 1) > 1e-9:
        raise ValueError(f"{expected}; got {fractions!r:.80}")
    return values


def _count(value: Any, name: str, minimum: int = 1) -> int:
    """An int (Python or numpy, not bool) ≥ ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value}")
    return int(value)


def _real(value: Any, name: str, minimum: float = -math.inf, *, strict: bool = False) -> float:
    """A finite real number (not bool) ≥ ``minimum`` (> with ``strict``)."""
    bound = f" {'>' if strict else '≥'} {minimum:g}" if minimum > -math.inf else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a finite number{bound}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _describe(value: Any) -> str:
    return f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
