"""Matrix norms: Frobenius norms that neither underflow nor overflow where the norm itself is representable, and
spectral norms by subspace iteration; and the sweeps' guard against subnormal arithmetic.

A plain norm squares the entries, so in float32 any norm below about 1e-19 would come out as 0 and any above
about 1e19 as inf. Narrow floats are therefore summed in float64, whose range holds every square of a float32;
float64 norms outside 1e-140..1e140 (rare) are redone with the largest entry factored out first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from gatelens.analysis.worker_fenv import follow_caller

SAFE_RANGE = (1e-140, 1e140)  # float64 norms inside it lost nothing to squaring
ROW_ENTRIES = 4096  # rows at most this long are summed in their dtype first (torch keeps them exact to rounding)
ROWS_AT_ONCE = 1024  # leading entries rescaled together (bounds the temporary copy of a large tensor)
SPECTRAL_RTOL = 1e-6  # the subspace iteration stops once its estimated remaining error is below this, relative
SPECTRAL_BLOCK = 8  # vectors of the subspace iteration
SPECTRAL_ITERATIONS = 100  # at most this many; a matrix that has not converged by then gets an exact SVD
NOISE = 16  # a step of the estimate below this many machine epsilons of it is rounding: the iteration has converged

Params = ParamSpec("Params")
Result = TypeVar("Result")


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Within the block, CPU arithmetic flushes subnormal numbers to zero (``torch.set_flush_denormal``); the
    setting found on entry is restored on exit.

    A gradient that vanishes through time passes through the subnormal range (below 1.2e-38 in float32, 2.2e-308
    in float64) on its way to zero, where a CPU computes up to 100 times slower: one backward sweep over T = 1000
    steps took minutes instead of seconds. Flushed, a quantity whose exact value lies in that band reads 0; every
    larger one is unchanged. The trace's dtype cannot hold such a value to more than a few digits anyway, and a
    sweep that must tell "tiny" from "zero" carries a log scale (blocking's underflow check). torch's intra-op threads
    take the setting too (:func:`~gatelens.analysis.worker_fenv.follow_caller`): the call sets only the calling
    thread's, and with two threads half of every parallel kernel would otherwise still compute with subnormals.
    """
    turned_on = not _flushing() and torch.set_flush_denormal(True)
    if turned_on:
        follow_caller()
    try:
        yield
    finally:
        if turned_on:
            torch.set_flush_denormal(False)
            follow_caller()


