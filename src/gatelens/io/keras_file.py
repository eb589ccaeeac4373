"""Keras files (``.keras``, legacy ``.h5``) → gatelens models, read without Keras or TensorFlow.

Keras (2 and 3) keeps one recurrent layer's weights as three arrays whose columns hold the gates side by side,
for row vectors x (1, I) and h (1, H), batch first:

    kernel K (I, k·H)      recurrent_kernel R (H, k·H)      bias b (k·H,), or (2, 3H) for a GRU with reset_after

GRU (k = 3, column blocks in gate order z, r, h), σ = recurrent_activation, φ = activation:

    z  = σ(x K_z + b_z + h R_z + b'_z)          r = σ(x K_r + b_r + h R_r + b'_r)
    reset_after=True:   hh = φ(x K_h + b_h + r ⊙ (h R_h + b'_h))      bias rows: [b; b'] = [input; recurrent]
    reset_after=False:  hh = φ(x K_h + b_h + (r ⊙ h) R_h)             bias (3H,) = b, and b' = 0
    h' = z ⊙ h + (1 − z) ⊙ hh                                         (update "keep")

    ↦ GRU(reset="after" | "before", update="keep"):  W_iz, W_ir, W_in = K_zᵀ, K_rᵀ, K_hᵀ;
      W_hz, W_hr, W_hn = R_zᵀ, R_rᵀ, R_hᵀ;  b_iz, b_ir, b_in = b_z, b_r, b_h;  b_hz, b_hr, b_hn = b'_z, b'_r, b'_h

LSTM (k = 4, gate order i, f, c, o):

    i = σ(x K_i + h R_i + b_i)   f = σ(x K_f + h R_f + b_f)   o = σ(x K_o + h R_o + b_o)
    c' = f ⊙ c + i ⊙ φ(x K_c + h R_c + b_c)        h' = o ⊙ φ(c')

    ↦ LSTM:  W_ii, W_if, W_ig, W_io = K_iᵀ, K_fᵀ, K_cᵀ, K_oᵀ;  W_h* likewise from R;  b_i* = b, b_h* = 0

SimpleRNN (k = 1):  h' = φ(x K + b + h R)   ↦ Elman:  W_ih = Kᵀ, W_hh = Rᵀ, b_ih = b, b_hh = 0

σ is ``sigmoid`` or ``hard_sigmoid``; the latter is clip(0.2·a + 0.5, 0, 1) in Keras 1 and 2 but
clip(a/6 + 0.5, 0, 1) in Keras 3, so it is read by the ``keras_version`` that wrote the file (hard_sigmoid_keras2
or hard_sigmoid_keras3) and refused when the file does not say. φ is ``tanh`` or ``relu``. Keras is batch first
(Keras 2's ``time_major=True`` is not). ``Bidirectional(…, merge_mode="concat")`` becomes a (forward, reverse) pair.

File layouts read:

    .keras   (Keras 3, tf.keras ≥ 2.13) a zip: config.json (the architecture), metadata.json (keras_version) and
             model.weights.h5, where a layer's arrays are ``<path>/cell/vars/0, 1, 2`` (kernel, recurrent_kernel,
             bias). <path> is built from class names, not layer names, numbered per container in the order of the
             model's layers: ``layers/gru``, ``layers/gru_1``, ``layers/sequential/layers/lstm`` (a nested model),
             ``layers/bidirectional/forward_layer`` (``_layer_checkpoint_dependencies`` for ``layers`` in 2.13).
             ``<path>/vars`` records the layer's name as an attribute in recent versions; it is checked.
    .h5      (``model.save("m.h5")``, Keras 2 and 3) root attributes model_config (JSON) and keras_version; the
             weights of top-level layer L are in group ``model_weights/L``, listed by its attribute weight_names
             (``gru/gru_cell/kernel:0`` from Keras 2, ``outer/gru/gru_cell/kernel`` from Keras 3).
    .weights.h5 (``save_weights``) has no architecture (no activations, no conventions) and is refused.

Nothing in a file is executed: only JSON and numeric arrays are read (no pickle, no Lambda layers, no custom
objects), and HDF5 soft and external links and external or virtual datasets are refused.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gatelens.cells import GRU, LSTM, Cell, Elman
from gatelens.model import Model

RECURRENT = {"GRU": 3, "LSTM": 4, "SimpleRNN": 1}  # supported layer classes and their gate counts
CELL_CLASSES = {"GRUCell": "GRU", "LSTMCell": "LSTM", "SimpleRNNCell": "SimpleRNN"}  # keras.layers.RNN(cell)
GATE_ORDER = {"GRU": ("z", "r", "n"), "LSTM": ("i", "f", "g", "o")}  # Keras column blocks → gatelens gate letters
RECURRENT_LOOKING = re.compile(r"GRU|LSTM|RNN|Recurrent|Bidirectional")
SUPPORTED = (
    "GRU, LSTM, SimpleRNN, RNN with a GRUCell, LSTMCell or SimpleRNNCell, and Bidirectional of one of these "
    "with merge_mode='concat'"
)
CONFIG_LIMIT = 64 * 2**20  # bytes of config.json / metadata.json read from a zip at most


@dataclass(frozen=True)
class _Direction:
    """One recurrence of a layer: its (cell-level) config and where its weights live in each layout."""

    kind: str  # GRU, LSTM or SimpleRNN
    config: dict[str, Any]
    store_path: str  # .keras: the layer's group in model.weights.h5 (its arrays are in <store_path>/cell/vars)
    legacy_names: tuple[str, ...]  # legacy .h5: weight names containing one of these components; () = all
    reverse: bool = False  # the backward layer of a Bidirectional (which reads the sequence backwards)


@dataclass(frozen=True)
class _Layer:
    """A recurrent-looking layer found in the model config."""

    name: str  # qualified by nested model names: "inner/gru"
    class_name: str  # "GRU", "Bidirectional(LSTM)", "ConvLSTM2D", …
    directions: tuple[_Direction, ...]  # (forward,) or (forward, backward); () when not supported
    problem: str | None  # why gatelens cannot read it
    legacy_group: str  # legacy .h5: the top-level layer whose group holds the weights


def from_keras(source: str | Path, *, layer: int | str | None = None) -> Model:
    """Read one recurrent layer of a Keras model file (``.keras`` or a full-model ``.h5``) as a gatelens model.

    ``layer`` chooses among the model's recurrent layers by index (in the order they appear in the model, nested
    models included) or by name (``"gru_1"``, or ``"inner/gru_1"`` inside a nested model ``inner``); it may be
    omitted when the model has exactly one. The model is batch first, like Keras, and keeps the file's dtype.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, str))):
        raise TypeError(f"layer must be an index (int) or a layer name (str), got {type(layer).__name__}")
    h5py = _h5py()
    try:
        if zipfile.is_zipfile(path):
            return _from_archive(path, layer, h5py)
        if h5py.is_hdf5(path):
            with _open_h5(h5py, path, path) as h5:
                return _from_h5(path, h5, layer, h5py)
    except UNREADABLE as error:  # damaged or malformed content, whatever part of the file it is in
        raise ValueError(f"{path} is not a readable Keras file: {type(error).__name__}: {error}") from None
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        raise ValueError(f"{path} is not a readable Keras file: a zip archive that is truncated or corrupt")
    raise ValueError(
        f"{path} is not a readable Keras file: it is neither a zip archive (.keras) nor an HDF5 file (.h5); "
        f"it starts with {head!r}"
    )


