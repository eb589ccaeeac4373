"""The ONNX loader, with the frameworks' own implementations as the oracles.

Forward passes must reproduce ONNX Runtime (every op, direction, layout, reset placement, bias and activation) and
the ONNX reference evaluator (where it implements the attributes: it ignores a GRU's or LSTM's activations and
sequence_lens, and knows only Tanh for an RNN); a model exported from PyTorch must reproduce the module; and the
Jacobians of an imported model must equal autograd through one step written from the ONNX equations.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gatelens as gl

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from gatelens.io.onnx_file import from_onnx  # noqa: E402

I, H, T, B = 3, 4, 5, 2
OPSET = 14  # the first opset with the layout attribute
GATE_COUNT = {"GRU": 3, "LSTM": 4, "RNN": 1}
F32_TOLERANCE = 1e-5
JACOBIAN_TOLERANCE = 1e-10

# (name, alpha, beta) per activation; alpha/beta None where the activation takes none.
Act = tuple[str, float | None, float | None]
NAMED_ACTIVATIONS: dict[tuple[str, str], list[Act]] = {
    # per direction: forward first, then reverse; the directions differ on purpose (each is its own cell)
    ("GRU", "forward"): [("HardSigmoid", 1 / 6, 0.5), ("Tanh", None, None)],
    ("GRU", "bidirectional"): [("HardSigmoid", 0.2, 0.5), ("Tanh", None, None), ("HardSigmoid", 1 / 6, 0.5),
                               ("Relu", None, None)],
    ("LSTM", "forward"): [("HardSigmoid", 0.2, 0.5), ("Tanh", None, None), ("Tanh", None, None)],
    ("LSTM", "bidirectional"): [("HardSigmoid", 0.2, 0.5), ("Tanh", None, None), ("Tanh", None, None),
                                ("Sigmoid", None, None), ("Relu", None, None), ("Relu", None, None)],
    ("RNN", "forward"): [("Relu", None, None)],
    ("RNN", "bidirectional"): [("Relu", None, None), ("Tanh", None, None)],
}  # fmt: skip
NAMED_ACTIVATIONS |= {(op, "reverse"): NAMED_ACTIVATIONS[op, "forward"] for op in ("GRU", "LSTM", "RNN")}


@dataclass(frozen=True)
class Config:
    op: str  # GRU, LSTM, RNN
    direction: str = "forward"
    layout: int = 0
    linear_before_reset: int = 0  # GRU only
    bias: bool = True
    named: bool = False  # named (non-default) activations

    def __str__(self) -> str:
        lbr = f"-lbr{self.linear_before_reset}" if self.op == "GRU" else ""
        return (
            f"{self.op}-{self.direction[:5]}-layout{self.layout}{lbr}{'' if self.bias else '-nobias'}"
            f"{'-named' if self.named else ''}"
        )

    @property
    def directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def activations(self) -> list[Act] | None:
        return NAMED_ACTIVATIONS[self.op, self.direction] if self.named else None


CONFIGS = [
    Config(op, direction, layout, lbr, bias, named)
    for op in ("GRU", "LSTM", "RNN")
    for direction in ("forward", "reverse", "bidirectional")
    for layout in (0, 1)
    for lbr in ((0, 1) if op == "GRU" else (0,))
    for bias in (True, False)
    for named in (False, True)
]


def weights(config: Config, dtype: type = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """Random W, R (and B) in ONNX's shapes, U(−0.6, 0.6) so that gates leave their linear regions."""
    rng = np.random.default_rng(seed)
    rows = GATE_COUNT[config.op] * H
    arrays = {
        "W": rng.uniform(-0.6, 0.6, (config.directions, rows, I)),
        "R": rng.uniform(-0.6, 0.6, (config.directions, rows, H)),
    }
    if config.bias:
        arrays["B"] = rng.uniform(-0.6, 0.6, (config.directions, 2 * rows))
    return {name: array.astype(dtype) for name, array in arrays.items()}


