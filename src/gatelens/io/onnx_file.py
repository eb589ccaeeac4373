"""ONNX files → gatelens models: one GRU, LSTM or RNN node of an ONNX graph becomes a one-layer Model.

Each ONNX recurrent op is one layer with D directions (1, or 2 when bidirectional). Its inputs and outputs are

    X (T, B, I) with layout=0, (B, T, I) with layout=1           read from the graph's input, see below
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

The model takes its input as the graph does. X is followed back to where it comes from through layout-only nodes,
and ``Model.batch_first`` says how that source's axes reach X's T and B:

    a graph input      (T, B, I) → batch_first=False, (B, T, I) → batch_first=True, unbatched (T, I) → False
                       (both torch exporters write a batch_first module as input (B, T, I) → Transpose(perm=[1, 0, 2])
                       → GRU(layout=0), and an unbatched one as input (T, I) → Unsqueeze(axes=[1]) → GRU)
    another recurrent node's Y    the batch_first of that node's model, so that layers chain as in the export:
                       ``load(f, node=k).trace(load(f, node=k − 1).trace(x).output)``; Y's T and B axes must reach
                       X's T and B, and its (D, H) axes X's features in that order (one-direction D squeezed away)

The layout-only nodes accepted on the way are Identity; Transpose (any perm: only where the axes end up matters);
Squeeze of axes of size 1 that carry no data (an axis Unsqueeze inserted, a one-direction node's D) and Unsqueeze,
each with constant axes; and Reshape that keeps the leading axes and merges the trailing ones into the last (shape
[0, 0, -1], or those sizes written out as the dynamo exporter does), which turns a node's Y (T, B, D, H) into (T, B,
D·H). Anything else on the way (an op that computes values, a Squeeze of a data axis, a Reshape that splits or mixes
axes, a source whose axes do not reach X as above) is refused with a ValueError naming the node.

``trace.output`` follows PyTorch's module layout, (B, T, D·H) for a batch-first model and (T, B, D·H) otherwise: for
a graph exported from PyTorch that is the graph's own output after the Squeeze/Transpose/Reshape nodes the exporters
write after the recurrent node (those nodes are not read; only the node's weights and its input layout are).

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
LAYOUT_OPS = ("Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape")  # followed from X back to its source
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

    The model's ``batch_first`` is the layout of the graph's input as it reaches the node's X through layout-only
    nodes (a batch_first PyTorch export: input (B, T, I) → Transpose → GRU(layout=0) gives batch_first=True), or,
    for a node fed by another recurrent node, that node's. Other nodes before X are refused by name.
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
        batch_first=_InputLayout(onnx, proto, constants).batch_first(rnn, where),
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


def _attribute(onnx: Any, node: Any, name: str, default: Any) -> Any:
    """A node attribute's value (str for strings), or ``default``."""
    found = [a for a in node.attribute if a.name == name]
    return _decoded(onnx.helper.get_attribute_value(found[0])) if found else default


