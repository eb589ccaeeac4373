"""Norms that neither underflow nor overflow: the largest magnitude is factored out before squaring."""

from __future__ import annotations

import torch
from torch import Tensor

ROWS_AT_ONCE = 1024  # leading entries normalised together (bounds the temporary copy of a large tensor)


def frobenius(values: Tensor, dims: int) -> Tensor:
    """‖values‖₂ over the last ``dims`` dimensions, computed as m · ‖values / m‖ with m = max |values|.

    A plain norm squares the entries, so in float32 any norm below about 1e-19 would come out as 0 and any above
    about 1e19 as inf; scaled first, every norm the dtype can represent comes out exact to rounding.
    """
    if values.dim() > dims and values.shape[0] > ROWS_AT_ONCE:
        return torch.cat([frobenius(part, dims) for part in values.split(ROWS_AT_ONCE)])
    axes = tuple(range(values.dim() - dims, values.dim()))
    largest = torch.linalg.vector_norm(values, ord=float("inf"), dim=axes, keepdim=True)
    safe = torch.where(largest > 0, largest, 1.0)
    return torch.linalg.vector_norm(values / safe, dim=axes) * largest.reshape(values.shape[: values.dim() - dims])
