"""The Keras loader, with Keras itself (Keras 3 on the torch backend) as the oracle.

Every model is built in Keras with seeded random weights (biases nonzero), saved, read back by gatelens, and its
trace must reproduce what the Keras model returns. Files Keras 3 cannot write (Keras 2's legacy .h5, tf.keras
2.13's .keras layout) are built by hand with h5py and checked against a reference step written in this file from
the Keras equations. The reference steps also give the Jacobians (through torch.func.jacrev), independently of
both Keras and the gatelens cells.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import gatelens as gl

os.environ["KERAS_BACKEND"] = "torch"  # there is no TensorFlow here; must be set before keras is imported
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

T, I, B = 7, 3, 2
TOLERANCE = 1e-5  # float32 files against float32 Keras
JACOBIAN_TOLERANCE = 1e-10


@contextmanager
def quiet() -> Iterator[None]:
    """Keras and h5py warn about legacy formats and numpy copies; those warnings are not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def randomize(model: Any, seed: int, scale: float = 1.2) -> None:
    """Seeded uniform weights for every layer, nested ones included (biases nonzero too)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if hasattr(layer, "layers"):
            randomize(layer, seed + 1, scale)
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.uniform(-scale, scale, w.shape).astype(w.dtype) for w in weights])


def keras_model(layers: list[Any], seed: int = 0, steps: int = T) -> Any:
    with quiet():
        model = keras.Sequential([keras.Input((steps, I)), *layers])
        randomize(model, seed)
    return model


def run_keras(module: Any, x: np.ndarray) -> np.ndarray:
    with quiet():
        return keras.ops.convert_to_numpy(module(x))


def keras_weights(layer: Any) -> list[np.ndarray]:
    with quiet():
        return layer.get_weights()


def save(model: Any, path: Path) -> Path:
    with quiet():
        model.save(path)
    return path


def inputs(seed: int = 1, steps: int = T) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, steps, I)).astype(np.float32)


def gl_output(path: Path, x: np.ndarray, **options: Any) -> np.ndarray:
    return gl.load(path, **options).trace(torch.from_numpy(x)).output.numpy()


# ---------------------------------------------------------------------------------------------------------------
# the reference: one Keras step from the Keras equations, in Keras' own layout (row vectors, gate columns)


def gate_function(name: str) -> Callable[[Tensor], Tensor]:
    return {
        "sigmoid": lambda a: 1 / (1 + torch.exp(-a)),
        "hard_sigmoid_keras2": lambda a: torch.clamp(0.2 * a + 0.5, 0, 1),
        "hard_sigmoid_keras3": lambda a: torch.clamp(a / 6 + 0.5, 0, 1),
    }[name]


def keras_step(kind: str, arrays: list[Tensor], x: Tensor, s: Tensor, *, gate: str, act: str, reset_after: bool):
    """x (I,), s (S,) ↦ s'; arrays = [kernel, recurrent_kernel(, bias)] exactly as Keras stores them."""
    kernel, recurrent = arrays[0], arrays[1]
    H = recurrent.shape[0]
    phi = torch.tanh if act == "tanh" else torch.relu
    sigma = gate_function(gate) if kind != "SimpleRNN" else None
    bias = arrays[2] if len(arrays) > 2 else torch.zeros(recurrent.shape[1], dtype=x.dtype)
    if kind == "SimpleRNN":
        return phi(x @ kernel + bias + s @ recurrent)
    if kind == "LSTM":
        h, c = s[:H], s[H:]
        a_i, a_f, a_c, a_o = (x @ kernel + h @ recurrent + bias).split(H)
        c_new = sigma(a_f) * c + sigma(a_i) * phi(a_c)
        return torch.cat([sigma(a_o) * phi(c_new), c_new])
    input_bias, recurrent_bias = (bias[0], bias[1]) if reset_after else (bias, torch.zeros_like(bias))
    x_z, x_r, x_h = (x @ kernel + input_bias).split(H)
    if reset_after:
        h_z, h_r, h_h = (s @ recurrent + recurrent_bias).split(H)
        z, r = sigma(x_z + h_z), sigma(x_r + h_r)
        hh = phi(x_h + r * h_h)
    else:
        z = sigma(x_z + s @ recurrent[:, :H])
        r = sigma(x_r + s @ recurrent[:, H : 2 * H])
        hh = phi(x_h + (r * s) @ recurrent[:, 2 * H :])
    return z * s + (1 - z) * hh


