"""ONNX files → gatelens models: one GRU, LSTM or RNN node of an ONNX graph becomes a one-layer Model.

Each ONNX recurrent op is one layer with D directions (1, or 2 when bidirectional). Its inputs and outputs are

    X (T, B, I) with layout=0, (B, T, I) with layout=1           → Model(batch_first=layout == 1)
    W (D, G·H, I)   R (D, G·H, H)   B (D, 2·G·H) = [Wb; Rb]        the G gates' rows packed in ONNX's gate order
    Y (T, D, B, H) with layout=0, (B, T, D, H) with layout=1     gatelens (as PyTorch): (T, B, D·H) or (B, T, D·H)

With f, g, h the node's activations (ONNX's defaults in brackets) and H the previous state:

    GRU  [f=Sigmoid, g=Tanh], gate rows z, r, h:
        z = f(W_z x + Wb_z + R_z H + Rb_z)        r = f(W_r x + Wb_r + R_r H + Rb_r)
        linear_before_reset=0:  h~ = g(W_h x + Wb_h + R_h (r ⊙ H) + Rb_h)       → reset "before"
        linear_before_reset=1:  h~ = g(W_h x + Wb_h + r ⊙ (R_h H + Rb_h))       → reset "after"
        H' = (1 − z) ⊙ h~ + z ⊙ H                                                → update "keep"
        W_z, W_r, W_h → W_iz, W_ir, W_in        R_z, R_r, R_h → W_hz, W_hr, W_hn
        [Wb_z, Wb_r, Wb_h, Rb_z, Rb_r, Rb_h] → b_iz, b_ir, b_in, b_hz, b_hr, b_hn
    LSTM [f=Sigmoid, g=Tanh, h=Tanh], gate rows i, o, f, c:
        i = f(W_i x + Wb_i + R_i H + Rb_i)   o = f(W_o x + …)   f_t = f(W_f x + …)   c~ = g(W_c x + Wb_c + R_c H + Rb_c)
        C' = f_t ⊙ C + i ⊙ c~        H' = o ⊙ h(C')
        W_i, W_o, W_f, W_c → W_ii, W_io, W_if, W_ig  (ONNX's cell gate c is gatelens' g); R_· → W_hi, W_ho, W_hf, W_hg
        [Wb_i, Wb_o, Wb_f, Wb_c, Rb_i, Rb_o, Rb_f, Rb_c] → b_ii, b_io, b_if, b_ig, b_hi, b_ho, b_hf, b_hg
        gatelens' LSTM uses one candidate activation for c~ and for C', so g and h must be the same.
    RNN  [f=Tanh]:  H' = f(W x + Wb + R H + Rb);   W, R → W_ih, W_hh;   [Wb, Rb] → b_ih, b_hh  (an Elman cell)

Without B the cells have no biases (the same as ONNX's zero default). Activations map as Sigmoid → "sigmoid",
HardSigmoid(α=0.2, β=0.5) → "hard_sigmoid_keras2" and HardSigmoid(α=1/6, β=0.5) → "hard_sigmoid_keras3" as gates
(f), Tanh → "tanh" and Relu → "relu" as candidates (g, h, and an RNN's f). activation_alpha and activation_beta are
consumed in order by the activations that take parameters, as ONNX Runtime reads them; names are case-insensitive.
The activations of the two directions of a bidirectional node may differ: each direction is its own cell.

direction="reverse" becomes ``Model(reverse=True)``, which reads each sequence from its last step to its first.
Refused with a ValueError that names the cause:
the clip attribute, input_forget=1, peephole weights P (unless all zero), any other activation, and weights that
are not constants of the file (an initializer or a Constant node, possibly behind Identity nodes).

Per-call data is not read from the file: sequence_lens (pass ``lengths=`` to ``Model.trace``) and initial_h /
initial_c (pass ``h0=``; traces start from zeros otherwise, and a constant nonzero initial state gets a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens.cells import GRU, LSTM, Cell, Elman
from gatelens.model import Model

OPS = ("GRU", "LSTM", "RNN")
ONNX_DOMAINS = ("", "ai.onnx")
INPUTS = {
    "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
    "LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
    "RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
}
# ONNX's gate row order → gatelens' gate letters (block W_i<letter>, W_h<letter>, b_i<letter>, b_h<letter>).
GATE_LETTERS = {"GRU": "zrn", "LSTM": "iofg"}
ROLES = {"GRU": ("f", "g"), "LSTM": ("f", "g", "h"), "RNN": ("f",)}
DEFAULT_ACTIVATIONS = {"GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh"), "RNN": ("Tanh",)}
# Which ONNX activations take (alpha, beta), as ONNX Runtime consumes activation_alpha / activation_beta.
TAKES_ALPHA_BETA = {
    "relu": (False, False),
    "tanh": (False, False),
    "sigmoid": (False, False),
    "affine": (True, True),
    "leakyrelu": (True, False),
    "thresholdedrelu": (True, False),
    "scaledtanh": (True, True),
    "hardsigmoid": (True, True),
    "elu": (True, False),
    "softsign": (False, False),
    "softplus": (False, False),
}
ALPHA_BETA_DEFAULTS = {"hardsigmoid": (0.2, 0.5), "leakyrelu": (0.01, 0.0), "elu": (1.0, 0.0)}
HARD_SIGMOIDS = {"hard_sigmoid_keras2": 0.2, "hard_sigmoid_keras3": 1.0 / 6.0}
GATES = ("sigmoid", "hard_sigmoid_keras2", "hard_sigmoid_keras3")
CANDIDATES = ("tanh", "relu")


def from_onnx(source: str | Path | bytes | Any, *, node: int | str | None = None) -> Model:
    """A one-layer gatelens model from the GRU, LSTM or RNN node of an ONNX model (see the module docstring).

    source: a path to a ``.onnx`` file, its bytes, or an ``onnx.ModelProto``; it is parsed, never executed.
    node: which recurrent node, when the graph has several: its index among the GRU/LSTM/RNN nodes (in graph
        order) or its name. A multi-layer network exported to ONNX holds one node per layer.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("reading ONNX files needs the onnx package: pip install gatelens[onnx]") from None
    proto, label = _read(onnx, source)
    graph = proto.graph
    index, rnn = _choose(graph, node, label)
    op = rnn.op_type
    where = f"node {rnn.name or index} ({op})"
    attributes = {a.name: _decoded(onnx.helper.get_attribute_value(a)) for a in rnn.attribute}
    constants = _Constants(onnx, graph, where)
    inputs = dict(zip(INPUTS[op], list(rnn.input) + [""] * len(INPUTS[op])))

    directions = _directions(attributes, where)
    if "clip" in attributes:
        raise ValueError(
            f"{where} has the attribute clip={attributes['clip']:g}: gatelens cells do not clip pre-activations; "
            f"export the model without clip"
        )
    if op == "LSTM" and attributes.get("input_forget", 0):
        raise ValueError(f"{where} has input_forget=1 (coupled input and forget gates), which gatelens' LSTM lacks")
    if attributes.get("layout", 0) not in (0, 1):
        raise ValueError(f"{where} has layout={attributes['layout']}; expected 0 (time-major) or 1 (batch-first)")
    _check_per_call_inputs(inputs, constants, where)

    w, r = constants.tensor(inputs["W"], "W"), constants.tensor(inputs["R"], "R")
    b = constants.tensor(inputs["B"], "B") if inputs["B"] else None
    if op == "LSTM" and inputs["P"]:
        peepholes = constants.tensor(inputs["P"], "P")
        if np.any(peepholes != 0):
            raise ValueError(f"{where} has peephole weights P (input {inputs['P']!r}), which gatelens' LSTM lacks")
    gates = len(GATE_LETTERS.get(op, "h"))
    hidden = _check_shapes(w, r, b, gates, directions, attributes.get("hidden_size"), where)
    activations = _activations(op, attributes, directions, where)

    cells = [
        _cell(op, w[d], r[d], None if b is None else b[d], hidden, activations[d], attributes)
        for d in range(directions)
    ]
    layers = [tuple(cells)] if directions == 2 else [cells[0]]
    return Model(
        layers,
        batch_first=attributes.get("layout", 0) == 1,
        reverse=attributes.get("direction", "forward") == "reverse",
        source=f"onnx:{label}:{where}",
    )