def make_proto(
    config: Config,
    arrays: dict[str, np.ndarray],
    *,
    sequence_lens: bool = False,
    extra_inputs: dict[str, str] | None = None,
    **attributes,
) -> onnx.ModelProto:
    """A graph with one recurrent node: X (and sequence_lens) as graph inputs, the weights as initializers."""
    elem = helper.np_dtype_to_tensor_dtype(arrays["W"].dtype)
    inputs = ["X", "W", "R", "B" if "B" in arrays else "", "sequence_lens" if sequence_lens else ""]
    for position, name in (extra_inputs or {}).items():
        index = {"initial_h": 5, "initial_c": 6, "P": 7}[position]
        inputs += [""] * (index + 1 - len(inputs))
        inputs[index] = name
    while inputs and not inputs[-1]:
        inputs.pop()
    attributes = {"hidden_size": H, "direction": config.direction, "layout": config.layout} | attributes
    if config.op == "GRU":
        attributes.setdefault("linear_before_reset", config.linear_before_reset)
    if config.activations is not None:
        attributes.setdefault("activations", [name for name, _, _ in config.activations])
        alphas = [a for _, a, _ in config.activations if a is not None]
        betas = [b for _, _, b in config.activations if b is not None]
        if alphas:
            attributes.setdefault("activation_alpha", alphas)
            attributes.setdefault("activation_beta", betas)
    node = helper.make_node(config.op, inputs, ["Y", "Y_h"], name=f"my_{config.op.lower()}", **attributes)
    x_shape = ["T", "B", I] if config.layout == 0 else ["B", "T", I]
    graph_inputs = [helper.make_tensor_value_info("X", elem, x_shape)]
    if sequence_lens:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    graph = helper.make_graph(
        [node],
        "recurrent",
        graph_inputs,
        [helper.make_tensor_value_info("Y", elem, None), helper.make_tensor_value_info("Y_h", elem, None)],
        initializer=[numpy_helper.from_array(array, name) for name, array in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def save(proto: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def x_for(config: Config, dtype: type = np.float32, seed: int = 1) -> np.ndarray:
    shape = (T, B, I) if config.layout == 0 else (B, T, I)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def as_gatelens_output(y: np.ndarray, layout: int) -> Tensor:
    """ONNX Y (T, D, B, H) or (B, T, D, H) → gatelens/PyTorch (T, B, D·H) or (B, T, D·H)."""
    if layout == 0:
        y = y.transpose(0, 2, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(y)).reshape(*y.shape[:2], -1)


def run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ort_expected(
    config: Config, arrays: dict[str, np.ndarray], x: np.ndarray, lengths: np.ndarray | None = None
) -> tuple[Tensor, Tensor]:
    """ONNX Runtime's Y and Y_h as gatelens returns them: output (T, B, D·H) or (B, T, D·H), final (D, B, H).

    ONNX Runtime's CPU kernels refuse layout=1, so a batch-first model is run as its time-major twin (same weights
    and attributes, layout=0) on x transposed: by the ONNX spec, layout only permutes X, Y and Y_h. The reference
    evaluator, which implements layout=1, checks the layout itself (test_forward_matches_reference_evaluator).
    """
    twin = Config(**{**config.__dict__, "layout": 0})
    feeds = {"X": x if config.layout == 0 else np.ascontiguousarray(x.transpose(1, 0, 2))}
    if lengths is not None:
        feeds["sequence_lens"] = lengths
    y, y_h = run_ort(make_proto(twin, arrays, sequence_lens=lengths is not None), feeds)
    output = as_gatelens_output(y, 0)
    return (output if config.layout == 0 else output.transpose(0, 1)), torch.from_numpy(y_h)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_close(actual: Tensor, expected: Tensor, tolerance: float) -> None:
    error = relative_error(actual, expected)
    assert error <= tolerance, f"relative error {error:.3e} > {tolerance:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# 1. Forward passes against ONNX Runtime and the reference evaluator


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_forward_matches_onnxruntime(config: Config, tmp_path: Path) -> None:
    arrays = weights(config)
    proto = make_proto(config, arrays)
    model = gl.load(save(proto, tmp_path))
    assert model.batch_first == (config.layout == 1) and model.bidirectional == (config.directions == 2)
    assert model.dtype == torch.float32
    x = x_for(config)
    expected, expected_final = ort_expected(config, arrays, x)
    trace = model.trace(torch.from_numpy(x))
    assert_close(trace.output, expected, F32_TOLERANCE)
    final = trace.final_state[0] if config.op == "LSTM" else trace.final_state
    assert_close(final, expected_final, F32_TOLERANCE)


# The reference evaluator ignores GRU/LSTM activations and has only Tanh for an RNN: default activations only.
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.named], ids=str)
def test_forward_matches_reference_evaluator(config: Config, tmp_path: Path) -> None:
    arrays = weights(config)
    proto = make_proto(config, arrays)
    x = x_for(config)
    y = ReferenceEvaluator(proto).run(None, {"X": x})[0]
    trace = gl.load(save(proto, tmp_path)).trace(torch.from_numpy(x))
    assert_close(trace.output, as_gatelens_output(y, config.layout), F32_TOLERANCE)


SEQUENCE_CONFIGS = [
    Config("GRU", "bidirectional", layout=0, linear_before_reset=1),
    Config("GRU", "forward", layout=1, named=True),
    Config("LSTM", "bidirectional", layout=1),
    Config("RNN", "bidirectional", layout=0, named=True),
    Config("GRU", "reverse", layout=0, linear_before_reset=1),
    Config("LSTM", "reverse", layout=1, named=True),
]


@pytest.mark.parametrize("config", SEQUENCE_CONFIGS, ids=str)
def test_sequence_lens_matches_onnxruntime(config: Config, tmp_path: Path) -> None:
    """ONNX Runtime's sequence_lens is gatelens' lengths=: same outputs, zeros past each sequence's end."""
    arrays = weights(config)
    proto = make_proto(config, arrays, sequence_lens=True)
    model = gl.load(save(proto, tmp_path))
    x = x_for(config)
    lengths = np.array([3, T][:B], dtype=np.int32)
    expected, expected_final = ort_expected(config, arrays, x, lengths)
    time_major = expected if config.layout == 0 else expected.transpose(0, 1)
    assert torch.all(time_major[3:, 0] == 0), "ONNX Runtime writes zeros past a sequence's end"
    trace = model.trace(torch.from_numpy(x), lengths=lengths.tolist())
    assert_close(trace.output, expected, F32_TOLERANCE)
    final = trace.final_state[0] if config.op == "LSTM" else trace.final_state
    assert_close(final, expected_final, F32_TOLERANCE)


def test_sources_bytes_and_model_proto(tmp_path: Path) -> None:
    config = Config("GRU", linear_before_reset=1)
    proto = make_proto(config, weights(config))
    path = save(proto, tmp_path)
    x = torch.from_numpy(x_for(config))
    expected = gl.load(path).trace(x).output
    for source in (proto, proto.SerializeToString()):
        assert torch.equal(from_onnx(source).trace(x).output, expected)
    assert gl.load(path).source == f"onnx:{path}:node my_gru (GRU)"
    assert from_onnx(proto.SerializeToString()).source == "onnx:<bytes>:node my_gru (GRU)"


def test_weights_from_constant_nodes_and_identity(tmp_path: Path) -> None:
    """W from a Constant node, R behind an Identity node: both are constants of the file."""
    config = Config("RNN")
    arrays = weights(config)
    proto = make_proto(config, arrays)
    graph = proto.graph
    del graph.initializer[:]
    stored = {"R_stored": arrays["R"], "B": arrays["B"]}
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in stored.items())
    constant = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(arrays["W"]))
    identity = helper.make_node("Identity", ["R_stored"], ["R"])
    graph.node.insert(0, identity)
    graph.node.insert(0, constant)
    x = x_for(config)
    y, _ = run_ort(proto, {"X": x})
    assert_close(gl.load(save(proto, tmp_path)).trace(torch.from_numpy(x)).output, as_gatelens_output(y, 0), 1e-5)


