"""What the commands share: common options, reading a model and its input, device and dtype."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from gatelens._validation import as_float_tensor, check_finite, check_real
from gatelens.io import load
from gatelens.io.pytorch import read_torch_file
from gatelens.model import Model
from gatelens.report.findings import findings_table
from gatelens.trace import Trace

STATE_DICT_OPTIONS = ("nonlinearity", "reset", "update", "batch_first")  # what a PyTorch state_dict cannot tell
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_common_options(command: argparse.ArgumentParser) -> None:
    """Options every command has."""
    command.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def add_model_options(command: argparse.ArgumentParser) -> None:
    """The model file, its input, and where and how to compute: the options of analyze, explain, jacobians, credit."""
    model = command.add_argument_group("model")
    model.add_argument(
        "checkpoint", help="a PyTorch state_dict (.pt, .pth; loaded with weights_only), .onnx or .keras/.h5"
    )
    model.add_argument(
        "--prefix",
        help="which recurrent module: a state_dict key prefix (e.g. 'encoder.rnn'), an ONNX node or a Keras layer "
        "(name or index); needed when the file holds several",
    )
    model.add_argument("--nonlinearity", choices=("tanh", "relu"), help="an RNN's nonlinearity (a state_dict has none)")
    model.add_argument(
        "--reset", choices=("after", "before"), help="a GRU's reset placement (default: after, PyTorch's)"
    )
    model.add_argument("--update", choices=("keep", "replace"), help="a GRU's update convention (default: keep)")
    model.add_argument("--batch-first", action="store_true", help="the input is (B, T, I), as for batch_first=True")
    data = command.add_argument_group("input")
    data.add_argument(
        "--input",
        help="the input sequences: a tensor in .pt or an array in .npy, (T, B, I) or (T, I); (B, T, I) with "
        "--batch-first and for Keras files, which are batch first like Keras",
    )
    data.add_argument("--steps", type=int, default=50, help="without --input: random sequences of this length (50)")
    data.add_argument("--batch", type=int, default=4, help="without --input: this many random sequences (4)")
    data.add_argument("--seed", type=int, default=0, help="seed of random inputs and probe readouts (0)")
    compute = command.add_argument_group("computation")
    compute.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, …")
    compute.add_argument("--dtype", choices=tuple(DTYPES), help="compute in this dtype (default: the model's own)")
    command.add_argument("--json", action="store_true", help="print the result as JSON on stdout (messages on stderr)")
    add_common_options(command)


@dataclass(frozen=True)
class Loaded:
    """A model with its input, traced: ``note`` says where the input came from."""

    model: Model
    trace: Trace
    note: str


@dataclass(frozen=True)
class Input:
    """A model on its device and dtype, with its input ``x`` in the model's dtype (on the CPU, not yet traced: a
    data set is traced batch by batch); ``note`` says where the input came from."""

    model: Model
    x: torch.Tensor
    note: str


def load_and_trace(arguments: argparse.Namespace) -> Loaded:
    """Read the model and its input as the options say, move both to the device and dtype, and trace."""
    return trace_input(load_input(arguments))


def trace_input(given: Input) -> Loaded:
    """The model traced on its whole input, on the model's device."""
    return Loaded(given.model, given.model.trace(given.x.to(given.model.device)), given.note)


def load_input(arguments: argparse.Namespace) -> Input:
    """Read the model and its input as the options say; the model moved to the device and dtype, the input
    converted to that dtype."""
    device = _device(arguments.device)
    model = _model(arguments)
    widened = ""
    if arguments.dtype is not None:
        model = model.to(DTYPES[arguments.dtype])
    elif model.dtype not in DTYPES.values():  # float16 / bfloat16 weights: the analyses need float32 at least
        widened = f"; the {str(model.dtype).removeprefix('torch.')} weights are analysed in float32"
        model = model.to(torch.float32)
    model = model.to(device)
    x, note = _input(arguments, model)
    return Input(model, x.to(dtype=model.dtype), note + widened)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ValueError(f"device {name!r} is not available on this machine; use --device cpu")
    return device