def reference_run(kind: str, arrays: list[np.ndarray], x: np.ndarray, **conventions: Any) -> tuple[Tensor, Tensor]:
    """States (T+1, B, S) and Jacobians (T, B, S, S) of the reference step, in float64."""
    weights = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]
    H = weights[1].shape[0]
    S = 2 * H if kind == "LSTM" else H
    xs = torch.from_numpy(x.astype(np.float64))
    states, jacobians = [torch.zeros(xs.shape[0], S, dtype=torch.float64)], []
    for t in range(xs.shape[1]):
        step = [keras_step(kind, weights, xs[b, t], states[-1][b], **conventions) for b in range(xs.shape[0])]
        jac = [
            torch.func.jacrev(lambda s, b=b: keras_step(kind, weights, xs[b, t], s, **conventions))(states[-1][b])
            for b in range(xs.shape[0])
        ]
        states.append(torch.stack(step))
        jacobians.append(torch.stack(jac))
    return torch.stack(states), torch.stack(jacobians)


# ---------------------------------------------------------------------------------------------------------------
# 1. every layer type and convention, saved as .keras


def layer_cases() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("GRU", dict(reset_after=after, recurrent_activation=gate, use_bias=bias))
        for after in (True, False)
        for gate in ("sigmoid", "hard_sigmoid")
        for bias in (True, False)
    ]
    cases += [("LSTM", dict(recurrent_activation=gate)) for gate in ("sigmoid", "hard_sigmoid")]
    cases += [("LSTM", dict(activation="relu", use_bias=False))]
    cases += [("SimpleRNN", dict(activation=act)) for act in ("tanh", "relu")]
    cases += [("GRU", dict(activation="relu", reset_after=True))]
    return cases


CASES = layer_cases()
H_OF = {"GRU": 4, "LSTM": 3, "SimpleRNN": 5}


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    kind, options = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Any]]:
    """(path, keras model) for a layer case and file suffix, built once per module."""
    cache: dict[tuple[int, str], tuple[Path, Any]] = {}
    folder = tmp_path_factory.mktemp("keras")

    def get(index: int, suffix: str = ".keras") -> tuple[Path, Any]:
        if (index, suffix) not in cache:
            kind, options = CASES[index]
            layer = getattr(keras.layers, kind)(H_OF[kind], return_sequences=True, **options)
            model = keras_model([layer], seed=index)
            cache[index, suffix] = (save(model, folder / f"case{index}{suffix}"), model)
        return cache[index, suffix]

    return get


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_keras_file_matches_keras(saved: Callable[..., tuple[Path, Any]], index: int) -> None:
    path, model = saved(index)
    x = inputs()
    loaded = gl.load(path)
    assert loaded.batch_first and loaded.dtype == torch.float32
    assert loaded.source == f"keras:{path}:layer {model.layers[0].name} ({CASES[index][0]})"
    np.testing.assert_allclose(gl_output(path, x), run_keras(model, x), rtol=0, atol=TOLERANCE)


def test_conventions_are_read_from_the_config(saved: Callable[..., tuple[Path, Any]]) -> None:
    names = {case_id(c): i for i, c in enumerate(CASES)}
    gru = gl.load(saved(names["GRU-reset_after=False-recurrent_activation=hard_sigmoid-use_bias=True"])[0])
    cell = gru.layers[0][0]
    assert (cell.reset, cell.update, cell.gate, cell.candidate) == ("before", "keep", "hard_sigmoid_keras3", "tanh")
    assert torch.equal(cell.weights["b_hn"], torch.zeros(4))  # reset_before: the bias is all on the input side
    nobias = gl.load(saved(names["GRU-reset_after=True-recurrent_activation=sigmoid-use_bias=False"])[0])
    assert not any(block.startswith("b_") for block in nobias.layers[0][0].weights)
    rnn = gl.load(saved(names["SimpleRNN-activation=relu"])[0]).layers[0][0]
    assert rnn.nonlinearity == "relu" and torch.equal(rnn.weights["b_hh"], torch.zeros(5))