def test_zero_peepholes_are_accepted(tmp_path: Path) -> None:
    config = Config("LSTM")
    arrays = weights(config) | {"P": np.zeros((1, 3 * H), np.float32)}
    proto = make_proto(config, arrays, extra_inputs={"P": "P"})
    x = x_for(config)
    y, _ = run_ort(proto, {"X": x})
    assert_close(gl.load(save(proto, tmp_path)).trace(torch.from_numpy(x)).output, as_gatelens_output(y, 0), 1e-5)


def test_nonzero_constant_initial_state_warns(tmp_path: Path) -> None:
    config = Config("GRU")
    h0 = np.full((1, 1, H), 0.3, np.float32)
    proto = make_proto(config, weights(config) | {"h0": h0}, extra_inputs={"initial_h": "h0"})
    path = save(proto, tmp_path)
    with pytest.warns(UserWarning, match="initial_h .'h0'. is a nonzero constant"):
        model = gl.load(path)
    x = x_for(config)[:, :1]
    y, _ = run_ort(proto, {"X": x})
    trace = model.trace(torch.from_numpy(x), h0=torch.from_numpy(h0))
    assert_close(trace.output, as_gatelens_output(y, 0), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 2. Models exported from PyTorch


def export(module: nn.Module, x: Tensor, path: Path, exporter: str = "legacy", **options) -> Path:
    """torch.onnx.export with the legacy TorchScript exporter, or the dynamo one (which needs onnxscript)."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript, which is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(module, (x,), path, dynamo=exporter == "dynamo", **options)
    return path


def test_exported_gru_matches_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.GRU(3, 5).eval()
    x = torch.randn(7, 2, 3)
    path = export(module, x, tmp_path / "gru.onnx")
    assert len(onnx.load(path).graph.node) > 1  # the exporter adds Shape/Expand/Squeeze around the GRU node
    model = gl.load(path)
    assert model.layers[0][0].reset == "after"
    with torch.no_grad():
        expected, expected_final = module(x)
    trace = model.trace(x)
    assert_close(trace.output, expected, F32_TOLERANCE)
    assert_close(trace.final_state, expected_final, F32_TOLERANCE)


def test_exported_two_layer_gru_needs_a_node(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.GRU(3, 5, num_layers=2).eval()
    x = torch.randn(7, 2, 3)
    path = export(module, x, tmp_path / "gru2.onnx")
    with pytest.raises(ValueError, match=r"2 recurrent nodes \(0: '/GRU' \(GRU\), 1: '/GRU_1' \(GRU\)\); pass node="):
        gl.load(path)
    first = nn.GRU(3, 5).eval()
    first.load_state_dict({k: v for k, v in module.state_dict().items() if k.endswith("_l0")})  # layer 0 alone
    with torch.no_grad():
        expected_first, _ = first(x)
        expected, _ = module(x)
    assert_close(gl.load(path, node=0).trace(x).output, expected_first, F32_TOLERANCE)
    assert_close(gl.load(path, node="/GRU").trace(x).output, expected_first, F32_TOLERANCE)
    second = gl.load(path, node=1)
    assert second.source.endswith("node /GRU_1 (GRU)")
    assert_close(second.trace(expected_first).output, expected, F32_TOLERANCE)


BATCH_FIRST_MODULES = {
    "GRU": lambda: nn.GRU(3, 5, batch_first=True),
    "LSTM": lambda: nn.LSTM(3, 5, batch_first=True),
    "GRU-bidirectional": lambda: nn.GRU(3, 5, batch_first=True, bidirectional=True),
    "LSTM-2-layers": lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True),
    "GRU-2-layers-bidirectional": lambda: nn.GRU(3, 5, num_layers=2, batch_first=True, bidirectional=True),
}


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", BATCH_FIRST_MODULES, ids=str)
def test_exported_batch_first_module(name: str, exporter: str, tmp_path: Path) -> None:
    """Both exporters write Transpose(perm=[1, 0, 2]) → GRU(layout=0): the model takes the graph's (B, T, I).

    Each layer is its own node; the nodes after the first read the previous one's output, so they are batch first
    too and chain as the export does. Oracles: ONNX Runtime on the same graph and x, and the module itself.
    """
    torch.manual_seed(0)
    module = BATCH_FIRST_MODULES[name]().eval()
    x = torch.randn(4, 7, 3)  # (B, T, I) with B != T
    path = export(module, x, tmp_path / "batch_first.onnx", exporter)
    proto = onnx.load(path)
    recurrent = [n for n in proto.graph.node if n.op_type in ("GRU", "LSTM")]
    assert len(recurrent) == module.num_layers and all(attribute(n, "layout", 0) == 0 for n in recurrent)
    (transpose,) = [n for n in proto.graph.node if recurrent[0].input[0] in n.output]  # the graph
    assert transpose.op_type == "Transpose" and attribute(transpose, "perm", None) == [1, 0, 2]
    models = [gl.load(path, node=k) for k in range(module.num_layers)]
    assert all(model.batch_first for model in models)
    output = x
    for model in models:
        trace = model.trace(output)
        output = trace.output
    (expected_ort, *_) = run_ort(proto, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected, final = module(x)
    assert output.shape == (4, 7, 5 * (2 if module.bidirectional else 1))
    assert_close(output, torch.from_numpy(expected_ort), F32_TOLERANCE)
    assert_close(output, expected, F32_TOLERANCE)
    if module.num_layers == 1:
        last = trace.final_state[0] if isinstance(final, tuple) else trace.final_state
        assert_close(last, final[0] if isinstance(final, tuple) else final, F32_TOLERANCE)


def test_exported_batch_first_with_dynamic_axes(tmp_path: Path) -> None:
    """Symbolic batch and time sizes: the same model reads other (B, T) than the export's."""
    torch.manual_seed(0)
    module = nn.GRU(3, 5, num_layers=2, batch_first=True, bidirectional=True).eval()
    path = export(
        module, torch.randn(4, 7, 3), tmp_path / "dynamic.onnx", input_names=["x"], dynamic_axes={"x": {0: "B", 1: "T"}}
    )
    x = torch.randn(6, 9, 3)
    output = gl.load(path, node=1).trace(gl.load(path, node=0).trace(x).output).output
    with torch.no_grad():
        assert_close(output, module(x)[0], F32_TOLERANCE)
    assert_close(output, torch.from_numpy(run_ort(onnx.load(path), {"x": x.numpy()})[0]), F32_TOLERANCE)


def test_exported_unbatched_module(tmp_path: Path) -> None:
    """An unbatched export, input (T, I) → Unsqueeze(axes=[1]) → GRU, takes a (T, I) input."""
    torch.manual_seed(0)
    module = nn.GRU(3, 5).eval()
    x = torch.randn(7, 3)
    path = export(module, x, tmp_path / "unbatched.onnx")
    model = gl.load(path)
    assert not model.batch_first
    with torch.no_grad():
        expected, _ = module(x)
    (expected_ort, *_) = run_ort(onnx.load(path), {onnx.load(path).graph.input[0].name: x.numpy()})
    assert_close(model.trace(x).output, expected, F32_TOLERANCE)
    assert_close(model.trace(x).output, torch.from_numpy(expected_ort), F32_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------
# 2b. Hand-made layout nodes between the graph input and the recurrent node


def ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def chained(
    config: Config,
    arrays: dict[str, np.ndarray],
    x_shape: list[int | str] | None,
    nodes: list[onnx.NodeProto],
    constants: list[onnx.TensorProto] | None = None,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """make_proto's graph with ``nodes`` from the graph input "X" (of x_shape) to the recurrent node's X ("X_rnn")."""
    proto = make_proto(config, arrays)
    graph = proto.graph
    graph.node[0].input[0] = "X_rnn"
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.initializer.extend(constants or [])
    graph.input[0].CopyFrom(helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape))
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", opset))
    return proto


ACCEPTED_CHAINS = {  # name: (graph input shape, layout, nodes, constants, opset, batch first)
    "Identity-Transpose": (
        [B, T, I], 0,
        [helper.make_node("Identity", ["X"], ["a"]), helper.make_node("Transpose", ["a"], ["X_rnn"], perm=[1, 0, 2])],
        [], OPSET, True,
    ),
    "Transpose-Transpose": (
        [T, B, I], 0,
        [helper.make_node("Transpose", ["X"], ["a"], perm=[1, 0, 2]),
         helper.make_node("Transpose", ["a"], ["X_rnn"], perm=[1, 0, 2])],
        [], OPSET, False,
    ),
    "Unsqueeze-Transpose-Squeeze (axes inputs)": (
        [B, T, I], 0,
        [helper.make_node("Unsqueeze", ["X", "zero"], ["a"]),
         helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3]),
         helper.make_node("Squeeze", ["b", "zero"], ["X_rnn"])],
        [ints("zero", [0])], OPSET, True,
    ),
    "Unsqueeze-Transpose-Squeeze (axes attributes, opset 11)": (
        [B, T, I], 0,
        [helper.make_node("Unsqueeze", ["X"], ["a"], axes=[-1]),
         helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0, 2, 3]),
         helper.make_node("Squeeze", ["b"], ["X_rnn"], axes=[3])],
        [], 11, True,
    ),
    "Transpose to layout 1": (
        [T, B, I], 1, [helper.make_node("Transpose", ["X"], ["X_rnn"], perm=[1, 0, 2])], [], OPSET, False,
    ),
    "Reshape [0, 0, -1]": (
        [B, T, I], 0,
        [helper.make_node("Transpose", ["X"], ["a"], perm=[1, 0, 2]),
         helper.make_node("Reshape", ["a", "s"], ["X_rnn"])],
        [ints("s", [0, 0, -1])], OPSET, True,
    ),
    "Reshape [T, B, I] (sizes written out)": (
        [B, T, I], 0,
        [helper.make_node("Transpose", ["X"], ["a"], perm=[1, 0, 2]),
         helper.make_node("Reshape", ["a", "s"], ["X_rnn"])],
        [ints("s", [T, B, I])], OPSET, True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ACCEPTED_CHAINS, ids=str)