def flushes_subnormals(function: Callable[Params, Result]) -> Callable[Params, Result]:
    """Run ``function`` inside :func:`subnormals_flushed`."""

    @functools.wraps(function)
    def flushed(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        with subnormals_flushed():
            return function(*args, **kwargs)

    return flushed


def _flushing() -> bool:
    """Whether CPU arithmetic flushes subnormals now: twice a subnormal float32 reads 0."""
    subnormal = torch.full((1,), torch.finfo(torch.float32).tiny / 4)
    return bool((subnormal * 2 == 0).item())


def frobenius(values: Tensor, dims: int) -> Tensor:
    """‖values‖₂ over the last ``dims`` (≥ 1) dimensions, exact to rounding for every norm the dtype can hold.

    float32 and float64 are summed in two stages: each row of the last dimension (at most ROW_ENTRIES long) in the
    dtype, plainly where its norm lies in :func:`plain_range` and rescaled by its largest entry where it does not
    (those rows alone), then the rows' norms in float64 (float32) or in float64 again, rescaled outside SAFE_RANGE.
    Longer rows, float16 and bfloat16 are summed in float64 at once.
    """
    axes = tuple(range(values.dim() - dims, values.dim()))
    width = values.shape[-1]
    plain = plain_range(values.dtype, width)
    if plain is None or width > ROW_ENTRIES:
        wide = torch.linalg.vector_norm(values, dim=axes, dtype=torch.float64)
        if values.dtype != torch.float64 or bool(((wide >= SAFE_RANGE[0]) & (wide <= SAFE_RANGE[1])).all()):
            return wide.to(values.dtype)
        return _rescaled(values, dims)
    rows = torch.linalg.vector_norm(values, dim=-1)
    outside = ~((rows >= plain[0]) & (rows <= plain[1]))  # NaN too
    if bool(outside.any()):
        rows[outside] = _rescaled(values[outside], 1)
    if dims == 1:
        return rows
    if values.dtype == torch.float32:
        return torch.linalg.vector_norm(rows, dim=axes[:-1], dtype=torch.float64).to(values.dtype)
    return frobenius(rows, dims - 1)


def plain_range(dtype: torch.dtype, entries: int) -> tuple[float, float] | None:
    """The norms of ``entries`` values that a plain sum of squares in ``dtype`` gives exactly to rounding: above
    √(n · tiny / eps) the squares flushed below the smallest normal number (at most n · tiny) change the sum by less
    than eps, and below √max / 2 no partial sum overflows. None for a dtype narrower than float32 (summed in
    float64)."""
    if dtype not in (torch.float32, torch.float64):
        return None
    info = torch.finfo(dtype)
    return math.sqrt(max(entries, 1) * info.tiny / info.eps), math.sqrt(info.max) / 2


def _rescaled(values: Tensor, dims: int) -> Tensor:
    """m · ‖values / m‖ with m = max |values| over the last ``dims`` dimensions; inf where m is inf (and no entry
    NaN: then m is NaN, and so is the norm)."""
    if values.dim() > dims and values.shape[0] > ROWS_AT_ONCE:
        return torch.cat([_rescaled(part, dims) for part in values.split(ROWS_AT_ONCE)])
    axes = tuple(range(values.dim() - dims, values.dim()))
    largest = values.abs().amax(dim=axes, keepdim=True)
    safe = torch.where(largest > 0, largest, 1.0)
    scale = largest.reshape(values.shape[: values.dim() - dims])
    return torch.where(scale.isinf(), scale, torch.linalg.vector_norm(values / safe, dim=axes) * scale)


def starting_basis(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed orthonormal (size, min(size, SPECTRAL_BLOCK)) basis to start :func:`spectral_norm` from."""
    start = torch.randn(
        size, min(size, SPECTRAL_BLOCK), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    return torch.linalg.qr(start).Q.to(dtype=dtype, device=device)


def spectral_norm(matrix: Tensor, basis: Tensor, rtol: float = SPECTRAL_RTOL) -> tuple[Tensor, Tensor]:
    """σ₁ of each matrix (..., R, C) by subspace iteration from an orthonormal ``basis`` (..., R, p) of left
    vectors; returns σ₁ (...) and the basis reached, to start from for a similar matrix.

    U ← qr(M Mᵀ U); the estimate σ = σ₁(Mᵀ U) is a lower bound that increases to σ₁, its steps shrinking by
    ρ ≈ (σ_{p+1}/σ₁)² per iteration. With ρ read off two consecutive steps Δ, the remaining error is about
    Δ ρ / (1 − ρ); the iteration stops once that and the last step Δ itself are below rtol · σ, or once Δ is
    within rounding, NOISE · eps · σ (which also covers σ = 0).
    Matrices that have not converged in SPECTRAL_ITERATIONS get torch.linalg.svdvals. Where the top singular values
    cluster the steps are not geometric and the estimate of the remaining error is rough: tested against the SVD to
    1e-4 relative (lower bound).
    Cost: 2 products of (R × C) with (C × p) per iteration, against O(R·C·min(R, C)) for an SVD.
    """
    estimate = change = torch.zeros(matrix.shape[:-2], dtype=matrix.dtype, device=matrix.device)
    settled = torch.zeros_like(estimate, dtype=torch.bool)
    for _ in range(SPECTRAL_ITERATIONS):
        right = (basis.mT @ matrix).mT  # Mᵀ U, read row by row (3 times faster than matrix.mT @ basis)
        previous_change, previous = change, estimate
        estimate = torch.linalg.svdvals(right)[..., 0]
        change = (estimate - previous).abs()
        rate = (change / torch.where(previous_change > 0, previous_change, 1.0)).clamp(max=0.999)
        remaining = torch.maximum(change, change * rate / (1 - rate))  # the last step, and what may follow
        converged = (remaining <= rtol * estimate) & (previous_change > 0)
        settled = converged | (change <= NOISE * torch.finfo(matrix.dtype).eps * estimate)
        if bool(settled.all()):
            break
        basis = torch.linalg.qr(matrix @ right).Q
    else:
        estimate[~settled] = torch.linalg.svdvals(matrix[~settled])[..., 0]
    return estimate, basis
