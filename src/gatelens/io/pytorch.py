"""PyTorch modules and state_dicts → gatelens models.

PyTorch packs the gates of one layer into one matrix, row blocks in gate order:

    nn.GRU / nn.GRUCell    weight_ih (3H, I) = [W_ir; W_iz; W_in]   weight_hh (3H, H) = [W_hr; W_hz; W_hn]
                           bias_ih = [b_ir; b_iz; b_in]              bias_hh = [b_hr; b_hz; b_hn]
                           convention: reset "after", update "keep", sigmoid gates, tanh candidate
    nn.LSTM / nn.LSTMCell  weight_ih (4H, I) = [W_ii; W_if; W_ig; W_io]   weight_hh (4H, P) = [W_hi; …; W_ho]
                           weight_hr (P, H) = W_proj  (only with proj_size = P > 0)
    nn.RNN / nn.RNNCell    weight_ih = W_ih, weight_hh = W_hh, bias_ih = b_ih, bias_hh = b_hh

Multi-layer modules suffix ``_l{k}`` (and ``_reverse`` for the backward direction); cells have no suffix.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gatelens.cells import GRU, LSTM, Cell, Elman
from gatelens.model import Model

KINDS = ("GRU", "LSTM", "RNN")
GATE_COUNT = {"GRU": 3, "LSTM": 4, "RNN": 1}
GATE_LETTERS = {"GRU": "rzn", "LSTM": "ifgo"}
PARAMETER = re.compile(
    r"^(?P<prefix>(?:.*\.)?)(?P<param>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
    r"(?:_l(?P<layer>\d+))?(?P<reverse>_reverse)?$"
)


def from_module(module: nn.Module) -> Model:
    """Read a torch RNN module (GRU, LSTM, RNN or their Cell versions), or the one such module inside ``module``.

    The weights are copied: later training of the module does not change the model.
    """
    if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        found = [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        if len(found) != 1:
            listed = ", ".join(f"{name} ({type(m).__name__})" for name, m in found) or "none"
            raise TypeError(
                f"{type(module).__name__} is not a recurrent module and holds {len(found)} recurrent submodules "
                f"({listed}); pass exactly one of them, e.g. gl.load(model.{found[0][0] if found else 'rnn'})"
            )
        module = found[0][1]
    nonlinearity = None
    if isinstance(module, nn.RNNBase):
        mode = module.mode
        kind = "RNN" if mode.startswith("RNN") else mode
        if kind == "RNN":
            nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        batch_first = module.batch_first
        if module.training and module.dropout > 0 and module.num_layers > 1:
            warnings.warn(
                f"the {type(module).__name__} is in training mode with dropout={module.dropout} between layers; "
                f"gatelens traces the deterministic forward pass, which equals the module's in eval mode",
                UserWarning,
                stacklevel=3,
            )
    else:
        kind = {nn.GRUCell: "GRU", nn.LSTMCell: "LSTM", nn.RNNCell: "RNN"}.get(type(module))  # type: ignore[arg-type]
        if kind is None:
            raise TypeError(f"unsupported recurrent cell type {type(module).__name__}")
        if kind == "RNN":
            nonlinearity = module.nonlinearity  # type: ignore[assignment]
        batch_first = False
    return from_state_dict(
        module.state_dict(),
        kind=kind,
        nonlinearity=nonlinearity,
        batch_first=batch_first,
        source=f"torch.nn.{type(module).__name__}",
    )


def from_state_dict(
    state: Mapping[str, Any],
    *,
    prefix: str | None = None,
    kind: str | None = None,
    nonlinearity: str | None = None,
    reset: str | None = None,
    update: str | None = None,
    batch_first: bool | None = None,
    source: str = "state_dict",
) -> Model:
    """Build a model from a PyTorch state_dict (nested checkpoint dicts are searched too).

    The architecture is read from the tensor names and shapes: the number of layers, directions, hidden size,
    projection, bias, and the kind (3 gates: GRU, 4: LSTM, 1: RNN). What shapes cannot tell must be passed:
    ``nonlinearity`` ('tanh' or 'relu') for an RNN, ``batch_first`` for the input layout (not given: inputs are
    read as (T, B, I), with a warning when one looks like (B, T, I); see :class:`~gatelens.Model`), and ``prefix``
    when the dict holds several recurrent modules (the full dotted prefix, or its end when that names one module:
    "rnn" for "state_dict.model.rnn"). A GRU is read in PyTorch's convention (reset "after", update "keep")
    unless ``reset`` ("before" or "after") or ``update`` ("keep" or "replace") say otherwise, for weights that a
    differently written GRU stored in PyTorch's layout.
    """
    flat = _flatten(state)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        match = PARAMETER.match(key)
        if match and isinstance(value, Tensor):
            groups.setdefault(match["prefix"], {})[key[len(match["prefix"]) :]] = value
    groups = {p: g for p, g in groups.items() if any(k.startswith("weight_ih") for k in g)}
    if prefix is None:
        if len(groups) != 1:
            found = ", ".join(repr(p.rstrip(".")) for p in groups) or "none"
            raise ValueError(
                f"expected one recurrent module in the state_dict, found {len(groups)} ({found}); "
                + ("pass prefix= to choose one" if groups else "its keys should look like 'weight_ih_l0'")
            )
        prefix = next(iter(groups))
    else:
        prefix = prefix if prefix.endswith(".") or not prefix else prefix + "."
        # the module's own prefix also names it inside a checkpoint's wrapper ("state_dict.model.rnn." for "rnn")
        within = [group for group in groups if group.endswith("." + prefix)]
        if prefix not in groups and len(within) == 1:
            prefix = within[0]
        if prefix not in groups:
            found = ", ".join(repr(p.rstrip(".")) for p in groups) or "none"
            raise ValueError(f"no recurrent weights under prefix {prefix.rstrip('.')!r}; found {found}")
    tensors = groups[prefix]
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{prefix}{name} must be floating point, got {tensor.dtype}")
    layered = any("_l" in name for name in tensors)
    if layered and any("_l" not in name for name in tensors):
        raise ValueError(f"{prefix!r} mixes layer-suffixed (weight_ih_l0) and cell (weight_ih) parameter names")
    kind = _infer_kind(tensors, "weight_hh_l0" if layered else "weight_hh", "weight_hr_l0", kind, prefix)
    if kind != "RNN" and nonlinearity is not None:
        raise ValueError(f"nonlinearity= applies to an RNN only; this state_dict holds a {kind}")
    if kind == "RNN" and nonlinearity is None:
        raise ValueError("a state_dict does not record an RNN's nonlinearity; pass nonlinearity='tanh' or 'relu'")
    if kind != "GRU" and (reset, update) != (None, None):
        raise ValueError(f"reset= and update= apply to a GRU only; this state_dict holds a {kind}")
    convention = {"reset": reset or "after", "update": update or "keep"}
    if not layered:
        cell = _cell(kind, tensors, "", nonlinearity, prefix, convention)
        return Model(cell, batch_first=batch_first, source=source)
    layer_count = 1 + max(int(PARAMETER.match(name)["layer"]) for name in tensors)  # type: ignore[index]
    bidirectional = any(name.endswith("_reverse") for name in tensors)
    layers = []
    for layer in range(layer_count):
        suffixes = [f"_l{layer}", f"_l{layer}_reverse"] if bidirectional else [f"_l{layer}"]
        layers.append(tuple(_cell(kind, tensors, suffix, nonlinearity, prefix, convention) for suffix in suffixes))
    known = {
        f"{p}{s}"
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        for layer in range(layer_count)
        for s in (f"_l{layer}", f"_l{layer}_reverse")
    }
    stray = sorted(set(tensors) - known)
    if stray:
        raise ValueError(f"unexpected recurrent parameters {stray} under {prefix!r}")
    return Model(layers if bidirectional else [cells[0] for cells in layers], batch_first=batch_first, source=source)


def load_file(path: str | Path, **options: Any) -> Model:
    """Read a state_dict (or a checkpoint dict holding one) saved with ``torch.save``; never runs pickled code."""
    path = Path(path)
    state = read_torch_file(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (a dict of tensors)")
    options.setdefault("source", str(path))
    return from_state_dict(state, **options)


def read_torch_file(path: Path) -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (tensors, containers, numbers and
    numpy scalars; never code), or one ValueError saying why the file cannot be read.

    A file in torch's zip format is first checked against the CRC-32 its archive records for every record, since
    torch.load does not check them: bytes changed inside a tensor's record would load as changed weights. A legacy
    file (``torch.save(..., _use_new_zipfile_serialization=False)``) records no checksum and is read as it is.
    """
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a file saved with torch.save")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() in (".npy", ".npz"):
        raise ValueError(f"{path} is a numpy file, not one saved with torch.save")
    _check_archive(path)
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file; all mean "cannot read this"
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and unsupported:
            raise ValueError(
                f"{path} holds a pickled Python object ({unsupported[1]}), not just tensors; gatelens loads files "
                f"with weights_only=True and never runs code from them. Save the weights instead: "
                f"torch.save(module.state_dict(), path)"
            ) from None
        if isinstance(error, EOFError) or path.stat().st_size == 0:
            raise ValueError(f"{path} is not a readable PyTorch file: it is empty or cut short") from None
        raise ValueError(
            f"{path} is not a readable PyTorch file: torch.load(weights_only=True) found {type(error).__name__}; "
            f"check that it is what torch.save wrote"
        ) from None