# ---------------------------------------------------------------------------------------------------------------
# file layouts


# What a damaged zip, JSON or HDF5 file, or a config of the wrong structure, raises while being read.
UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, RecursionError, KeyError, AttributeError, TypeError, IndexError)


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading Keras files needs h5py (but not Keras or TensorFlow): pip install gatelens[keras]"
        ) from None
    return h5py


def _open_h5(h5py: Any, file: Any, path: Path) -> Any:
    try:
        return h5py.File(file, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable Keras file: {error}") from None


def _from_archive(path: Path, choice: int | str | None, h5py: Any) -> Model:
    """A Keras 3 ``.keras`` zip: config.json, metadata.json and model.weights.h5."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable Keras file: {error}") from None
    with archive:
        names = set(archive.namelist())
        if "config.json" not in names:
            raise ValueError(
                f"{path} is not a readable Keras file: the zip holds no config.json (found {sorted(names)[:8]}); "
                f"a .keras file holds config.json, metadata.json and model.weights.h5"
            )
        config = _read_json(archive, "config.json", path)
        version = None
        if "metadata.json" in names:
            metadata = _read_json(archive, "metadata.json", path)
            version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        chosen = _choose(_recurrent_layers(config, path), choice, path)
        if "model.weights.h5" not in names:
            other = (
                " (model.weights.npz holds pickled objects, which gatelens never loads)"
                if any(n.endswith(".npz") for n in names)
                else ""
            )
            raise ValueError(
                f"{path} holds no model.weights.h5{other}; save the model with keras' default weights_format='h5'"
            )
        with archive.open("model.weights.h5") as member, _open_h5(h5py, member, path) as h5:
            arrays = [_keras3_arrays(h5, direction, path, h5py) for direction in chosen.directions]
            return _model(chosen, arrays, _version(version), path)


def _from_h5(path: Path, h5: Any, choice: int | str | None, h5py: Any) -> Model:
    """A legacy full-model ``.h5`` (model_config + model_weights), or a weights-only file (refused)."""
    if "model_config" not in h5.attrs:
        weights_only = "layers" in h5 or "vars" in h5 or "layer_names" in h5.attrs or "model_weights" in h5
        if weights_only:
            found = [n for n in ("layers", "vars", "model_weights") if n in h5] or ["layer_names"]
            raise ValueError(
                f"{path} is a weights-only Keras file (written by save_weights; it holds {', '.join(found)} but no "
                f"model_config): it has no architecture, so the layer types, activations and GRU conventions are "
                f"unknown. Load the .keras file of the model instead (model.save('model.keras')), or a full-model "
                f".h5 (model.save('model.h5'))"
            )
        raise ValueError(f"{path} is not a readable Keras file: an HDF5 file without a model_config attribute")
    config = _parse_json(_text(h5.attrs["model_config"]), f"{path}: model_config")
    version = h5.attrs.get("keras_version")
    if version is None and "model_weights" in h5:
        version = h5["model_weights"].attrs.get("keras_version")
    chosen = _choose(_recurrent_layers(config, path), choice, path)
    if "model_weights" not in h5:
        raise ValueError(f"{path} has a model_config but no model_weights group: the weights were not saved")
    weights = _group(h5, "model_weights", path, h5py)
    arrays = [_legacy_arrays(weights, chosen, direction, path, h5py) for direction in chosen.directions]
    return _model(chosen, arrays, _version(version), path)


def _read_json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    info = archive.getinfo(name)
    if info.file_size > CONFIG_LIMIT:
        raise ValueError(f"{path}: {name} declares {info.file_size} bytes, more than a model config needs")
    with archive.open(info) as f:
        return _parse_json(f.read(CONFIG_LIMIT + 1).decode("utf-8", errors="replace"), f"{path}: {name}")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None


def _text(value: Any) -> str:
    """An HDF5 string attribute (str, bytes or a 0-d array) as str."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _version(value: Any) -> str | None:
    return None if value is None else _text(value)


# ---------------------------------------------------------------------------------------------------------------
# the model config


def _recurrent_layers(config: Any, path: Path) -> list[_Layer]:
    """Every recurrent-looking layer of the model config, in model order (nested models are entered)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path}: the model config is not a Keras layer config (no class_name)")
    if _layers_of(config) is None:
        # a single layer saved on its own: treat it as a one-layer model
        config = {"class_name": "Sequential", "config": {"layers": [config]}}
    found: list[_Layer] = []
    others: list[str] = []
    _walk(config, "", "", None, found, others)
    if "Masking" in others or _masks_zero(config):
        warnings.warn(
            f"{path}: the model masks steps (a Masking layer or mask_zero=True); gatelens does not read masks: pass "
            f"lengths= to trace for padded sequences (steps masked inside a sequence cannot be expressed)",
            UserWarning,
            stacklevel=4,
        )
    if not found:
        listed = ", ".join(dict.fromkeys(others)) or "none"
        raise ValueError(
            f"{path} holds no recurrent layer (GRU, LSTM, SimpleRNN); the layer classes found are: {listed}"
        )
    return found


def _masks_zero(config: Any) -> bool:
    """Whether any layer config in the tree sets mask_zero=True (an Embedding that masks padding)."""
    if isinstance(config, dict):
        return config.get("mask_zero") is True or any(_masks_zero(value) for value in config.values())
    if isinstance(config, list):
        return any(_masks_zero(value) for value in config)
    return False


def _layers_of(entry: dict[str, Any]) -> list[Any] | None:
    """The layer list of a model's config (Sequential, Functional, Model), or None for a plain layer."""
    config = entry.get("config")
    if isinstance(config, list):  # Keras 2.0–2.2 Sequential: the config is the layer list itself
        return config
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return config["layers"]
    return None


def _name_of(entry: dict[str, Any]) -> str:
    config = entry.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return str(name if name is not None else entry.get("name", "?"))


def _snake(name: str) -> str:
    """Keras' naming.to_snake_case, which names the groups of model.weights.h5 after layer classes."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _walk(
    model: dict[str, Any], store: str, qualifier: str, top: str | None, found: list[_Layer], others: list[str]
) -> None:
    """Visit the layers of ``model`` as Keras 3 numbers them when saving: per container, by snake_case class."""
    layers = _layers_of(model) or []
    used: dict[str, int] = {}
    for position, entry in enumerate(layers):
        if not isinstance(entry, dict):
            continue
        class_name = str(entry.get("class_name", "?"))
        if model.get("class_name") == "Sequential" and position == 0 and class_name == "InputLayer":
            continue  # Sequential.layers leaves out its InputLayer, so Keras does not number it
        base = _snake(class_name)
        used[base] = used.get(base, -1) + 1
        unique = base if used[base] == 0 else f"{base}_{used[base]}"
        path = f"{store}layers/{unique}"
        name = _name_of(entry)
        if _layers_of(entry) is not None:
            _walk(entry, path + "/", f"{qualifier}{name}/", top or name, found, others)
            continue
        if RECURRENT_LOOKING.search(class_name) or RECURRENT_LOOKING.search(_wrapped_class(entry) or ""):
            found.append(_describe(entry, path, qualifier + name, top or name, nested=top is not None))
        else:
            others.append(class_name)


def _wrapped_class(entry: dict[str, Any]) -> str | None:
    """The class of the layer inside a wrapper (TimeDistributed, Bidirectional), if any."""
    inner = entry.get("config", {}).get("layer") if isinstance(entry.get("config"), dict) else None
    return str(inner.get("class_name")) if isinstance(inner, dict) else None


def _describe(entry: dict[str, Any], path: str, name: str, top: str, *, nested: bool) -> _Layer:
    """What a recurrent-looking layer is, and whether (and how) gatelens reads it."""
    class_name = str(entry.get("class_name"))
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    own = name.rsplit("/", 1)[-1]
    if class_name in RECURRENT:
        direction = _Direction(class_name, config, path, (own,) if nested else ())
        return _Layer(name, class_name, (direction,), None, top)
    if class_name == "RNN":
        cell = config.get("cell")
        cell_class = str(cell.get("class_name")) if isinstance(cell, dict) else type(cell).__name__
        label = f"RNN({cell_class})"
        if cell_class not in CELL_CLASSES or not isinstance(cell.get("config"), dict):
            return _Layer(name, label, (), f"a keras.layers.RNN with a {cell_class} cell is not supported", top)
        merged = dict(cell["config"]) | {k: config[k] for k in ("go_backwards", "time_major", "name") if k in config}
        direction = _Direction(CELL_CLASSES[cell_class], merged, path, (own,) if nested else ())
        return _Layer(name, label, (direction,), None, top)
    inner_class = _wrapped_class(entry)
    if class_name == "Bidirectional" and inner_class is not None:
        return _bidirectional(config, path, name, top, inner_class)
    label = f"{class_name}({inner_class})" if inner_class else class_name
    return _Layer(name, label, (), f"{label} is not a layer gatelens reads", top)


def _bidirectional(config: dict[str, Any], path: str, name: str, top: str, inner_class: str) -> _Layer:
    """Bidirectional(layer, merge_mode="concat") ↦ (forward, reverse); Keras flips the backward outputs back."""
    label = f"Bidirectional({inner_class})"
    merge = config.get("merge_mode", "concat")
    if merge != "concat":
        return _Layer(name, label, (), f"{label} with merge_mode={merge!r} is not supported (only 'concat')", top)
    forward = config["layer"]
    backward = config.get("backward_layer")
    if not isinstance(backward, dict):  # Keras 2 stores only the layer; the backward copy reads backwards
        backward = copy.deepcopy(forward)
        backward_config = backward.setdefault("config", {})
        backward_config["go_backwards"] = not forward.get("config", {}).get("go_backwards", False)
        backward_config["name"] = "backward_" + _name_of(forward).removeprefix("forward_")
    directions = []
    for side, entry in (("forward", forward), ("backward", backward)):
        inner = _describe(entry, f"{path}/{side}_layer", _name_of(entry), top, nested=True)
        if inner.problem or len(inner.directions) != 1:
            problem = inner.problem or f"{inner.class_name} inside a Bidirectional"
            return _Layer(name, label, (), f"{label}: {problem}", top)
        own = _name_of(entry)
        hints = (own, f"{side}_{own.removeprefix(side + '_')}")
        found = inner.directions[0]
        directions.append(_Direction(found.kind, found.config, found.store_path, hints, side == "backward"))
    forward_back, backward_back = (bool(d.config.get("go_backwards", False)) for d in directions)
    if forward_back or not backward_back:
        problem = f"{label} whose forward layer has go_backwards={forward_back} and backward layer {backward_back}"
        return _Layer(name, label, (), f"{problem} is not supported", top)
    return _Layer(name, label, tuple(directions), None, top)


def _choose(layers: list[_Layer], choice: int | str | None, path: Path) -> _Layer:
    """The layer picked by ``layer=`` (an index among the recurrent layers, or a name), checked to be readable."""
    listing = "; ".join(f"{i}: {layer.name!r} ({layer.class_name})" for i, layer in enumerate(layers))
    if choice is None:
        if len(layers) > 1:
            raise ValueError(
                f"{path} holds {len(layers)} recurrent layers ({listing}); pass layer= (an index or a name) "
                f"to choose one"
            )
        chosen = layers[0]
    elif isinstance(choice, int):
        if not -len(layers) <= choice < len(layers):
            raise ValueError(
                f"layer={choice} is out of range: {path} holds {len(layers)} recurrent layer(s) ({listing})"
            )
        chosen = layers[choice]
    else:
        matches = [layer for layer in layers if choice in (layer.name, layer.name.rsplit("/", 1)[-1])]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise ValueError(f"{what} recurrent layer named {choice!r} in {path}; choose one of: {listing}")
        chosen = matches[0]
    if chosen.problem:
        raise ValueError(f"layer {chosen.name!r} of {path}: {chosen.problem}; gatelens reads {SUPPORTED}")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# weights


def _group(parent: Any, key: str, path: Path, h5py: Any) -> Any:
    """parent[key] for a '/'-separated key, following hard links only (soft and external links are refused)."""
    node = parent
    for part in key.split("/"):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            raise KeyError(key)
        if not isinstance(link, h5py.HardLink):
            raise ValueError(f"{path}: {key} is an HDF5 {type(link).__name__}; gatelens follows only hard links")
        node = node[part]
    return node


def _has(parent: Any, key: str, path: Path, h5py: Any) -> bool:
    try:
        _group(parent, key, path, h5py)
    except KeyError:
        return False
    return True


def _array(dataset: Any, key: str, path: Path, h5py: Any) -> np.ndarray:
    """A dataset's values; float16 and bfloat16 become float32, float32 and float64 stay as they are."""
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{path}: {key} is not a dataset")
    if dataset.external or dataset.is_virtual:
        raise ValueError(f"{path}: {key} keeps its data outside the file; gatelens reads only data inside it")
    values = dataset[()]
    if _text(dataset.attrs.get("dtype", "")) == "bfloat16" and values.dtype.itemsize == 2:
        values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{path}: {key} holds {values.dtype} values, expected floating point weights")
    return values.astype(np.float32) if values.dtype.itemsize < 4 else values


def _keras3_arrays(h5: Any, direction: _Direction, path: Path, h5py: Any) -> dict[str, np.ndarray]:
    """kernel, recurrent_kernel and (if any) bias from ``<layer>/cell/vars/0, 1, 2`` of model.weights.h5."""
    layer_path = _locate(h5, direction, path, h5py)
    key = f"{layer_path}/cell/vars"
    if not _has(h5, key, path, h5py):
        raise ValueError(f"{path}: model.weights.h5 has no {key} for layer {direction.config.get('name')!r}")
    group = _group(h5, key, path, h5py)
    indices = sorted(group.keys(), key=lambda k: int(k) if k.isdigit() else -1)
    if indices != [str(i) for i in range(len(indices))] or len(indices) not in (2, 3):
        raise ValueError(f"{path}: expected {key}/0, 1 and (with a bias) 2, found {sorted(group.keys())}")
    roles = ("kernel", "recurrent_kernel", "bias")
    return {role: _array(_group(group, i, path, h5py), f"{key}/{i}", path, h5py) for role, i in zip(roles, indices)}


def _locate(h5: Any, direction: _Direction, path: Path, h5py: Any) -> str:
    """The layer's group: where Keras' naming puts it, checked against the name recorded in ``<group>/vars``;
    otherwise the one group whose recorded name is the layer's."""
    name = direction.config.get("name")
    candidates = [direction.store_path, direction.store_path.replace("layers/", "_layer_checkpoint_dependencies/")]
    for candidate in candidates:
        if _has(h5, candidate, path, h5py):
            recorded = _recorded_name(h5, candidate, path, h5py)
            if recorded is None or recorded == name:
                return candidate
    matches: list[str] = []

    def visit(key: str, node: Any) -> None:
        if key.endswith("/vars") and isinstance(node, h5py.Group) and _text(node.attrs.get("name", "")) == name:
            layer_key = key[: -len("/vars")]
            if _has(h5, f"{layer_key}/cell/vars", path, h5py):
                matches.append(layer_key)

    h5.visititems(visit)
    if len(matches) != 1:
        raise ValueError(
            f"{path}: cannot find the weights of layer {name!r} in model.weights.h5 (expected them under "
            f"{direction.store_path}/cell/vars; {len(matches)} groups record that name)"
        )
    return matches[0]


def _recorded_name(h5: Any, key: str, path: Path, h5py: Any) -> str | None:
    if not _has(h5, f"{key}/vars", path, h5py):
        return None
    value = _group(h5, f"{key}/vars", path, h5py).attrs.get("name")
    return None if value is None else _text(value)


def _attribute_list(group: Any, name: str) -> list[str]:
    """A string-list attribute, which Keras splits into name0, name1, … when it outgrows an HDF5 header."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, index = [], 0
        while f"{name}{index}" in group.attrs:
            chunks.append(group.attrs[f"{name}{index}"])
            index += 1
    return [_text(value) for chunk in chunks for value in np.atleast_1d(chunk)]


def _legacy_arrays(weights: Any, layer: _Layer, direction: _Direction, path: Path, h5py: Any) -> dict[str, np.ndarray]:
    """kernel, recurrent_kernel and bias of one direction from ``model_weights/<top-level layer>``."""
    if not _has(weights, layer.legacy_group, path, h5py):
        raise ValueError(f"{path}: model_weights has no group {layer.legacy_group!r} for layer {layer.name!r}")
    group = _group(weights, layer.legacy_group, path, h5py)
    names = _attribute_list(group, "weight_names")
    hints = set(direction.legacy_names)
    if hints:
        names = [n for n in names if hints & set(n.split("/"))]
    arrays: dict[str, np.ndarray] = {}
    for weight in names:
        role = weight.rsplit("/", 1)[-1].split(":")[0]
        if role not in ("kernel", "recurrent_kernel", "bias"):
            continue
        if role in arrays:
            raise ValueError(
                f"{path}: model_weights/{layer.legacy_group} has several {role} arrays for layer {layer.name!r} "
                f"({names}); cannot tell which belongs to it"
            )
        arrays[role] = _array(
            _group(group, weight, path, h5py), f"model_weights/{layer.legacy_group}/{weight}", path, h5py
        )
    if "kernel" not in arrays or "recurrent_kernel" not in arrays:
        raise ValueError(
            f"{path}: found no kernel and recurrent_kernel for layer {layer.name!r} in "
            f"model_weights/{layer.legacy_group} (its weight_names: {_attribute_list(group, 'weight_names')})"
        )
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# cells


def _model(layer: _Layer, arrays: list[dict[str, np.ndarray]], version: str | None, path: Path) -> Model:
    cells = [
        _cell(d, a, version, f"layer {layer.name!r} ({layer.class_name})") for d, a in zip(layer.directions, arrays)
    ]
    time_major = {bool(d.config.get("time_major", False)) for d in layer.directions}
    source = f"keras:{path}:layer {layer.name} ({layer.class_name})"
    spec = [tuple(cells)] if len(cells) == 2 else cells
    return Model(spec, batch_first=not time_major.pop(), source=source)


def _activation(config: dict[str, Any], key: str, where: str) -> str:
    """The activation's name; Keras serialises a function given by object as {"class_name": "function", …}."""
    value = config.get(key, "linear")
    if isinstance(value, dict):
        value = value.get("config") if value.get("class_name") == "function" else value.get("class_name")
    if value is None:
        value = "linear"
    if not isinstance(value, str):
        raise ValueError(f"{where}: cannot read {key}={value!r}")
    return value


def _candidate(config: dict[str, Any], where: str) -> str:
    name = _activation(config, "activation", where)
    if name not in ("tanh", "relu"):
        raise ValueError(f"{where}: activation {name!r} is not supported; gatelens reads 'tanh' and 'relu'")
    return name


def _gate(config: dict[str, Any], version: str | None, where: str) -> str:
    name = _activation(config, "recurrent_activation", where)
    if name == "sigmoid":
        return "sigmoid"
    if name != "hard_sigmoid":
        raise ValueError(
            f"{where}: recurrent_activation {name!r} is not supported; gatelens reads 'sigmoid' and 'hard_sigmoid'"
        )
    major = (version or "").strip().split(".")[0]
    if major in ("1", "2"):
        return "hard_sigmoid_keras2"
    if major == "3":
        return "hard_sigmoid_keras3"
    raise ValueError(
        f"{where}: recurrent_activation 'hard_sigmoid' is clip(0.2·a + 0.5, 0, 1) in Keras 1 and 2 but "
        f"clip(a/6 + 0.5, 0, 1) in Keras 3, and the file's keras_version ({version!r}) does not say which Keras "
        f"wrote it"
    )


def _cell(direction: _Direction, arrays: dict[str, np.ndarray], version: str | None, where: str) -> Cell:
    """A gatelens cell from one Keras recurrence's config and arrays (see the module docstring for the mapping)."""
    config, kind = direction.config, direction.kind
    if config.get("go_backwards") and not direction.reverse:
        raise ValueError(
            f"{where} has go_backwards=True (it reads the sequence last step first and returns its outputs "
            f"reversed), which gatelens does not read; flip the input in time and use go_backwards=False"
        )
    units = config.get("units")
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"{where}: the config has no valid 'units' ({units!r}); Keras 1 configs are not supported")
    use_bias = bool(config.get("use_bias", True))
    if use_bias != ("bias" in arrays):
        found = "a bias" if "bias" in arrays else "no bias"
        raise ValueError(f"{where}: the config says use_bias={use_bias} but the file holds {found}")
    gates = RECURRENT[kind]
    kernel, recurrent = arrays["kernel"], arrays["recurrent_kernel"]
    reset_after = bool(config.get("reset_after", False)) if kind == "GRU" else False
    expected = {
        "kernel": (kernel.shape[0] if kernel.ndim == 2 else -1, gates * units),
        "recurrent_kernel": (units, gates * units),
        "bias": (2, gates * units) if reset_after else (gates * units,),
    }
    for role, array in arrays.items():
        if tuple(array.shape) != expected[role]:
            raise ValueError(
                f"{where}: {role} has shape {tuple(array.shape)}, expected {expected[role]} for units={units}"
            )
    if len({a.dtype for a in arrays.values()}) > 1:
        raise ValueError(
            f"{where}: the weights have different dtypes {sorted({str(a.dtype) for a in arrays.values()})}"
        )
    candidate = _candidate(config, where)
    if kind == "SimpleRNN":
        weights = {"W_ih": _tensor(kernel.T), "W_hh": _tensor(recurrent.T)}
        if use_bias:
            weights |= {"b_ih": _tensor(arrays["bias"]), "b_hh": _tensor(np.zeros_like(arrays["bias"]))}
        return Elman(weights, nonlinearity=candidate)
    gate = _gate(config, version, where)
    letters = GATE_ORDER[kind]
    weights = _split(kernel, "W_i", letters) | _split(recurrent, "W_h", letters)
    if use_bias:
        bias = arrays["bias"]
        input_bias, recurrent_bias = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
        weights |= _split(input_bias[None, :], "b_i", letters) | _split(recurrent_bias[None, :], "b_h", letters)
    if kind == "GRU":
        return GRU(weights, reset="after" if reset_after else "before", update="keep", gate=gate, candidate=candidate)
    return LSTM(weights, gate=gate, candidate=candidate)


def _split(matrix: np.ndarray, stem: str, letters: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Column blocks of a Keras (rows, k·H) matrix ↦ gatelens blocks (H, rows), or (H,) for a one-row bias."""
    width = matrix.shape[1] // len(letters)
    blocks = {}
    for index, letter in enumerate(letters):
        block = matrix[:, index * width : (index + 1) * width].T
        blocks[f"{stem}{letter}"] = _tensor(block[:, 0] if stem.startswith("b") else block)
    return blocks


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
