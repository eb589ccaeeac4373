"""Tensors as JSON-ready lists: JSON has no NaN or infinity, so those become None."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def json_list(values: Tensor) -> Any:
    """Nested lists of floats (or one float) with every NaN and ±inf replaced by None."""
    array = values.detach().cpu().double().numpy()
    return np.where(np.isfinite(array), array, None).tolist()


def json_number(value: float) -> float | None:
    """A float, or None where it is NaN or infinite."""
    return float(value) if np.isfinite(value) else None
