"""The analysis commands (analyze, explain, jacobians, credit) on saved models, checked against torch autograd
through the framework's own module, and their one-line errors on bad input."""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gatelens as gl
from gatelens.cli import main

T, B, I, H = 9, 3, 3, 5


def saved_module(tmp_path: Path, module: nn.Module, name: str = "model.pt") -> Path:
    path = tmp_path / name
    torch.save(module.state_dict(), path)
    return path


def saved_input(tmp_path: Path, steps: int = T, batch: int = B, features: int = I, name: str = "x.npy") -> Path:
    x = np.random.default_rng(1).standard_normal((steps, batch, features))
    path = tmp_path / name
    np.save(path, x)
    return path


def probe_readout(steps: int, batch: int, features: int, seed: int = 0) -> torch.Tensor:
    """The probe losses' readout w, drawn as documented: N(0, 1), time-major, float64, from ``seed``."""
    return torch.randn((steps, batch, features), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def autograd_probe_gradients(module: nn.Module, x: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """∂L/∂θ through the torch module itself: L = Σ_b ⟨w_{T−1,b}, y_{T−1,b}⟩ (last) or Σ_t,b ⟨w_t,b, y_t,b⟩ (all)."""
    module = module.double()
    module.zero_grad()
    y, _ = module(x)
    w = probe_readout(*y.shape)
    if loss == "last":
        w = torch.where(torch.arange(y.shape[0])[:, None, None] == y.shape[0] - 1, w, 0.0)
    (w * y).sum().backward()
    return {name: parameter.grad.clone() for name, parameter in module.named_parameters()}


def run(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(arguments)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# jacobians and credit: the arrays scripts read


def test_jacobians_equal_autograd_through_the_torch_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gru = nn.GRU(I, H)
    out = tmp_path / "J.npz"
    arguments = ["jacobians", str(saved_module(tmp_path, gru)), "--input", str(saved_input(tmp_path))]
    status, stdout, _ = run([*arguments, "--dtype", "float64", "--out", str(out), "--json"], capsys)
    assert status == 0
    listing = json.loads(stdout)
    arrays = np.load(out)
    assert listing["file"] == str(out) and set(listing["arrays"]) == set(arrays.files)
    jacobian = arrays["l0/jacobian"]
    assert jacobian.shape == (T, B, H, H) and listing["arrays"]["l0/jacobian"] == [T, B, H, H]
    paths = [name for name in arrays.files if name != "l0/jacobian"]
    assert {name.split("/")[1] for name in paths} == {"carry.diagonal", "update", "candidate", "reset"}
    dense = [arrays[name][..., None] * np.eye(H) if name.endswith(".diagonal") else arrays[name] for name in paths]
    np.testing.assert_allclose(sum(dense), jacobian, rtol=0, atol=1e-12)  # the carry path diag(z) is stored as z

    cell = nn.GRUCell(I, H).double()
    cell.load_state_dict({name.removesuffix("_l0"): value.double() for name, value in gru.state_dict().items()})
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    h = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            expected = torch.func.jacrev(lambda state, t=t, b=b: cell(x[t, b], state))(h[b])
            np.testing.assert_allclose(jacobian[t, b], expected.detach().numpy(), rtol=0, atol=1e-12)
        h = cell(x[t], h).detach()


@pytest.mark.parametrize("loss", ["last", "all"])
def test_credit_total_equals_autograd_of_the_probe_loss(
    loss: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lstm = nn.LSTM(I, H, num_layers=2)
    out = tmp_path / "C.npz"
    arguments = ["credit", str(saved_module(tmp_path, lstm)), "--input", str(saved_input(tmp_path)), "--loss", loss]
    status, stdout, _ = run([*arguments, "--dtype", "float64", "--out", str(out)], capsys)
    assert status == 0 and "C.npz" in stdout
    arrays = np.load(out)
    expected = autograd_probe_gradients(lstm, torch.from_numpy(np.load(tmp_path / "x.npy")), loss)
    stems = {"weight_ih": "W_i", "weight_hh": "W_h", "bias_ih": "b_i", "bias_hh": "b_h"}  # PyTorch → gatelens
    checked = 0
    for torch_name, gradient in expected.items():
        stem, layer = torch_name.rsplit("_l", 1)
        for gate, rows in zip("ifgo", gradient.chunk(4, dim=0)):  # PyTorch packs the gates in the order i, f, g, o
            name = f"l{layer}.{stems[stem]}{gate}"
            np.testing.assert_allclose(arrays[f"total/{name}"], rows.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(arrays[f"by_source/{name}"].sum(axis=0), rows.numpy(), rtol=1e-10, atol=1e-12)
            assert arrays[f"norms/{name}"].shape == (T, T) and arrays[f"by_lag/{name}"].shape == (T,)
            checked += 1
    assert checked == 2 * 4 * 4 and len([name for name in arrays.files if name.startswith("total/")]) == checked


def test_loss_last_is_the_apis_loss_last_for_a_bidirectional_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--loss last is gl.credit(loss="last"): the probe ⟨w, h_n⟩ on the final state, each direction's output at the
    last step it processes (forward: t = T, reverse: t = 1), checked against autograd through torch's own h_n."""
    torch.manual_seed(0)
    gru = nn.GRU(I, H, num_layers=2, bidirectional=True)
    checkpoint, x = saved_module(tmp_path, gru), saved_input(tmp_path)
    out = tmp_path / "C.npz"
    arguments = ["credit", str(checkpoint), "--input", str(x), "--loss", "last", "--dtype", "float64"]
    status, _, _ = run([*arguments, "--out", str(out)], capsys)
    assert status == 0
    arrays = np.load(out)
    inputs = torch.from_numpy(np.load(x))
    trace = gl.load(gru).to(torch.float64).trace(inputs)
    w = probe_readout(T, B, 2 * H)
    w_final = torch.cat([w[-1, :, :H], w[0, :, H:]], dim=-1)  # the readout where each direction ends
    api = gl.credit(trace, loss="last", targets=w_final, loss_fn=lambda y, target: (y * target).sum())
    for name, total in api.total.items():
        np.testing.assert_allclose(arrays[f"total/{name}"], total.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    module = gru.double()
    module.zero_grad()
    _, h_n = module(inputs)
    ((h_n[-2] * w[-1, :, :H]).sum() + (h_n[-1] * w[0, :, H:]).sum()).backward()  # torch's own final state
    stems = {"weight_ih": "W_i", "weight_hh": "W_h", "bias_ih": "b_i", "bias_hh": "b_h"}
    for torch_name, parameter in module.named_parameters():
        stem, layer = torch_name.rsplit("_l", 1)
        for gate, rows in zip("rzn", parameter.grad.chunk(3, dim=0)):
            name = f"l{layer}.{stems[stem]}{gate}"  # layer is "1" or "1_reverse": the recurrence l1, l1_reverse
            np.testing.assert_allclose(arrays[f"total/{name}"], rows.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# explain and analyze: findings, results.json, the report folder


def test_explain_json_holds_the_findings_of_the_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rnn = nn.RNN(I, H, nonlinearity="relu", bidirectional=True)
    checkpoint, x = saved_module(tmp_path, rnn), saved_input(tmp_path)
    status, stdout, stderr = run(
        ["explain", str(checkpoint), "--input", str(x), "--nonlinearity", "relu", "--json"], capsys
    )
    assert status == 0 and "input x.npy" in stderr
    result = json.loads(stdout)
    expected = gl.explain(gl.load(rnn).trace(torch.from_numpy(np.load(x)).float())).to_dict()
    assert result["findings"] == expected["findings"] and result["model"].startswith("Model(Elman(")


def test_analyze_writes_results_figures_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gru = nn.GRU(I, H, num_layers=2)
    out = tmp_path / "analysis"
    arguments = ["analyze", str(saved_module(tmp_path, gru)), "--input", str(saved_input(tmp_path))]
    status, stdout, stderr = run(
        [*arguments, "--loss", "all", "--dtype", "float64", "--out", str(out), "--json"], capsys
    )
    assert status == 0
    printed = json.loads(stdout)
    result = json.loads((out / "results.json").read_text())
    assert {key: value for key, value in printed.items() if key != "files"} == result
    assert sorted(printed["files"]) == sorted(str(path) for path in out.iterdir())
    assert result["loss"].startswith("probe loss many-to-many")
    expected = autograd_probe_gradients(gru, torch.from_numpy(np.load(tmp_path / "x.npy")), "all")
    np.testing.assert_allclose(result["credit"]["total"]["l0.W_hz"], expected["weight_hh_l0"][H : 2 * H], rtol=1e-10)
    (part,) = result["recurrences"].values()  # a unidirectional stack is one recurrence
    assert {"regimes", "propagation", "local_gradients", "lyapunov"} <= set(part)
    exponents = part["lyapunov"]["exponents"]
    assert len(exponents) == B and len(exponents[0]) == min(8, 2 * H)
    topics = {finding["topic"] for finding in result["explanation"]["findings"]}
    assert topics == {"regimes", "timescales", "horizon", "blocking", "local gradients", "lyapunov"}
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert len(pngs) >= 7 and all((out / name).read_bytes().startswith(b"\x89PNG") for name in pngs)
    html = (out / "report.html").read_text()
    assert html.count("<img") == len(pngs) and "findings" in html.lower()
    assert "probe loss at every step" not in html  # --loss all: the credit map already has a loss at every step


def test_analyze_without_input_says_so_and_uses_the_right_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = saved_module(tmp_path, nn.GRU(I, H, batch_first=True))
    out = tmp_path / "out"
    arguments = ["analyze", str(checkpoint), "--batch-first", "--steps", "6", "--batch", "2", "--out", str(out)]
    status, stdout, _ = run(arguments, capsys)
    assert status == 0 and "random sequences" in stdout and "no --input" in stdout
    html = (out / "report.html").read_text()
    assert "random sequences" in html
    result = json.loads((out / "results.json").read_text())
    (part,) = result["recurrences"].values()
    assert np.array(part["lyapunov"]["finite_time"]).shape[1] == 2  # (windows, B, S): two random sequences


def test_onnx_and_keras_files_are_analysed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_tests = pytest.importorskip("tests.test_onnx_loader")
    config = onnx_tests.Config("GRU")
    onnx_path = onnx_tests.save(onnx_tests.make_proto(config, onnx_tests.weights(config)), tmp_path)
    x = saved_input(tmp_path, features=onnx_tests.I)
    status, stdout, _ = run(["explain", str(onnx_path), "--input", str(x), "--prefix", "0", "--json"], capsys)
    assert status == 0
    expected = gl.explain(gl.load(onnx_path).trace(torch.from_numpy(np.load(x)).float())).to_dict()
    assert json.loads(stdout)["findings"] == expected["findings"]

    keras_tests = pytest.importorskip("tests.test_keras_loader")
    model = keras_tests.keras_model([keras_tests.keras.layers.GRU(4, return_sequences=True)])
    keras_path = keras_tests.save(model, tmp_path / "model.keras")
    status, stdout, _ = run(["jacobians", str(keras_path), "--out", str(tmp_path / "J.npz"), "--json"], capsys)
    assert status == 0 and json.loads(stdout)["arrays"]["l0/jacobian"] == [50, 4, 4, 4]


def test_reset_and_update_flags_choose_the_gru_convention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, x = saved_module(tmp_path, nn.GRU(I, H)), saved_input(tmp_path)
    for flags, convention in (
        ([], ("after", "keep")),
        (["--reset", "before", "--update", "replace"], ("before", "replace")),
    ):
        status, stdout, _ = run(["explain", str(checkpoint), "--input", str(x), *flags, "--json"], capsys)
        assert status == 0 and f"reset='{convention[0]}', update='{convention[1]}'" in json.loads(stdout)["model"]


def test_prefix_may_name_the_module_inside_a_checkpoint_wrapper(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.ModuleDict({"rnn": nn.GRU(I, H), "head": nn.Linear(H, 1)})
    checkpoint = tmp_path / "lightning.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, checkpoint)
    x = saved_input(tmp_path)
    for prefix in ("rnn", "model.rnn", "state_dict.model.rnn"):
        status, stdout, _ = run(["explain", str(checkpoint), "--input", str(x), "--prefix", prefix, "--json"], capsys)
        assert status == 0 and "lightning.pt" in json.loads(stdout)["model"]
    assert gl.load(checkpoint, prefix="rnn").weights.keys() == gl.load(model["rnn"]).weights.keys()


def test_half_precision_weights_are_analysed_in_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gru = nn.GRU(I, H).half()
    checkpoint, x = saved_module(tmp_path, gru, "half.pt"), saved_input(tmp_path)
    status, stdout, _ = run(["jacobians", str(checkpoint), "--input", str(x), "--out", str(tmp_path / "J.npz")], capsys)
    assert status == 0 and "float16 weights are analysed in float32" in " ".join(stdout.split())
    jacobian = np.load(tmp_path / "J.npz")["l0/jacobian"]
    expected = gl.load(gru.float()).trace(torch.from_numpy(np.load(x)).float()).jacobians()
    assert jacobian.dtype == np.float32 and np.array_equal(jacobian, expected.numpy())


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no traceback


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = saved_module(tmp_path, nn.GRU(I, H))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    pickled = tmp_path / "pickled.pt"
    torch.save({"weight_ih_l0": Payload()}, pickled)
    linear = saved_module(tmp_path, nn.Linear(3, 4), "linear.pt")
    wide = saved_input(tmp_path, features=I + 1, name="wide.npy")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((T, B, I), np.nan))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(5))
    x = str(saved_input(tmp_path))
    lstm = str(saved_module(tmp_path, nn.LSTM(I, H), "lstm.pt"))
    rnn = str(saved_module(tmp_path, nn.RNN(I, H), "rnn.pt"))
    two = saved_module(tmp_path, nn.ModuleDict({"encoder": nn.GRU(I, H), "decoder": nn.GRU(H, H)}), "two.pt")
    npz_folder = tmp_path / "arrays.npz"
    npz_folder.mkdir()
    damaged = saved_module(tmp_path, nn.GRU(I, H), "damaged.pt")
    damaged_record = flip_a_bit(damaged, "data/1")
    damaged_input = tmp_path / "damaged-x.pt"
    torch.save(torch.zeros(T, B, I), damaged_input)
    flip_a_bit(damaged_input, "data/0")
    return {
        "missing checkpoint": (["explain", str(tmp_path / "nope.pt")], "no such file"),
        "corrupt checkpoint": (["explain", str(corrupt)], "is not a readable PyTorch file"),
        "pickled code": (["explain", str(pickled)], "never runs code"),
        "no recurrent weights": (["explain", str(linear)], "expected one recurrent module"),
        "feature size": (["explain", str(good), "--input", str(wide)], "has 4 features per step"),
        "NaN input": (["explain", str(good), "--input", str(nan)], "contains NaN or Inf"),
        "input rank": (["explain", str(good), "--input", str(flat)], "holds an array of shape (5,)"),
        "missing input": (["explain", str(good), "--input", str(tmp_path / "none.npy")], "no such input file"),
        "unknown device": (["explain", str(good), "--device", "tpu7"], "unknown device 'tpu7'"),
        "absent device": (["explain", str(good), "--device", "cuda:63"], "not available on this machine"),
        "gru flag on an lstm": (["explain", lstm, "--reset", "before"], "GRU only"),
        "npz name": (["jacobians", str(good), "--input", x, "--out", str(tmp_path / "J.txt")], "must name a .npz"),
        "zero steps": (["explain", str(good), "--steps", "0"], "--steps must be at least 1"),
        "directory checkpoint": (["explain", str(tmp_path)], "is a directory, expected a file saved with torch.save"),
        "directory input": (["explain", str(good), "--input", str(tmp_path)], "is a directory; expected a .npy"),
        "numpy checkpoint": (["explain", x], "is a numpy file, not one saved with torch.save"),
        "npz is a directory": (["credit", str(good), "--out", str(npz_folder)], "is a directory; name the .npz"),
        "two modules": (["explain", str(two)], "found 2 ('encoder', 'decoder'); pass --prefix to choose one"),
        "rnn flag name": (["explain", rnn], "pass --nonlinearity tanh or relu"),
        "damaged checkpoint": (["explain", str(damaged)], f"record {damaged_record!r} of its zip archive does not"),
        "damaged input": (["explain", str(good), "--input", str(damaged_input)], "damaged-x.pt is not a readable"),
    }  # fmt: skip


CASES = [
    "missing checkpoint", "corrupt checkpoint", "pickled code", "no recurrent weights", "feature size", "NaN input",
    "input rank", "missing input", "unknown device", "absent device",
    "gru flag on an lstm", "npz name", "zero steps", "directory checkpoint", "directory input", "numpy checkpoint",
    "npz is a directory", "two modules", "rnn flag name", "damaged checkpoint", "damaged input",
]  # fmt: skip


def flip_a_bit(path: Path, record: str) -> str:
    """Flip one bit inside the data of the zip record whose name ends with ``record``, leaving the archive's
    structure intact (torch.load would read the changed value without complaint); returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(record))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 3] ^= 0x40
    path.write_bytes(data)
    return info.filename


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments, message = bad_cases(tmp_path)[case]
    status, stdout, stderr = run(arguments, capsys)
    assert status == 2 and stderr.count("\n") == 1 and stderr.startswith("gatelens: error: ")
    assert message in stderr and "Traceback" not in stderr and "this must never run" not in stdout + stderr


# What is not a real number is refused by the command line exactly as by the API (one validation path): the same
# message, naming the file where the API names x.
NOT_REAL = {
    "complex npy": np.zeros((T, B, I), dtype=np.complex128),
    "complex tensor": torch.zeros(T, B, I, dtype=torch.complex64),
    "bool npy": np.ones((T, B, I), dtype=bool),
    "bool tensor": torch.ones(T, B, I, dtype=torch.bool),
    "object npy": np.full((T, B, I), 0.5, dtype=object),
    "string npy": np.full((T, B, I), "0.5"),
    "NaN npy": np.where(np.arange(T)[:, None, None] == 4, np.nan, np.zeros((T, B, I))),
    "Inf tensor": torch.zeros(T, B, I).index_fill_(0, torch.tensor([2]), -torch.inf),
}


@pytest.mark.parametrize("case", NOT_REAL)
def test_inputs_that_are_not_real_numbers_get_the_apis_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = NOT_REAL[case]
    gru = nn.GRU(I, H)
    path = tmp_path / ("x.npy" if isinstance(value, np.ndarray) else "x.pt")
    if isinstance(value, np.ndarray):
        np.save(path, value, allow_pickle=value.dtype == object)
    else:
        torch.save(value, path)
    with pytest.raises((TypeError, ValueError)) as refused:
        gl.load(gru).trace(value)
    expected = str(refused.value)
    assert expected.startswith("x ")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # NumPy's ComplexWarning on a cast that drops the imaginary part
        status, stdout, stderr = run(["explain", str(saved_module(tmp_path, gru)), "--input", str(path)], capsys)
    assert status == 2 and stdout == "" and not caught
    assert stderr == f"gatelens: error: {path} {expected.removeprefix('x ')}\n"


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["explain", str(tmp_path / "nope.pt"), "--debug"])


@pytest.mark.parametrize("command", ["demo", "analyze", "explain", "jacobians", "credit", "experiment"])
def test_every_command_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"example: gatelens {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gatelens {gl.__version__}"


def test_a_state_dict_input_that_looks_batch_first_gets_a_one_line_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = saved_module(tmp_path, nn.GRU(I, H))
    x = saved_input(tmp_path, steps=3, batch=10)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        status, _, stderr = run(["explain", str(checkpoint), "--input", str(x)], capsys)
    assert status == 0
    (line,) = [line for line in stderr.splitlines() if "warning" in line]
    assert line.startswith("gatelens: warning: x of shape (3, 10, 3) is read as (T, B, I) = 3 steps of 10 sequences")
    assert "--batch-first" in line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status, _, stderr = run(["explain", str(checkpoint), "--input", str(x), "--batch-first"], capsys)
    assert status == 0 and "warning" not in stderr