def test_layout_nodes_before_the_recurrent_node(name: str, tmp_path: Path) -> None:
    """The graph's input layout, followed through the layout nodes, against the reference evaluator."""
    x_shape, layout, nodes, constants, opset, batch_first = ACCEPTED_CHAINS[name]
    config = Config("GRU", "bidirectional", layout=layout, linear_before_reset=1)
    arrays = weights(config)
    proto = chained(config, arrays, x_shape, nodes, constants, opset)
    model = gl.load(save(proto, tmp_path))
    assert model.batch_first == batch_first
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    y = ReferenceEvaluator(proto).run(None, {"X": x})[0]
    expected = as_gatelens_output(y, layout)  # (T, B, D·H) or (B, T, D·H) as the node reads X
    if (layout == 1) != batch_first:
        expected = expected.transpose(0, 1)
    assert_close(model.trace(torch.from_numpy(x)).output, expected, F32_TOLERANCE)


def two_nodes(between: list[onnx.NodeProto], layout: int = 0) -> onnx.ModelProto:
    """Graph input X (T, B, I) → GRU 'first' (layout 0) → Y → ``between`` → "X_second" → GRU 'second' (``layout``)."""
    first, second = Config("GRU", linear_before_reset=1), Config("GRU", "bidirectional", layout=layout)
    arrays2 = weights(second, seed=2)
    arrays2["W"] = np.random.default_rng(3).uniform(-0.6, 0.6, (2, 3 * H, H)).astype(np.float32)  # reads H features
    proto = make_proto(first, weights(first))
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I]))
    proto.graph.node[0].name = "first"
    node2 = helper.make_node(
        "GRU",
        ["X_second", "W2", "R2", "B2"],
        ["Y2"],
        name="second",
        hidden_size=H,
        direction="bidirectional",
        layout=layout,
    )
    proto.graph.node.extend([*between, node2])
    proto.graph.initializer.extend(numpy_helper.from_array(v, f"{k}2") for k, v in arrays2.items())
    proto.graph.initializer.extend([ints("one", [1]), ints("two", [2]), ints("T_B_H", [T, B, H])])
    proto.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    return proto