# ---------------------------------------------------------------------------------------------------------------


def _read(onnx: Any, source: Any) -> tuple[Any, str]:
    """The ModelProto and a label for messages and ``Model.source``."""
    if isinstance(source, onnx.ModelProto):
        proto, label = source, "<ModelProto>"
    elif isinstance(source, (bytes, bytearray)):
        label = "<bytes>"
        try:
            proto = onnx.load_model_from_string(bytes(source))
        except Exception as error:  # protobuf raises DecodeError and others for bytes that are not ONNX
            raise ValueError(f"{label} is not a readable ONNX model: {_first_line(error)}") from None
    elif isinstance(source, (str, Path)):
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        try:
            proto = onnx.load(path)
        except Exception as error:  # DecodeError for text or other binaries; OSError for missing external data
            raise ValueError(f"{path} is not a readable ONNX file: {_first_line(error)}") from None
    else:
        raise TypeError(f"from_onnx reads a path, bytes or an onnx.ModelProto, got {type(source).__name__}")
    if not proto.HasField("graph") or not proto.graph.node:
        raise ValueError(f"{label} is not a readable ONNX file: it holds no graph nodes")
    return proto, label


def _decoded(value: Any) -> Any:
    """Attribute values with ONNX's byte strings as str (direction, activations)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0] or type(error).__name__


def _choose(graph: Any, node: int | str | None, label: str) -> tuple[int, Any]:
    """The recurrent node asked for: (its index among the recurrent nodes, the NodeProto)."""
    found = [n for n in graph.node if n.op_type in OPS and n.domain in ONNX_DOMAINS]
    listing = ", ".join(f"{i}: {n.name!r} ({n.op_type})" for i, n in enumerate(found))
    if not found:
        kinds = sorted({n.op_type if n.domain in ONNX_DOMAINS else f"{n.domain}.{n.op_type}" for n in graph.node})
        raise ValueError(f"{label} has no GRU, LSTM or RNN node; its graph holds {', '.join(kinds)}")
    if node is None:
        if len(found) > 1:
            raise ValueError(
                f"{label} has {len(found)} recurrent nodes ({listing}); pass node= (an index or a node name) "
                f"to choose one"
            )
        return 0, found[0]
    if isinstance(node, bool) or not isinstance(node, (int, str)):
        raise TypeError(f"node must be an index or a node name, got {type(node).__name__}")
    if isinstance(node, int):
        if not 0 <= node < len(found):
            raise ValueError(f"node={node} is out of range: {label} has {len(found)} recurrent node(s) ({listing})")
        return node, found[node]
    matches = [i for i, n in enumerate(found) if n.name == node]
    if not matches:
        raise ValueError(f"{label} has no recurrent node named {node!r}; its recurrent nodes are {listing}")
    if len(matches) > 1:
        raise ValueError(f"{label} has {len(matches)} recurrent nodes named {node!r} ({listing}); pass an index")
    return matches[0], found[matches[0]]


class _Constants:
    """Values fixed by the file: initializers and Constant nodes (through Identity nodes)."""

    def __init__(self, onnx: Any, graph: Any, where: str) -> None:
        self.onnx, self.where = onnx, where
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input} - set(self.initializers)
        self.producers = {out: n for n in graph.node for out in n.output}

    def source(self, name: str) -> tuple[str, Any]:
        """("initializer" | "constant", proto) for constants, else ("input" | "computed" | "unknown", …)."""
        seen = set()
        while name not in seen:
            seen.add(name)
            if name in self.initializers:
                return "initializer", self.initializers[name]
            if name in self.graph_inputs:
                return "input", None
            producer = self.producers.get(name)
            if producer is None:
                return "unknown", None
            if producer.op_type == "Identity" and producer.domain in ONNX_DOMAINS:
                name = producer.input[0]
                continue
            if producer.op_type == "Constant" and producer.domain in ONNX_DOMAINS:
                return "constant", producer
            return "computed", producer
        return "unknown", None  # pragma: no cover - a cycle of Identity nodes is not a valid graph

    def tensor(self, name: str, role: str) -> np.ndarray:
        """The value of the constant input ``role`` (named ``name`` in the graph), or a ValueError naming it."""
        kind, proto = self.source(name)
        try:
            if kind == "initializer":
                return self.onnx.numpy_helper.to_array(proto)
            if kind == "constant":
                return self._constant_value(proto)
        except ValueError:
            raise
        except Exception as error:  # e.g. external data that was not found next to the file
            raise ValueError(f"{self.where}: cannot read input {role} ({name!r}): {_first_line(error)}") from None
        what = {
            "input": "a graph input, supplied at run time",
            "computed": f"computed by a {proto.op_type if proto is not None else '?'} node",
            "unknown": "produced by nothing in the graph",
        }[kind]
        raise ValueError(
            f"{self.where}: input {role} ({name!r}) is {what}; gatelens needs the weights W, R and B stored in "
            f"the file (an initializer or a Constant node)"
        )

    def _constant_value(self, node: Any) -> np.ndarray:
        for attribute in node.attribute:
            if attribute.name == "value":
                return self.onnx.numpy_helper.to_array(attribute.t)
            if attribute.name in ("value_float", "value_floats"):
                return np.asarray(self.onnx.helper.get_attribute_value(attribute), dtype=np.float32)
        raise ValueError(f"{self.where}: Constant node {node.name!r} holds no float tensor")


def _directions(attributes: dict[str, Any], where: str) -> int:
    """How many recurrences the node holds: 1 (forward or reverse) or 2 (bidirectional)."""
    direction = attributes.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"{where} has direction={direction!r}; expected 'forward', 'reverse' or 'bidirectional'")
    return 2 if direction == "bidirectional" else 1


def _check_per_call_inputs(inputs: dict[str, str], constants: _Constants, where: str) -> None:
    """sequence_lens must not be fixed in the file; a constant nonzero initial state is ignored with a warning."""
    if inputs["sequence_lens"]:
        kind, _ = constants.source(inputs["sequence_lens"])
        if kind in ("initializer", "constant"):
            raise ValueError(
                f"{where}: sequence_lens ({inputs['sequence_lens']!r}) is a constant of the file; gatelens takes "
                f"sequence lengths per call: make it a graph input, or omit it and pass lengths= to trace"
            )
    for role in ("initial_h", "initial_c"):
        name = inputs.get(role, "")
        if name and constants.source(name)[0] in ("initializer", "constant"):
            value = constants.tensor(name, role)
            if np.any(value != 0):
                warnings.warn(
                    f"{where}: {role} ({name!r}) is a nonzero constant; gatelens traces start from the h0 given "
                    f"to trace (zeros by default), so pass it there to reproduce the ONNX model's output",
                    UserWarning,
                    stacklevel=3,
                )


def _check_shapes(
    w: np.ndarray, r: np.ndarray, b: np.ndarray | None, gates: int, directions: int, hidden_size: Any, where: str
) -> int:
    """The hidden size H, after checking dtypes and the shapes W (D, G·H, I), R (D, G·H, H), B (D, 2·G·H)."""
    for role, array in (("W", w), ("R", r), ("B", b)):
        if array is not None and array.dtype not in (np.float32, np.float64):
            raise ValueError(f"{where}: {role} has dtype {array.dtype}; gatelens reads float32 or float64 weights")
    if len({a.dtype for a in (w, r, b) if a is not None}) > 1:
        raise ValueError(f"{where}: W, R and B have different dtypes ({w.dtype}, {r.dtype}, {b.dtype})")
    if r.ndim != 3:
        raise ValueError(f"{where}: R has shape {r.shape}; expected (num_directions, {gates}·H, H)")
    hidden = r.shape[-1]
    if hidden == 0:
        raise ValueError(f"{where}: R has shape {r.shape}: a hidden size of 0")
    if hidden_size is not None and hidden_size != hidden:
        raise ValueError(f"{where}: hidden_size={hidden_size} but R has shape {r.shape} (H = {hidden})")
    expected = {
        "W": (directions, gates * hidden, w.shape[-1] if w.ndim == 3 else "I"),
        "R": (directions, gates * hidden, hidden),
        "B": (directions, 2 * gates * hidden),
    }
    for role, array in (("W", w), ("R", r), ("B", b)):
        if array is not None and array.shape != expected[role]:
            raise ValueError(
                f"{where}: {role} has shape {array.shape}, expected {expected[role]} for {directions} direction(s), "
                f"{gates} gate(s) and hidden size {hidden}"
            )
    return hidden


def _activations(op: str, attributes: dict[str, Any], directions: int, where: str) -> list[tuple[str, ...]]:
    """Per direction, the gatelens activation names for the op's roles (f, g[, h])."""
    roles = ROLES[op]
    names = attributes.get("activations")
    if names is None:
        names = list(DEFAULT_ACTIVATIONS[op]) * directions
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}: activations must be a list of names (strings), got {names!r:.80}")
    if len(names) != len(roles) * directions:
        raise ValueError(
            f"{where} lists {len(names)} activations {names}; a {op} with {directions} direction(s) needs "
            f"{len(roles) * directions} ({', '.join(roles)} per direction)"
        )
    alphas = iter(attributes.get("activation_alpha", []))
    betas = iter(attributes.get("activation_beta", []))
    per_direction = []
    for d in range(directions):
        chosen = []
        for role, name in zip(roles, names[d * len(roles) : (d + 1) * len(roles)]):
            key = name.lower()
            if key not in TAKES_ALPHA_BETA:
                raise ValueError(f"{where}: unknown activation {name!r} (as {role})")
            takes_alpha, takes_beta = TAKES_ALPHA_BETA[key]
            alpha_default, beta_default = ALPHA_BETA_DEFAULTS.get(key, (0.0, 0.0))
            alpha = next(alphas, alpha_default) if takes_alpha else None
            beta = next(betas, beta_default) if takes_beta else None
            chosen.append(_activation(op, role, name, alpha, beta, where))
        if op == "LSTM" and chosen[1] != chosen[2]:
            raise ValueError(
                f"{where}: activations g={chosen[1]!r} and h={chosen[2]!r} differ; gatelens' LSTM uses one "
                f"candidate activation for both the cell input and the cell output"
            )
        per_direction.append(tuple(chosen))
    return per_direction