def _described(node: Any) -> str:
    """A node for messages: its op and its name (or its first output where it has no name)."""
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node (output {node.output[0]!r})"


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

    def value(self, name: str, role: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant of the file, else None; ``role`` names it in messages."""
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
        return None

    def tensor(self, name: str, role: str) -> np.ndarray:
        """The value of the constant input ``role`` (named ``name`` in the graph), or a ValueError naming it."""
        value = self.value(name, role)
        if value is not None:
            return value
        kind, proto = self.source(name)
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
            if attribute.name in ("value_int", "value_ints"):
                return np.asarray(self.onnx.helper.get_attribute_value(attribute), dtype=np.int64)
        raise ValueError(f"{self.where}: Constant node {node.name!r} holds no tensor")


Axis = tuple[str, ...]  # the source axes an axis is made of, outermost first; () for an axis of size 1 without data


class _InputLayout:
    """How a recurrent node's X is read from its source, through layout-only nodes (see the module docstring)."""

    def __init__(self, onnx: Any, proto: Any, constants: _Constants) -> None:
        self.onnx, self.proto, self.constants = onnx, proto, constants
        self.inputs = {i.name: i for i in proto.graph.input if i.name in constants.graph_inputs}
        self._shapes: dict[str, list[int | None]] | None = None

    def batch_first(self, rnn: Any, where: str) -> bool:
        """Whether the model reads X's source batch first; a ValueError naming the node that stands in the way."""
        chain, source = self._chain(rnn.input[0], where)
        path = " → ".join(_described(n) for n in chain) or "no layout node"
        if isinstance(source, str):
            declared = self.inputs[source].type.tensor_type
            if chain and not declared.HasField("shape"):
                raise ValueError(
                    f"{where}: graph input {source!r} declares no shape, so its axes cannot be followed through "
                    f"{path} to input X; expected a declared rank"
                )
            rank = len(declared.shape.dim) if chain else 3
            axes: list[Axis] = [(f"x{k}",) for k in range(rank)]
        else:
            axes = self._output_axes(source, chain[0].input[0] if chain else rnn.input[0], where)
        features = tuple(atom for axis in axes for atom in axis if atom in ("D", "H"))  # (D, H) or (H,) from a Y
        for node in chain:
            axes = self._through(node, axes, where)
        roles = dict(zip("BTI" if _attribute(self.onnx, rnn, "layout", 0) == 1 else "TBI", axes))
        if not isinstance(source, str):
            if (roles["T"], roles["B"], roles["I"]) == (("T",), ("B",), features):
                return self.batch_first(source, f"node {source.name or '?'} ({source.op_type})")
            raise ValueError(
                f"{where}: output Y of {_described(source)} reaches input X through {path} as "
                f"({', '.join('·'.join(axis) or '1' for axis in axes)}) of X's ({', '.join(roles)}); expected Y's T "
                f"and B as X's T and B, and its {'·'.join(features)} as X's I"
            )
        read = "".join(next((r for r, atoms in roles.items() if f"x{k}" in atoms), "?") for k in range(rank))
        if read in ("TBI", "BTI", "TI") and all(len(roles[r]) == 1 for r in read):
            return read == "BTI"
        raise ValueError(
            f"{where}: graph input {source!r} reaches input X through {path} as ({', '.join(read)}); gatelens reads "
            f"a graph input as (T, B, I), (B, T, I) or unbatched (T, I): expected layout nodes that at most swap T "
            f"and B, or insert B"
        )

    def _chain(self, name: str, where: str) -> tuple[list[Any], str | Any]:
        """The layout nodes from X's source to X, in graph order, and the source: a graph input's name or a node."""
        chain: list[Any] = []
        while name not in self.constants.graph_inputs:
            producer = self.constants.producers.get(name)
            if producer is None:
                what = "a constant of the file" if name in self.constants.initializers else "produced by no node"
                raise ValueError(f"{where}: {name!r}, on the way to input X, is {what}; expected a graph input")
            if producer.domain in ONNX_DOMAINS and producer.op_type in OPS:
                return chain[::-1], producer
            if producer.domain not in ONNX_DOMAINS or producer.op_type not in LAYOUT_OPS or producer in chain:
                raise ValueError(
                    f"{where}: input X comes from {_described(producer)}; expected a graph input or another "
                    f"recurrent node's Y, reached only through layout nodes ({', '.join(LAYOUT_OPS)})"
                )
            chain.append(producer)
            name = producer.input[0]
        return chain[::-1], name

    def _output_axes(self, node: Any, name: str, where: str) -> list[Axis]:
        """The axes of a recurrent node's Y (``name``, checked when given): T, D (() for one direction), B, H."""
        if name and name != node.output[0]:
            raise ValueError(f"{where}: input X comes from {_described(node)}'s output {name!r}; expected its Y")
        d: Axis = ("D",) if _attribute(self.onnx, node, "direction", "forward") == "bidirectional" else ()
        batch_first = _attribute(self.onnx, node, "layout", 0) == 1
        return [("B",), ("T",), d, ("H",)] if batch_first else [("T",), d, ("B",), ("H",)]

    def _through(self, node: Any, axes: list[Axis], where: str) -> list[Axis]:
        """The axes of ``node``'s output, given those of its data input."""
        op, rank = node.op_type, len(axes)
        if op == "Identity":
            return axes
        if op == "Transpose":
            perm = _attribute(self.onnx, node, "perm", list(range(rank))[::-1])
            if sorted(perm) != list(range(rank)):
                raise ValueError(f"{where}: {_described(node)} has perm={perm} for a {rank}-D input")
            return [axes[p] for p in perm]
        if op in ("Squeeze", "Unsqueeze"):
            given = _attribute(self.onnx, node, "axes", None)
            if given is None and len(node.input) > 1 and node.input[1]:
                given = self.constants.value(node.input[1], "axes")
            if given is None:
                raise ValueError(f"{where}: {_described(node)} has no constant axes; expected them in the file")
            given = np.ravel(given)
            out_rank = rank - len(given) if op == "Squeeze" else rank + len(given)
            chosen = sorted(int(a) % (rank if op == "Squeeze" else out_rank) for a in given)
            if op == "Unsqueeze":
                for a in chosen:
                    axes = [*axes[:a], (), *axes[a:]]
                return axes
            carrying = [a for a in chosen if axes[a]]
            if carrying:
                atom = axes[carrying[0]][0]  # "x<k>" (axis k of a graph input) or T, D, B, H (of a node's Y)
                what = f"axis {atom[1:]} of the graph input" if atom.startswith("x") else f"Y's {atom}"
                raise ValueError(
                    f"{where}: {_described(node)} removes axis {carrying[0]}, which carries {what}; expected it to "
                    f"remove only axes of size 1 without data"
                )
            return [axis for a, axis in enumerate(axes) if a not in chosen]
        values = self.constants.value(node.input[1], "shape") if len(node.input) > 1 else None
        if values is None:
            raise ValueError(f"{where}: {_described(node)} has no constant shape; expected it in the file")
        shape = [int(n) for n in np.ravel(values)]
        sizes = self._sizes(node.input[0]) if any(n > 0 for n in shape[:-1]) else []
        kept = [k < rank and (n == 0 or (k < len(sizes) and n == sizes[k])) for k, n in enumerate(shape[:-1])]
        if not shape or not all(kept) or (_attribute(self.onnx, node, "allowzero", 0) and 0 in shape):
            raise ValueError(
                f"{where}: {_described(node)} reshapes to {shape}; expected a Reshape that keeps the leading "
                f"axes and merges the trailing ones into the last (shape [0, …, 0, -1])"
            )
        merged = tuple(atom for axis in axes[len(shape) - 1 :] for atom in axis)
        return [*axes[: len(shape) - 1], merged]

    def _sizes(self, name: str) -> list[int | None]:
        """The static sizes of a tensor's axes by ONNX shape inference (None where not static; [] if unknown)."""
        if self._shapes is None:
            try:
                graph = self.onnx.shape_inference.infer_shapes(self.proto).graph
            except Exception:  # e.g. a model over 2 GB; Reshape shapes then need 0 for the kept axes
                graph = self.proto.graph
            self._shapes = {
                info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
                for info in [*graph.input, *graph.value_info, *graph.output]
            }
        return self._shapes.get(name, [])


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