def _model(arguments: argparse.Namespace) -> Model:
    path = Path(arguments.checkpoint)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a file saved with torch.save, an .onnx or a .keras file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    given = {option: getattr(arguments, option) for option in STATE_DICT_OPTIONS if getattr(arguments, option)}
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".keras", ".h5"):
        recorded = sorted(f"--{option.replace('_', '-')}" for option in given)
        if recorded:
            verb = "applies" if len(recorded) == 1 else "apply"
            raise ValueError(f"{', '.join(recorded)} {verb} to PyTorch state_dicts; a {suffix} file records its own")
        choice: int | str | None = arguments.prefix
        if choice is not None and choice.isdigit():
            choice = int(choice)
        with _flag_names():
            return load(path, **({} if choice is None else {"node" if suffix == ".onnx" else "layer": choice}))
    with _flag_names():
        return load(path, prefix=arguments.prefix, **given)


FLAG_NAMES = (  # the loaders' words for their options → the command line's flags
    (re.compile(r"\b(?:prefix|node|layer)= ?"), "--prefix "),
    (re.compile(r"nonlinearity='tanh' or 'relu'"), "--nonlinearity tanh or relu"),
    (re.compile(r"\breset= and update="), "--reset and --update"),
)


@contextlib.contextmanager
def _flag_names() -> Iterator[None]:
    """Re-raise a loader's ValueError with the command line's flag names in place of the Python options."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        for pattern, flag in FLAG_NAMES:
            message = pattern.sub(flag, message)
        raise ValueError(message) from None


def _input(arguments: argparse.Namespace, model: Model) -> tuple[torch.Tensor, str]:
    """The input as a (T, B, I) tensor (batch first if the model is), and a note on where it came from."""
    if arguments.input is None:
        for name in ("steps", "batch"):
            if getattr(arguments, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(arguments, name)}")
        generator = torch.Generator().manual_seed(arguments.seed)
        shape = (arguments.steps, arguments.batch, model.input_size)
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        note = (
            f"no --input given: {arguments.batch} random sequences of {arguments.steps} steps, N(0, 1), "
            f"seed {arguments.seed}"
        )
        return (x.transpose(0, 1) if model.batch_first else x), note
    path = Path(arguments.input)
    if path.is_dir():
        raise ValueError(f"--input {path} is a directory; expected a .npy file or a tensor saved with torch.save")
    if not path.is_file():
        raise FileNotFoundError(f"no such input file: {path}")
    # the checks of model.trace(x), naming the file: real numbers first, finite values after the shape
    x = as_float_tensor(_read_array(path), str(path), model.dtype, torch.device("cpu"), convert=True)
    layout = "(B, T, I)" if model.batch_first else "(T, B, I)"
    if x.dim() == 2:
        x = x.unsqueeze(0 if model.batch_first else 1)  # one sequence
    if x.dim() != 3:
        raise ValueError(f"{path} holds an array of shape {tuple(x.shape)}; expected {layout} or (T, I)")
    if x.shape[-1] != model.input_size:
        raise ValueError(
            f"{path} has {x.shape[-1]} features per step (shape {tuple(x.shape)}), but the model takes "
            f"{model.input_size}; expected {layout} with I = {model.input_size}"
        )
    check_finite(x, str(path))
    return x, f"input {path.name}: shape {tuple(x.shape)} {layout}"


def _read_array(path: Path) -> np.ndarray | torch.Tensor:
    """The array in a .npy file (never unpickled) or the one tensor in a torch file (weights_only), as stored;
    :func:`_input` validates and converts it as the API does."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            reason = " ".join(str(error).split())
        stored = _npy_dtype(path)
        if stored is not None:
            check_real(stored, str(path))  # an array of Python objects: refused as the API refuses one
        raise ValueError(f"{path} is not a readable .npy array: {reason}")
    value = read_torch_file(path)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}; expected one tensor, saved with torch.save(x, path)")
    return value


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype a .npy file's header declares, or None where the header cannot be read."""
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with path.open("rb") as file:
            version = np.lib.format.read_magic(file)
            return headers[version](file)[2] if version in headers else None
    except (ValueError, OSError, EOFError):
        return None


def print_outcome(
    console: Console, results: dict[str, Any], explanation: Any, files: list[Path], out: Path, *, as_json: bool
) -> None:
    """What an analysis wrote: ``results`` and the files as JSON on stdout, or the findings as a table; then where."""
    if as_json:
        print_json(results | {"files": [str(path) for path in files]})
    else:
        console.print(findings_table({"model": explanation}))
    console.print(f"results in {out}: " + ", ".join(path.name for path in files))


def print_json(value: Any) -> None:
    """``value`` as JSON on stdout; NaN and ±inf become null, numpy scalars plain numbers."""
    json.dump(_plain(value), sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
