"""Loaders: a user's model, whatever its form, becomes a gatelens :class:`~gatelens.Model`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gatelens.cells import Cell
from gatelens.io.pytorch import from_module, from_state_dict, load_file
from gatelens.model import Model

__all__ = ["load", "from_module", "from_state_dict", "load_file"]


def load(source: Any, **options: Any) -> Model:
    """A gatelens model from a PyTorch module, a state_dict, a saved file, a cell or a list of layers.

    Files are read by their suffix: ``.onnx`` (options: ``node``), ``.keras``, ``.h5`` and ``.weights.h5``
    (options: ``layer``), anything else as a PyTorch state_dict or checkpoint. ``options`` go to the state_dict
    reader (``prefix``, ``kind``, ``nonlinearity``, ``batch_first``) for dicts and PyTorch files, and to
    :class:`~gatelens.Model` (``batch_first``) for cells.
    """
    if isinstance(source, (Model, nn.Module)):
        if options:
            raise TypeError(f"a {type(source).__name__} carries its own settings; unexpected options {sorted(options)}")
        return source if isinstance(source, Model) else from_module(source)
    if isinstance(source, (str, Path)):
        suffix = "".join(Path(source).suffixes[-2:]) if str(source).endswith(".weights.h5") else Path(source).suffix
        if suffix.lower() == ".onnx":
            from gatelens.io.onnx_file import from_onnx

            return from_onnx(source, **options)
        if suffix.lower() in (".keras", ".h5", ".weights.h5"):
            from gatelens.io.keras_file import from_keras

            return from_keras(source, **options)
        return load_file(source, **options)
    if isinstance(source, Mapping):
        return from_state_dict(source, **options)
    if isinstance(source, Cell) or (isinstance(source, (list, tuple)) and source):
        unknown = sorted(set(options) - {"batch_first"})
        if unknown:
            raise TypeError(f"cells take only the option batch_first; unexpected options {unknown}")
        return Model(source, **options)
    raise TypeError(
        f"cannot load a {type(source).__name__}; expected a torch RNN module (nn.GRU, nn.LSTM, nn.RNN or a Cell "
        f"version), a state_dict or a path to one, a gatelens cell, or a list of layers"
    )