def test_hard_sigmoid_cases_reach_the_clipped_regions(saved: Callable[..., tuple[Path, Any]]) -> None:
    """Otherwise the Keras 2 and Keras 3 definitions could not be told apart by slope alone."""
    index = [case_id(c) for c in CASES].index("LSTM-recurrent_activation=hard_sigmoid")
    trace = gl.load(saved(index)[0]).trace(torch.from_numpy(inputs()))
    gates = trace.recurrence(0, "forward").cache.i
    assert (gates == 0).any() or (gates == 1).any()
    assert ((gates > 0) & (gates < 1)).any()


# ---------------------------------------------------------------------------------------------------------------
# 2. legacy .h5 written by Keras 3


@pytest.mark.parametrize("index", [1, 6, 9, 12], ids=[case_id(CASES[i]) for i in (1, 6, 9, 12)])
def test_legacy_h5_from_keras3_matches_keras(saved: Callable[..., tuple[Path, Any]], index: int) -> None:
    path, model = saved(index, ".h5")
    with h5py.File(path) as f:
        assert f.attrs["keras_version"].startswith("3.") and "model_config" in f.attrs
    x = inputs()
    np.testing.assert_allclose(gl_output(path, x), run_keras(model, x), rtol=0, atol=TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------
# 3. files from Keras 2: hard_sigmoid is clip(0.2·a + 0.5)


def keras2_h5(path: Path, arrays: list[np.ndarray], config: dict[str, Any], version: str | None = "2.4.0") -> Path:
    """A full-model .h5 as tf.keras 2.x writes it: bytes attributes, weight names with ':0' in nested groups."""
    names = [b"gru/gru_cell/kernel:0", b"gru/gru_cell/recurrent_kernel:0", b"gru/gru_cell/bias:0"][: len(arrays)]
    model_config = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {"class_name": "InputLayer", "config": {"batch_input_shape": [None, T, I], "name": "gru_input"}},
                {"class_name": "GRU", "config": config},
            ],
        },
    }
    with h5py.File(path, "w") as f:
        if version is not None:
            f.attrs["keras_version"] = version.encode()
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(model_config).encode()
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = [b"gru"]
        group = weights.create_group("gru")
        group.attrs["weight_names"] = names
        for name, array in zip(names, arrays):
            group.create_dataset(name.decode(), data=array)
    return path


def gru2_config(reset_after: bool, **changes: Any) -> dict[str, Any]:
    config = {
        "name": "gru",
        "trainable": True,
        "return_sequences": True,
        "go_backwards": False,
        "time_major": False,
        "units": 4,
        "activation": "tanh",
        "recurrent_activation": "hard_sigmoid",
        "use_bias": True,
        "reset_after": reset_after,
        "implementation": 2,
    }
    return config | changes


def gru_arrays(reset_after: bool, seed: int = 3, H: int = 4, scale: float = 1.5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(I, 3 * H), (H, 3 * H), (2, 3 * H) if reset_after else (3 * H,)]
    return [rng.uniform(-scale, scale, shape).astype(np.float32) for shape in shapes]


@pytest.mark.parametrize("reset_after", [False, True])
def test_keras2_h5_uses_the_keras2_hard_sigmoid(tmp_path: Path, reset_after: bool) -> None:
    arrays = gru_arrays(reset_after)
    path = keras2_h5(tmp_path / "m.h5", arrays, gru2_config(reset_after))
    x = inputs()
    model = gl.load(path)
    assert model.layers[0][0].gate == "hard_sigmoid_keras2"
    conventions = dict(gate="hard_sigmoid_keras2", act="tanh", reset_after=reset_after)
    states, _ = reference_run("GRU", arrays, x, **conventions)
    expected = states[1:].transpose(0, 1).numpy()
    np.testing.assert_allclose(model.trace(torch.from_numpy(x)).output.numpy(), expected, rtol=0, atol=TOLERANCE)
    other, _ = reference_run("GRU", arrays, x, **(conventions | {"gate": "hard_sigmoid_keras3"}))
    assert np.abs(other[1:].transpose(0, 1).numpy() - expected).max() > 1e-2  # the two definitions differ here


