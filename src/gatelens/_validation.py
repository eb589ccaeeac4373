"""Input checks done once, at the boundary, with messages that say what was expected and what was given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_float_tensor(
    value: Any, name: str, dtype: torch.dtype, device: torch.device, *, convert: bool = False
) -> Tensor:
    """Convert ``value`` to a floating tensor of ``dtype``.

    A torch tensor must already have ``dtype`` (a silent cast would change the precision the user chose) unless
    ``convert`` is set, as for values read from a file (the command line computes in the model's or --dtype's
    dtype); numpy arrays and nested lists are converted, since their float64 default is not a choice. Whatever
    holds them, values must be real numbers (:func:`check_real`).
    """
    if isinstance(value, Tensor):
        check_real(value.dtype, name)
        if not convert:
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
            if value.dtype != dtype:
                raise TypeError(
                    f"{name} has dtype {value.dtype} but the model is {dtype}; convert one of them "
                    f"(model.to({value.dtype}) or {name}.to({dtype}))"
                )
        return value.to(device=device, dtype=dtype)
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(f"{name} must be a rectangular array; got nested lists of uneven lengths") from None
        check_real(array.dtype, name)
        return torch.as_tensor(array, dtype=dtype, device=device)
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")


TORCH_INTEGERS = {
    getattr(torch, kind) for kind in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    if hasattr(torch, kind)
}  # fmt: skip


def check_real(dtype: np.dtype | torch.dtype, name: str) -> None:
    """Raise unless ``dtype`` (numpy's or torch's) holds real numbers: integers or floats, not bool, complex,
    strings or Python objects, which no cast turns into inputs without losing or inventing something."""
    if isinstance(dtype, torch.dtype):
        real, holder = dtype.is_floating_point or dtype in TORCH_INTEGERS, "a tensor"
    else:
        real, holder = np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating), "an array"
    if not real:
        raise TypeError(f"{name} must hold real numbers, got {holder} of dtype {dtype}")


FLOAT64_ADVICE = "trace in float64 (model.to(torch.float64) and a float64 input; --dtype float64 on the command line)"


def first_non_finite(values: Tensor, *, latest: bool = False) -> tuple[int, int] | None:
    """The (step, sequence) of the first non-finite entry of ``values`` (T, B, …) in time order — or, with
    ``latest``, the last, where a backward sweep first overflowed — or None when every entry is finite. ``values``
    may also be the (T, B) boolean mask of the finite (step, sequence) pairs."""
    finite = values if values.dtype == torch.bool else torch.isfinite(values).flatten(2).all(-1)  # (T, B)
    if bool(finite.all()):
        return None
    bad = torch.nonzero(~finite)  # in time order
    step, sequence = bad[int(bad[:, 0].argmax())] if latest else bad[0]
    return int(step), int(sequence)


def check_finite(value: Tensor, name: str) -> None:
    """Raise if ``value`` holds NaN or Inf (one cheap reduction first, as scikit-learn does)."""
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def as_index(value: Any, name: str, size: int) -> int:
    """An integer (Python or numpy, not bool) in 0..size−1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 0..{size - 1}, got {value!r}")
    if not 0 <= int(value) < size:
        raise ValueError(f"{name} must be an int in 0..{size - 1}, got {int(value)}")
    return int(value)


def check_shape(value: Tensor, expected: Sequence[int], name: str, hint: str = "") -> None:
    """Raise if ``value`` does not have exactly the shape ``expected``."""
    if tuple(value.shape) != tuple(expected):
        message = f"{name} has shape {tuple(value.shape)}, expected {tuple(expected)}"
        raise ValueError(message + (f" ({hint})" if hint else ""))


def as_lengths(lengths: Any, batch: int, steps: int, device: torch.device) -> Tensor:
    """Sequence lengths as a (B,) long tensor, each in 1..T."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
        values = lengths.to(device=device, dtype=torch.long)
    else:
        array = np.asarray(lengths)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"lengths must be integers, got {array.dtype}")
        values = torch.as_tensor(array, dtype=torch.long, device=device)
    if values.shape != (batch,):
        raise ValueError(f"lengths has shape {tuple(values.shape)}, expected ({batch},): one length per sequence")
    if values.numel() and (int(values.min()) < 1 or int(values.max()) > steps):
        raise ValueError(
            f"lengths must lie in 1..{steps} (the number of time steps), got min {int(values.min())}, "
            f"max {int(values.max())}"
        )
    return values