BETWEEN_NODES = {  # name: (the nodes from Y to "X_second", the second node's layout)
    "Transpose-Squeeze to layout 1": (
        [helper.make_node("Transpose", ["Y"], ["y_t"], perm=[2, 0, 1, 3]),
         helper.make_node("Squeeze", ["y_t", "two"], ["X_second"])],
        1,
    ),
    "Transpose-Reshape with sizes (the dynamo exporter's)": (
        [helper.make_node("Transpose", ["Y"], ["y_t"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["y_t", "T_B_H"], ["X_second"])],
        0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", BETWEEN_NODES, ids=str)
def test_second_node_reads_the_first_ones_output(name: str, tmp_path: Path) -> None:
    """A node fed by another node's Y (T, 1, B, H) is read as that node reads its input, whatever its own layout."""
    between, layout = BETWEEN_NODES[name]
    proto = two_nodes(between, layout)
    path = save(proto, tmp_path)
    first, second = gl.load(path, node="first"), gl.load(path, node="second")
    assert not first.batch_first and not second.batch_first  # the graph's input is (T, B, I)
    x = x_for(Config("GRU"))
    y2 = ReferenceEvaluator(proto).run(["Y2"], {"X": x})[0]
    output = second.trace(first.trace(torch.from_numpy(x)).output).output
    expected = as_gatelens_output(y2, layout)
    assert_close(output, expected.transpose(0, 1) if layout == 1 else expected, F32_TOLERANCE)


REFUSED_CHAINS = {  # name: (graph input shape, nodes, constants, message)
    "Mul": (
        [T, B, I], [helper.make_node("Mul", ["X", "two"], ["X_rnn"], name="scale")],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
        r"node my_gru \(GRU\): input X comes from Mul node 'scale'; expected a graph input",
    ),
    "Transpose-not-a-swap": (
        [B, I, T], [helper.make_node("Transpose", ["X"], ["X_rnn"], perm=[2, 0, 1], name="rotate")], [],
        r"graph input 'X' reaches input X through Transpose node 'rotate' as \(B, I, T\); gatelens reads",
    ),
    "Reshape-instead-of-Transpose": (
        [T, B, I], [helper.make_node("Reshape", ["X", "s"], ["X_rnn"], name="view")], [ints("s", [B, T, I])],
        r"Reshape node 'view' reshapes to \[2, 5, 3\]; expected a Reshape that keeps the leading axes",
    ),
    "Squeeze-of-data": (
        [1, T, B, I], [helper.make_node("Squeeze", ["X", "zero"], ["X_rnn"], name="drop")], [ints("zero", [0])],
        r"Squeeze node 'drop' removes axis 0, which carries axis 0 of the graph input; expected",
    ),
    "Squeeze-without-axes": (
        [1, T, B, I], [helper.make_node("Squeeze", ["X"], ["X_rnn"], name="drop")], [],
        r"Squeeze node 'drop' has no constant axes",
    ),
    "Unsqueeze-of-time": (
        [B, I], [helper.make_node("Unsqueeze", ["X", "zero"], ["X_rnn"], name="one_step")], [ints("zero", [0])],
        r"through Unsqueeze node 'one_step' as \(B, I\); gatelens reads a graph input as \(T, B, I\), \(B, T, I\)",
    ),
    "no-declared-shape": (
        None, [helper.make_node("Transpose", ["X"], ["X_rnn"], perm=[1, 0, 2], name="swap")], [],
        r"graph input 'X' declares no shape, so its axes cannot be followed through Transpose node 'swap'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", REFUSED_CHAINS, ids=str)
def test_refused_nodes_before_the_recurrent_node(name: str, tmp_path: Path) -> None:
    x_shape, nodes, constants, message = REFUSED_CHAINS[name]
    config = Config("GRU")
    proto = chained(config, weights(config), x_shape, nodes, constants)
    if x_shape is None:
        proto.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ValueError, match=message):
        gl.load(save(proto, tmp_path))


def test_refused_second_node_inputs(tmp_path: Path) -> None:
    """Y's T must reach the second node's T; Y_h is not a sequence."""
    swapped = [
        helper.make_node("Squeeze", ["Y", "one"], ["y_s"]),
        helper.make_node("Transpose", ["y_s"], ["X_second"], perm=[1, 0, 2], name="swap"),
    ]
    proto = two_nodes(swapped)
    with pytest.raises(
        ValueError,
        match=r"output Y of GRU node 'first' reaches input X through Squeeze node .* → "
        r"Transpose node 'swap' as \(B, T, H\) of X's \(T, B, I\)",
    ):
        gl.load(save(proto, tmp_path), node="second")
    proto = two_nodes([helper.make_node("Identity", ["Y_h"], ["X_second"])])
    with pytest.raises(ValueError, match=r"input X comes from GRU node 'first''s output 'Y_h'; expected its Y"):
        gl.load(save(proto, tmp_path), node="second")


# ---------------------------------------------------------------------------------------------------------------
# 3. Jacobians against autograd through one step of the ONNX equations


def onnx_activation(name: str, alpha: float | None, beta: float | None) -> Callable[[Tensor], Tensor]:
    return {
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Relu": torch.relu,  # derivative 0 at 0, gatelens' convention (an LSTM's Relu(C') meets C' = 0 exactly)
        "HardSigmoid": lambda a: torch.clamp(alpha * a + beta, 0, 1),
    }[name]


def onnx_step(op: str, lbr: int, acts: list[Act], W: Tensor, R: Tensor, Bias: Tensor, x: Tensor, s: Tensor) -> Tensor:
    """One step of the ONNX equations for vectors: W (G·H, I), R (G·H, H), B (2·G·H), x (I,), s = H or [H, C]."""
    f, *gh = (onnx_activation(*a) for a in acts)
    Wb, Rb = Bias.chunk(2)
    if op == "RNN":
        return f(W @ x + Wb + R @ s + Rb)
    if op == "GRU":
        (Wz, Wr, Wh), (Rz, Rr, Rh) = W.chunk(3), R.chunk(3)
        (Wbz, Wbr, Wbh), (Rbz, Rbr, Rbh) = Wb.chunk(3), Rb.chunk(3)
        z = f(Wz @ x + Wbz + Rz @ s + Rbz)
        r = f(Wr @ x + Wbr + Rr @ s + Rbr)
        if lbr:
            candidate = gh[0](Wh @ x + Wbh + r * (Rh @ s + Rbh))
        else:
            candidate = gh[0](Wh @ x + Wbh + Rh @ (r * s) + Rbh)
        return (1 - z) * candidate + z * s
    hidden, cell = s.chunk(2)
    gates = W @ x + Wb + R @ hidden + Rb
    i, o, forget, c = gates.chunk(4)  # ONNX's row order i, o, f, c
    g, h = gh
    new_cell = f(forget) * cell + f(i) * g(c)
    return torch.cat([f(o) * h(new_cell), new_cell])


DEFAULT_NAMES = {"GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh"), "RNN": ("Tanh",)}
JACOBIAN_CONFIGS = [
    Config("GRU", "bidirectional", linear_before_reset=0),
    Config("GRU", "bidirectional", layout=1, linear_before_reset=1, named=True),
    Config("GRU", "forward", linear_before_reset=0, bias=False, named=True),
    Config("LSTM", "bidirectional"),
    Config("LSTM", "bidirectional", layout=1, named=True),
    Config("RNN", "bidirectional", named=True),
    Config("RNN", "forward"),
]


@pytest.mark.parametrize("config", JACOBIAN_CONFIGS, ids=str)
def test_jacobians_match_autograd_of_onnx_equations(config: Config, tmp_path: Path) -> None:
    arrays = weights(config, np.float64)
    model = gl.load(save(make_proto(config, arrays), tmp_path))
    assert model.dtype == torch.float64
    x = torch.from_numpy(x_for(config, np.float64))
    trace = model.trace(x)
    x_time_major = x if config.layout == 0 else x.transpose(0, 1)
    per_direction = len(DEFAULT_NAMES[config.op])
    for d, direction in enumerate(("forward", "reverse")[: config.directions]):
        W, R = (torch.from_numpy(arrays[k][d]) for k in ("W", "R"))
        Bias = torch.from_numpy(arrays["B"][d]) if config.bias else torch.zeros(2 * W.shape[0], dtype=torch.float64)
        acts = config.activations or [(n, None, None) for n in DEFAULT_NAMES[config.op]] * config.directions
        acts = acts[d * per_direction : (d + 1) * per_direction]

        def step(s: Tensor, x_t: Tensor) -> Tensor:
            return onnx_step(config.op, config.linear_before_reset, acts, W, R, Bias, x_t, s)

        states = trace.recurrence(0, direction).states
        jacobians = trace.jacobians(layer=0, direction=direction)
        for i in range(T):
            read = i if direction == "forward" else T - 1 - i  # the reverse recurrence reads x backwards
            for b in range(B):
                assert torch.allclose(step(states[i, b], x_time_major[read, b]), states[i + 1, b], atol=1e-12)
                expected = torch.func.jacrev(step)(states[i, b], x_time_major[read, b])
                assert_close(jacobians[i, b], expected, JACOBIAN_TOLERANCE)


def test_float32_import_converted_to_float64(tmp_path: Path) -> None:
    config = Config("GRU", linear_before_reset=1)
    arrays = weights(config)
    model = gl.load(save(make_proto(config, arrays), tmp_path)).to(torch.float64)
    arrays64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    model64 = gl.load(save(make_proto(config, arrays64), tmp_path, "model64.onnx"))
    x = torch.from_numpy(x_for(config, np.float64))
    assert_close(model.trace(x).output, model64.trace(x).output, 1e-15)


# ---------------------------------------------------------------------------------------------------------------
# 4. Bad input


def bad(tmp_path: Path, config: Config = Config("GRU"), arrays: dict | None = None, **kwargs) -> Path:
    return save(make_proto(config, weights(config) if arrays is None else arrays, **kwargs), tmp_path)


def test_text_file_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "x.onnx"
    path.write_text("hello, I am not a protobuf\n")
    with pytest.raises(ValueError, match=r"x\.onnx is not a readable ONNX file: "):
        gl.load(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.onnx is not a readable ONNX file: it holds no graph nodes"):
        gl.load(path)
    with pytest.raises(ValueError, match=r"<bytes> is not a readable ONNX model"):
        from_onnx(b"\xff\xff\xff")
    with pytest.raises(FileNotFoundError, match="no such file"):
        gl.load(tmp_path / "missing.onnx")


def test_graph_without_recurrent_node(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["X"], ["Y"])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [value("X", TensorProto.FLOAT, [2])], [value("Y", TensorProto.FLOAT, [2])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path)
    with pytest.raises(ValueError, match=r"has no GRU, LSTM or RNN node; its graph holds Relu"):
        gl.load(path)


REFUSED = {
    "clip": ("GRU", {"clip": 3.0}, r"node my_gru \(GRU\) has the attribute clip=3"),
    "sideways": ("GRU", {"direction": "sideways"}, r"direction='sideways'; expected"),
    "input_forget": ("LSTM", {"input_forget": 1}, r"input_forget=1"),
    "LeakyRelu": ("RNN", {"activations": ["LeakyRelu"], "activation_alpha": [0.1]}, r"activation 'LeakyRelu' \(as f\)"),
    "Affine": ("GRU", {"activations": ["Affine", "Tanh"]}, r"activation 'Affine' \(as f\) is not supported"),
    "ScaledTanh": ("GRU", {"activations": ["Sigmoid", "ScaledTanh"]}, r"activation 'ScaledTanh' \(as g\)"),
    "HardSigmoid-0.3": (
        "GRU",
        {"activations": ["HardSigmoid", "Tanh"], "activation_alpha": [0.3], "activation_beta": [0.5]},
        r"HardSigmoid with alpha=0\.3, beta=0\.5 \(as f\) is not supported",
    ),
    "Relu-gate": ("GRU", {"activations": ["Relu", "Tanh"]}, r"'Relu' as the gate activation f is not supported"),
    "Sigmoid-candidate": ("GRU", {"activations": ["Sigmoid", "Sigmoid"]}, r"'Sigmoid' as activation g is not"),
    "unknown": ("GRU", {"activations": ["Sigmoid", "Softmax"]}, r"unknown activation 'Softmax' \(as g\)"),
    "count": ("GRU", {"activations": ["Sigmoid"]}, r"lists 1 activations \['Sigmoid'\]; a GRU .* needs 2"),
    "LSTM-g-h": ("LSTM", {"activations": ["Sigmoid", "Tanh", "Relu"]}, r"activations g='tanh' and h='relu' differ"),
    "hidden_size": ("GRU", {"hidden_size": 7}, r"hidden_size=7 but R has shape \(1, 12, 4\)"),
    "activation-ints": ("GRU", {"activations": [1, 2]}, r"activations must be a list of names"),
}


@pytest.mark.parametrize(("op", "attributes", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_attributes(tmp_path: Path, op: str, attributes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gl.load(bad(tmp_path, Config(op), **attributes))


def test_peepholes_are_refused(tmp_path: Path) -> None:
    config = Config("LSTM")
    arrays = weights(config) | {"P": np.full((1, 3 * H), 0.1, np.float32)}
    with pytest.raises(ValueError, match=r"node my_lstm \(LSTM\) has peephole weights P \(input 'P'\)"):
        gl.load(bad(tmp_path, config, arrays, extra_inputs={"P": "P"}))


def test_weight_given_as_graph_input(tmp_path: Path) -> None:
    config = Config("GRU")
    arrays = weights(config)
    proto = make_proto(config, arrays)
    kept = [t for t in proto.graph.initializer if t.name != "W"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 3 * H, I]))
    with pytest.raises(ValueError, match=r"input W \('W'\) is a graph input, supplied at run time; gatelens needs"):
        gl.load(save(proto, tmp_path))


def test_weight_computed_by_a_node(tmp_path: Path) -> None:
    config = Config("GRU")
    proto = make_proto(config, weights(config))
    for tensor in proto.graph.initializer:
        if tensor.name == "R":
            tensor.name = "R_half"
    proto.graph.node.insert(0, helper.make_node("Relu", ["R_half"], ["R"]))
    with pytest.raises(ValueError, match=r"input R \('R'\) is computed by a Relu node"):
        gl.load(save(proto, tmp_path))


def test_constant_sequence_lens_is_refused(tmp_path: Path) -> None:
    config = Config("GRU")
    arrays = weights(config) | {"sequence_lens": np.array([T, T], np.int32)}
    proto = make_proto(config, arrays)
    proto.graph.node[0].input.extend([""] * (5 - len(proto.graph.node[0].input)))
    proto.graph.node[0].input[4] = "sequence_lens"
    with pytest.raises(ValueError, match=r"sequence_lens \('sequence_lens'\) is a constant.*pass lengths= to trace"):
        gl.load(save(proto, tmp_path))


def test_float16_weights_are_refused(tmp_path: Path) -> None:
    config = Config("RNN")
    arrays = {k: v.astype(np.float16) for k, v in weights(config).items()}
    with pytest.raises(ValueError, match=r"W has dtype float16; gatelens reads float32 or float64 weights"):
        gl.load(bad(tmp_path, config, arrays))


def test_node_choice_errors(tmp_path: Path) -> None:
    path = bad(tmp_path)
    with pytest.raises(ValueError, match=r"node=5 is out of range: .* 1 recurrent node\(s\) \(0: 'my_gru' \(GRU\)\)"):
        gl.load(path, node=5)
    with pytest.raises(ValueError, match=r"no recurrent node named 'gru'; its recurrent nodes are 0: 'my_gru' \(GRU\)"):
        gl.load(path, node="gru")
    with pytest.raises(TypeError, match="node must be an index or a node name, got float"):
        gl.load(path, node=0.0)
    assert gl.load(path, node="my_gru").source.endswith("node my_gru (GRU)")


def test_wrong_source_type() -> None:
    with pytest.raises(TypeError, match="from_onnx reads a path, bytes or an onnx.ModelProto, got int"):
        from_onnx(3)


def test_missing_onnx_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = bad(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install gatelens\[onnx\]"):
        gl.load(path)