def _activation(op: str, role: str, name: str, alpha: float | None, beta: float | None, where: str) -> str:
    """The gatelens name of one ONNX activation in the given role, or a ValueError that says why not."""
    key = name.lower()
    gate_role = op != "RNN" and role == "f"
    if key == "hardsigmoid":
        found = next(
            (n for n, slope in HARD_SIGMOIDS.items() if abs(alpha - slope) <= 1e-6 and abs(beta - 0.5) <= 1e-6),
            None,
        )
        if found is None:
            raise ValueError(
                f"{where}: HardSigmoid with alpha={alpha:g}, beta={beta:g} (as {role}) is not supported; gatelens "
                f"has alpha=0.2, beta=0.5 (Keras 2, ONNX's default) and alpha=1/6, beta=0.5 (Keras 3)"
            )
        gatelens = found
    else:
        gatelens = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu"}.get(key)
        if gatelens is None:
            raise ValueError(
                f"{where}: activation {name!r} (as {role}) is not supported; gatelens has Sigmoid and HardSigmoid "
                f"for gates, Tanh and Relu for candidates"
            )
    allowed = GATES if gate_role else CANDIDATES
    if gatelens not in allowed:
        what = f"the gate activation {role}" if gate_role else f"activation {role}"
        expected = "Sigmoid or HardSigmoid" if gate_role else "Tanh or Relu"
        raise ValueError(f"{where}: {name!r} as {what} is not supported; expected {expected}")
    return gatelens