def _check_archive(path: Path) -> None:
    """Raise if ``path`` is a zip archive (torch's format since 1.6) with a record whose bytes do not match the
    CRC-32 the archive holds for it, or whose structure is damaged; other files are left to torch.load."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record, checking each against its CRC-32
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path} is not a readable PyTorch file: its zip archive is damaged ({reason})") from None
    if damaged is not None:
        raise ValueError(
            f"{path} is not a readable PyTorch file: record {damaged!r} of its zip archive does not match the "
            f"CRC-32 recorded for it, so its bytes changed after torch.save wrote them; copy or save the file again"
        )


def _numpy_scalars() -> list[Any]:
    """The numpy globals a checkpoint may hold (scalars such as np.int64(3) and their dtypes): data, not code."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype, *{type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"}]


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (checkpoints such as {"model": state_dict, "optimizer": …}) ↦ one dict of dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def _infer_kind(tensors: dict[str, Tensor], hh_name: str, hr_name: str, kind: str | None, prefix: str) -> str:
    """GRU, LSTM or RNN from the row/column ratio of weight_hh (3, 4 or 1 gates), checked against ``kind``."""
    if hh_name not in tensors:
        raise ValueError(f"missing {prefix}{hh_name}; found {sorted(tensors)}")
    weight_hh = tensors[hh_name]
    if weight_hh.dim() != 2:
        raise ValueError(f"{prefix}{hh_name} must be 2-D, got shape {tuple(weight_hh.shape)}")
    hidden = tensors[hr_name].shape[-1] if hr_name in tensors else weight_hh.shape[1]
    ratio, remainder = divmod(weight_hh.shape[0], hidden) if hidden else (0, 1)
    inferred = {3: "GRU", 4: "LSTM", 1: "RNN"}.get(ratio) if remainder == 0 else None
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
        if inferred != kind:
            raise ValueError(
                f"{prefix}{hh_name} has shape {tuple(weight_hh.shape)}: a {kind} needs "
                f"{GATE_COUNT[kind]}·H rows, got {weight_hh.shape[0]} rows for H = {hidden}"
            )
    if inferred is None:
        raise ValueError(
            f"{prefix}{hh_name} has shape {tuple(weight_hh.shape)}: rows must be 1, 3 or 4 times the hidden size "
            f"(RNN, GRU, LSTM)"
        )
    return inferred