def test_keras2_time_major_layer_is_time_major(tmp_path: Path) -> None:
    arrays = gru_arrays(True)
    path = keras2_h5(tmp_path / "m.h5", arrays, gru2_config(True, time_major=True))
    assert not gl.load(path).batch_first


def test_hard_sigmoid_without_a_keras_version_is_refused(tmp_path: Path) -> None:
    path = keras2_h5(tmp_path / "m.h5", gru_arrays(False), gru2_config(False), version=None)
    with pytest.raises(ValueError, match=r"clip\(0\.2·a \+ 0\.5, 0, 1\) in Keras 1 and 2 but clip\(a/6 \+ 0\.5"):
        gl.load(path)
    sigmoid = keras2_h5(tmp_path / "s.h5", gru_arrays(False), gru2_config(False, recurrent_activation="sigmoid"), None)
    assert gl.load(sigmoid).layers[0][0].gate == "sigmoid"  # only hard_sigmoid depends on the version


def rewrite_archive(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """A copy of a zip with each member passed through edit(name, data) (None drops the member)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = edit(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def test_tf_keras_213_archive_layout_and_version(saved: Callable[..., tuple[Path, Any]], tmp_path: Path) -> None:
    """tf.keras 2.13 writes .keras files with `_layer_checkpoint_dependencies` for `layers`, and Keras 2 semantics."""
    index = [case_id(c) for c in CASES].index("GRU-reset_after=False-recurrent_activation=hard_sigmoid-use_bias=True")
    path, model = saved(index)

    def edit(name: str, data: bytes) -> bytes:
        if name == "metadata.json":
            return json.dumps({"keras_version": "2.13.1"}).encode()
        if name != "model.weights.h5":
            return data
        buffer = io.BytesIO()
        with h5py.File(io.BytesIO(data)) as old, h5py.File(buffer, "w") as new:
            old.copy(old["layers"], new, "_layer_checkpoint_dependencies")
        return buffer.getvalue()

    old_style = rewrite_archive(path, tmp_path / "tf213.keras", edit)
    loaded = gl.load(old_style)
    assert loaded.layers[0][0].gate == "hard_sigmoid_keras2"
    x = inputs()
    conventions = dict(gate="hard_sigmoid_keras2", act="tanh", reset_after=False)
    states, _ = reference_run("GRU", keras_weights(model.layers[0]), x, **conventions)
    expected = states[1:].transpose(0, 1).numpy()
    np.testing.assert_allclose(loaded.trace(torch.from_numpy(x)).output.numpy(), expected, rtol=0, atol=TOLERANCE)

    def drop_version(name: str, data: bytes) -> bytes:
        return json.dumps({"date_saved": "?"}).encode() if name == "metadata.json" else data

    with pytest.raises(ValueError, match=r"keras_version \(None\) does not say which Keras"):
        gl.load(rewrite_archive(path, tmp_path / "noversion.keras", drop_version))


# ---------------------------------------------------------------------------------------------------------------
# 4. no Keras needed


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, {src!r})
import numpy as np, torch, gatelens as gl
x = torch.from_numpy(np.load({x!r}))
np.save({out!r}, gl.load({path!r}, layer={layer!r}).trace(x).output.numpy())
assert not any(m.split(".")[0] in ("keras", "tensorflow") for m in sys.modules), "keras was imported"
print("ok")
"""


def test_loads_without_keras_installed(saved: Callable[..., tuple[Path, Any]], tmp_path: Path) -> None:
    x = inputs()
    np.save(tmp_path / "x.npy", x)
    for index, suffix in ((0, ".keras"), (6, ".h5")):
        path, _ = saved(index, suffix)
        out = tmp_path / f"out{index}.npy"
        src = str(Path(gl.__file__).parents[1])
        code = BLOCKER.format(src=src, x=str(tmp_path / "x.npy"), out=str(out), path=str(path), layer=0)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
        np.testing.assert_array_equal(np.load(out), gl_output(path, x))


def test_missing_h5py_names_the_extra(saved: Callable[..., tuple[Path, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved(0)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"pip install gatelens\[keras\]"):
        gl.load(path)


# ---------------------------------------------------------------------------------------------------------------
# 5. models with several recurrent layers, nested models, wrappers


@pytest.fixture(scope="module")
def two_grus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    layers = [
        keras.layers.GRU(4, return_sequences=True, name="first"),
        keras.layers.GRU(3, return_sequences=True, reset_after=False, name="second"),
        keras.layers.Dense(1),
    ]
    model = keras_model(layers, seed=11)
    folder = tmp_path_factory.mktemp("two")
    return save(model, folder / "two.keras"), save(model, folder / "two.h5"), model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_several_recurrent_layers(two_grus: tuple[Path, Path, Any], suffix: str) -> None:
    keras_path, h5_path, model = two_grus
    path = keras_path if suffix == ".keras" else h5_path
    with pytest.raises(
        ValueError, match=r"2 recurrent layers \(0: 'first' \(GRU\); 1: 'second' \(GRU\)\); pass layer="
    ):
        gl.load(path)
    x = inputs()
    hidden = run_keras(model.layers[0], x)
    np.testing.assert_allclose(gl_output(path, x, layer=0), hidden, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(gl_output(path, x, layer="first"), hidden, rtol=0, atol=TOLERANCE)
    second = run_keras(model.layers[1], hidden)
    np.testing.assert_allclose(gl_output(path, hidden, layer="second"), second, rtol=0, atol=TOLERANCE)
    # gatelens' layer 0 feeding gatelens' layer 1 reproduces the Keras stack up to the recurrent output
    chained = gl_output(path, gl_output(path, x, layer=0), layer=-1)
    np.testing.assert_allclose(chained, second, rtol=0, atol=TOLERANCE)
    assert gl.load(path, layer=1).layers[0][0].reset == "before"


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Any, dict[str, Any]]:
    """A Functional model holding a nested Sequential, a Bidirectional LSTM and an RNN(GRUCell)."""
    L = keras.layers
    with quiet():
        inner = keras.Sequential([keras.Input((T, I)), L.GRU(4, return_sequences=True, name="g1")], name="inner")
        x = keras.Input((T, I))
        y = inner(x)
        y = L.Bidirectional(L.LSTM(3, return_sequences=True, recurrent_activation="hard_sigmoid"), name="bi")(y)
        y = L.RNN(L.GRUCell(2, reset_after=False), return_sequences=True, name="wrapped")(y)
        y = L.SimpleRNN(2, return_sequences=True, name="plain")(y)
        model = keras.Model(x, y, name="outer")
        randomize(model, seed=21)
    folder = tmp_path_factory.mktemp("nested")
    paths = [save(model, folder / "nested.keras"), save(model, folder / "nested.h5")]
    parts = {
        "inner/g1": inner.get_layer("g1"),
        "bi": model.get_layer("bi"),
        "wrapped": model.get_layer("wrapped"),
        "plain": model.get_layer("plain"),
    }
    return paths, model, parts


@pytest.mark.parametrize("which", [0, 1], ids=[".keras", ".h5"])
def test_nested_and_wrapped_layers_match_keras(nested: tuple[list[Path], Any, dict[str, Any]], which: int) -> None:
    paths, model, parts = nested
    path = paths[which]
    hidden = inputs()
    for index, (name, layer) in enumerate(parts.items()):
        expected = run_keras(layer, hidden)
        loaded = gl.load(path, layer=name)
        assert gl.load(path, layer=index).source == loaded.source
        np.testing.assert_allclose(gl_output(path, hidden, layer=name), expected, rtol=0, atol=TOLERANCE)
        hidden = expected
    np.testing.assert_allclose(hidden, run_keras(model, inputs()), rtol=0, atol=TOLERANCE)
    bi = gl.load(path, layer="bi")
    assert bi.bidirectional and bi.source.endswith("layer bi (Bidirectional(LSTM))")
    assert gl.load(path, layer="g1").source.endswith("layer inner/g1 (GRU)")
    assert gl.load(path, layer="wrapped").layers[0][0].reset == "before"


# ---------------------------------------------------------------------------------------------------------------
# 6. Jacobians of an imported model against autograd through the Keras equations


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_jacobians_match_autograd_of_keras_equations(saved: Callable[..., tuple[Path, Any]], index: int) -> None:
    path, model = saved(index)
    kind, options = CASES[index]
    model64 = gl.load(path).to(torch.float64)
    x = inputs(seed=5, steps=4)
    trace = model64.trace(torch.from_numpy(x.astype(np.float64)))
    gate = "hard_sigmoid_keras3" if options.get("recurrent_activation") == "hard_sigmoid" else "sigmoid"
    conventions = dict(gate=gate, act=options.get("activation", "tanh"), reset_after=options.get("reset_after", True))
    states, jacobians = reference_run(kind, keras_weights(model.layers[0]), x, **conventions)
    torch.testing.assert_close(trace.states["l0"], states, rtol=0, atol=1e-12)
    error = (trace.jacobians() - jacobians).abs().max() / jacobians.abs().max()
    assert error <= JACOBIAN_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# 7. bad input: one clear ValueError each


def test_a_text_file_is_not_a_keras_file(tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    path.write_text("not a model\n")
    with pytest.raises(ValueError, match=r"m\.keras is not a readable Keras file: it is neither a zip"):
        gl.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        gl.load(tmp_path / "missing.keras")


def test_a_zip_without_config(tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.weights.h5", b"")
    with pytest.raises(ValueError, match=r"not a readable Keras file: the zip holds no config\.json"):
        gl.load(path)


def test_npz_weights_are_not_unpickled(saved: Callable[..., tuple[Path, Any]], tmp_path: Path) -> None:
    def to_npz(name: str, data: bytes) -> bytes:
        return data if name != "model.weights.h5" else None  # type: ignore[return-value]

    path = rewrite_archive(saved(0)[0], tmp_path / "m.keras", to_npz)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model.weights.npz", b"")
    with pytest.raises(ValueError, match=r"no model\.weights\.h5 \(model\.weights\.npz holds pickled objects"):
        gl.load(path)


def test_a_model_without_recurrent_layers(tmp_path: Path) -> None:
    layers = [keras.layers.TimeDistributed(keras.layers.Dense(2)), keras.layers.Dense(1)]
    path = save(keras_model(layers), tmp_path / "dense.keras")
    with pytest.raises(
        ValueError, match=r"no recurrent layer \(GRU, LSTM, SimpleRNN\); .* are: TimeDistributed, Dense"
    ):
        gl.load(path)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (lambda: keras.layers.GRU(3, go_backwards=True, name="back"), r"layer 'back' \(GRU\) has go_backwards=True"),
        (lambda: keras.layers.GRU(3, activation="elu"), r"activation 'elu' is not supported"),
        (lambda: keras.layers.LSTM(3, recurrent_activation="tanh"), r"recurrent_activation 'tanh' is not supported"),
        (lambda: keras.layers.SimpleRNN(3, activation="linear"), r"activation 'linear' is not supported"),
        (
            lambda: keras.layers.Bidirectional(keras.layers.GRU(3), merge_mode="sum"),
            r"Bidirectional\(GRU\) with merge_mode='sum' is not supported",
        ),
        (
            lambda: keras.layers.RNN(keras.layers.StackedRNNCells([keras.layers.GRUCell(2)])),
            r"RNN with a StackedRNNCells cell is not supported",
        ),
    ],
    ids=["go_backwards", "elu", "tanh-gate", "linear", "bidirectional-sum", "stacked-cells"],
)
def test_unsupported_layers_are_named(tmp_path: Path, layer: Callable[[], Any], message: str) -> None:
    with quiet():
        built = layer()
    path = save(keras_model([built]), tmp_path / "m.keras")
    with pytest.raises(ValueError, match=message):
        gl.load(path)


def test_conv_lstm_is_named(tmp_path: Path) -> None:
    with quiet():
        model = keras.Sequential([keras.Input((T, 4, 2)), keras.layers.ConvLSTM1D(2, 2), keras.layers.Flatten()])
    path = save(model, tmp_path / "conv.keras")
    with pytest.raises(ValueError, match=r"layer 'conv_lstm1d.*' of .*: ConvLSTM1D is not a layer gatelens reads"):
        gl.load(path)


def test_a_weights_only_file(saved: Callable[..., tuple[Path, Any]], tmp_path: Path) -> None:
    _, model = saved(0)
    path = tmp_path / "m.weights.h5"
    with quiet():
        model.save_weights(path)
    with pytest.raises(ValueError, match=r"weights-only Keras file .* no architecture.* Load the \.keras file"):
        gl.load(path)


def test_layer_choice_errors(two_grus: tuple[Path, Path, Any]) -> None:
    path = two_grus[0]
    with pytest.raises(ValueError, match=r"layer=2 is out of range: .* holds 2 recurrent layer\(s\) \(0: 'first'"):
        gl.load(path, layer=2)
    with pytest.raises(ValueError, match=r"no recurrent layer named 'third' .*; choose one of: 0: 'first' \(GRU\)"):
        gl.load(path, layer="third")
    with pytest.raises(TypeError, match=r"layer must be an index \(int\) or a layer name \(str\), got bool"):
        gl.load(path, layer=True)


def test_shapes_that_do_not_fit_the_config(tmp_path: Path) -> None:
    arrays = gru_arrays(False)
    path = keras2_h5(tmp_path / "m.h5", arrays, gru2_config(True))  # config says reset_after, bias is (3H,)
    with pytest.raises(ValueError, match=r"layer 'gru' \(GRU\): bias has shape \(12,\), expected \(2, 12\)"):
        gl.load(path)
    path = keras2_h5(tmp_path / "u.h5", arrays, gru2_config(False, units=5))
    with pytest.raises(ValueError, match=r"kernel has shape \(3, 12\), expected \(3, 15\) for units=5"):
        gl.load(path)


def test_external_links_are_not_followed(tmp_path: Path) -> None:
    arrays = gru_arrays(False)
    path = keras2_h5(tmp_path / "m.h5", arrays, gru2_config(False))
    with h5py.File(tmp_path / "elsewhere.h5", "w") as other:
        other.create_dataset("kernel", data=arrays[0])
    with h5py.File(path, "a") as f:
        group = f["model_weights/gru/gru/gru_cell"]
        del group["kernel:0"]
        group["kernel:0"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "kernel")
    with pytest.raises(ValueError, match=r"kernel:0 is an HDF5 ExternalLink; gatelens follows only hard links"):
        gl.load(path)


def test_a_damaged_archive_gives_one_clear_error(saved: Callable[..., tuple[Path, Any]], tmp_path: Path) -> None:
    path, _ = saved(0)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("config.json")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the member's stored bytes
    data[start + 5] ^= 0xFF
    (tmp_path / "flipped.keras").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not a readable Keras file"):
        gl.load(tmp_path / "flipped.keras")
    (tmp_path / "truncated.keras").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gl.load(tmp_path / "truncated.keras")


def test_masking_is_not_read_and_says_so(tmp_path: Path) -> None:
    with quiet():
        model = keras_model([keras.layers.Masking(0.0), keras.layers.GRU(3, return_sequences=True)])
    path = save(model, tmp_path / "masked.keras")
    with pytest.warns(UserWarning, match="masks steps .* pass lengths= to trace"):
        gl.load(path)