def _cell(
    op: str,
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray | None,
    hidden: int,
    activations: Sequence[str],
    attributes: dict[str, Any],
) -> Cell:
    """One direction's cell from its ONNX W (G·H, I), R (G·H, H) and B (2·G·H)."""

    def rows(array: np.ndarray, index: int) -> Tensor:
        return torch.tensor(array[index * hidden : (index + 1) * hidden])

    if op == "RNN":
        blocks = {"W_ih": rows(w, 0), "W_hh": rows(r, 0)}
        if b is not None:
            blocks |= {"b_ih": rows(b, 0), "b_hh": rows(b, 1)}
        return Elman(blocks, nonlinearity=activations[0])
    letters = GATE_LETTERS[op]
    blocks = {f"W_i{g}": rows(w, k) for k, g in enumerate(letters)}
    blocks |= {f"W_h{g}": rows(r, k) for k, g in enumerate(letters)}
    if b is not None:
        blocks |= {f"b_i{g}": rows(b, k) for k, g in enumerate(letters)}
        blocks |= {f"b_h{g}": rows(b, len(letters) + k) for k, g in enumerate(letters)}
    if op == "GRU":
        reset = "after" if attributes.get("linear_before_reset", 0) else "before"
        return GRU(blocks, reset=reset, update="keep", gate=activations[0], candidate=activations[1])
    return LSTM(blocks, gate=activations[0], candidate=activations[1])
