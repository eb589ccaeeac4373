"""Frobenius norms that neither underflow nor overflow where the norm itself is representable.

A plain norm squares the entries, so in float32 any norm below about 1e-19 would come out as 0 and any above
about 1e19 as inf. Narrow floats are therefore summed in float64, whose range holds every square of a float32;
float64 norms outside 1e-140..1e140 (rare) are redone with the largest entry factored out first.
"""

from __future__ import annotations

import torch
from torch import Tensor

NARROW = (torch.float16, torch.bfloat16, torch.float32)
SAFE_RANGE = (1e-140, 1e140)  # float64 norms inside it lost nothing to squaring
ROWS_AT_ONCE = 1024  # leading entries rescaled together (bounds the temporary copy of a large tensor)


def frobenius(values: Tensor, dims: int) -> Tensor:
    """‖values‖₂ over the last ``dims`` dimensions, exact to rounding for every norm the dtype can hold."""
    axes = tuple(range(values.dim() - dims, values.dim()))
    if values.dtype in NARROW:
        return torch.linalg.vector_norm(values, dim=axes, dtype=torch.float64).to(values.dtype)
    norm = torch.linalg.vector_norm(values, dim=axes)
    if bool(((norm < SAFE_RANGE[0]) | (norm > SAFE_RANGE[1])).any()):
        return _rescaled(values, dims)
    return norm


def _rescaled(values: Tensor, dims: int) -> Tensor:
    """m · ‖values / m‖ with m = max |values| over the last ``dims`` dimensions."""
    if values.dim() > dims and values.shape[0] > ROWS_AT_ONCE:
        return torch.cat([_rescaled(part, dims) for part in values.split(ROWS_AT_ONCE)])
    axes = tuple(range(values.dim() - dims, values.dim()))
    largest = values.abs().amax(dim=axes, keepdim=True)
    safe = torch.where(largest > 0, largest, 1.0)
    return torch.linalg.vector_norm(values / safe, dim=axes) * largest.reshape(values.shape[: values.dim() - dims])
