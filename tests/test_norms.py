"""``frobenius``, the norm every analysis reports, against an exact oracle: each value scaled by a power of two, its
square summed with ``math.fsum`` in float64 (a float32 square is exact there), over random shapes and reduced
dimensions, float32 and float64, rows from the smallest normal number to near the largest, zero rows, rows longer
than ROW_ENTRIES (summed in float64 at once), and NaN and inf, which must come out as NaN and inf."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelens.analysis.norms import ROW_ENTRIES, frobenius

TOLERANCE = {torch.float32: 4 * 2.0**-24, torch.float64: 16 * 2.0**-53}  # relative: a few units in the last place


def _exact(values: np.ndarray) -> float:
    """‖values‖₂ by exact arithmetic on powers of two: m · sqrt(fsum((v / m)²)) with m a power of two near max |v|."""
    largest = float(np.abs(values).max(initial=0.0))
    if largest == 0.0:
        return 0.0
    scale = math.ldexp(1.0, math.frexp(largest)[1])
    return scale * math.sqrt(math.fsum((float(v) / scale) ** 2 for v in values.ravel()))


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    reduced=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    long_rows=st.booleans(),
    exponents=st.lists(st.integers(-1000, 1000), min_size=1, max_size=6),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_frobenius_equals_the_exact_norm(
    dtype: torch.dtype,
    lead: list[int],
    reduced: list[int],
    long_rows: bool,
    exponents: list[int],
    zero_row: bool,
    seed: int,
) -> None:
    info = torch.finfo(dtype)
    shape = [*lead, *reduced[:-1], ROW_ENTRIES + 3 if long_rows else reduced[-1]]
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = values.view(-1, shape[-1])
    low, high = math.log2(info.tiny) + 1, math.log2(info.max) - 2 - math.log2(values.numel())
    for index in range(len(rows)):  # every row its own size, from near the smallest normal number to near the largest
        fraction = (exponents[index % len(exponents)] + 1000) / 2000
        rows[index] *= 2.0 ** (low + fraction * (high - low))
    if zero_row:
        rows[0] = 0.0
    values = values.to(dtype)
    dims = len(reduced)
    got = frobenius(values, dims)
    flat = values.double().numpy().reshape(*values.shape[: values.dim() - dims], -1)
    expected = np.array([_exact(row) for row in flat.reshape(-1, flat.shape[-1])]).reshape(flat.shape[:-1])
    assert got.dtype == dtype and tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=TOLERANCE[dtype], atol=0)


def test_frobenius_keeps_nan_and_inf() -> None:
    for dtype in (torch.float32, torch.float64):
        values = torch.ones(3, 4, 5, dtype=dtype)
        values[0, 1, 2], values[1, 3, 0] = math.nan, math.inf
        got = frobenius(values, 2)
        assert got[0].isnan() and got[1].isposinf() and got[2] == math.sqrt(20)