def _cell(
    kind: str,
    tensors: dict[str, Tensor],
    suffix: str,
    nonlinearity: str | None,
    prefix: str,
    convention: Mapping[str, str],
) -> Cell:
    """One layer and direction's cell from its packed PyTorch tensors, with shapes checked under their own names;
    ``convention`` holds a GRU's reset and update conventions."""
    names = {p: f"{p}{suffix}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
    for required in ("weight_ih", "weight_hh"):
        if names[required] not in tensors:
            raise ValueError(f"missing {prefix}{names[required]}; found {sorted(tensors)}")
    tensors = {name: tensor.detach().clone() for name, tensor in tensors.items() if name in names.values()}
    w_ih, w_hh = tensors[names["weight_ih"]], tensors[names["weight_hh"]]
    w_hr = tensors.get(names["weight_hr"])
    if w_hr is not None and kind != "LSTM":
        raise ValueError(f"{prefix}{names['weight_hr']}: only an LSTM has a projection (weight_hr)")
    hidden = w_hr.shape[1] if w_hr is not None else w_hh.shape[1]
    out = w_hr.shape[0] if w_hr is not None else hidden
    rows = GATE_COUNT[kind] * hidden
    expected = {
        "weight_ih": (rows, w_ih.shape[-1]),
        "weight_hh": (rows, out),
        "bias_ih": (rows,),
        "bias_hh": (rows,),
        "weight_hr": (out, hidden),
    }
    for part, name in names.items():
        if name in tensors and tuple(tensors[name].shape) != expected[part]:
            raise ValueError(
                f"{prefix}{name} has shape {tuple(tensors[name].shape)}, expected {expected[part]} "
                f"for a {kind} with hidden size {hidden}"
            )
    has_bias = [names[b] in tensors for b in ("bias_ih", "bias_hh")]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"{prefix}: found only one of {names['bias_ih']} and {names['bias_hh']}; need both or neither")
    blocks: dict[str, Tensor] = {}
    if kind == "RNN":
        blocks = {"W_ih": w_ih, "W_hh": w_hh}
        if all(has_bias):
            blocks |= {"b_ih": tensors[names["bias_ih"]], "b_hh": tensors[names["bias_hh"]]}
        return Elman(blocks, nonlinearity=nonlinearity or "tanh")
    letters = GATE_LETTERS[kind]
    packed = {"W_i": w_ih, "W_h": w_hh}
    if all(has_bias):
        packed |= {"b_i": tensors[names["bias_ih"]], "b_h": tensors[names["bias_hh"]]}
    for stem, tensor in packed.items():
        blocks |= {f"{stem}{gate}": chunk for gate, chunk in zip(letters, tensor.chunk(len(letters), dim=0))}
    if kind == "GRU":
        return GRU(blocks, **convention)
    if w_hr is not None:
        blocks["W_proj"] = w_hr
    return LSTM(blocks)
