"""``gatelens demo`` on a small setting: the folder it writes, and its numbers against autograd through the saved
torch models (rebuilt here from their state_dicts with plain torch, not with gatelens)."""

from __future__ import annotations

import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gatelens.cli import main
from gatelens.cli.demo import PROBE, SEQUENCES, SPLIT
from gatelens.experiments.tasks import adding_problem
from tests.test_report_browser import assert_renders

STEPS, HIDDEN, SEED = 12, 4, 3
MODULES = {"GRU": nn.GRU, "Elman": nn.RNN}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo's folder and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "gatelens-demo"
    arguments = ["demo", "--steps", str(STEPS), "--hidden", str(HIDDEN), "--epochs", "2", "--seed", str(SEED)]
    printed = StringIO()
    with redirect_stdout(printed):
        assert main([*arguments, "--out", str(out)]) == 0
    return out, printed.getvalue()


def trained(out: Path, name: str) -> tuple[nn.Module, nn.Linear]:
    """The demo's trained recurrent layer and head, from its saved state_dict, in float64."""
    state = torch.load(out / f"{name.lower()}.pt", weights_only=True)
    rnn, head = MODULES[name](2, HIDDEN).double(), nn.Linear(HIDDEN, 1).double()
    rnn.load_state_dict({key.removeprefix("rnn."): value for key, value in state.items() if key.startswith("rnn.")})
    head.load_state_dict({key.removeprefix("head."): value for key, value in state.items() if key.startswith("head.")})
    return rnn, head


def test_the_folder_holds_the_report_results_figures_and_models(demo: tuple[Path, str]) -> None:
    out, printed = demo
    names = {path.name for path in out.iterdir()}
    assert {"report.html", "results.json", "gru.pt", "elman.pt", "inputs.npy"} <= names
    test = adding_problem(STEPS, SEQUENCES, SEED).split(list(SPLIT))["test"]
    np.testing.assert_array_equal(np.load(out / "inputs.npy"), test.inputs[:, :PROBE].double().numpy())
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 12 and all(path.read_bytes().startswith(b"\x89PNG") for path in pngs)
    html = (out / "report.html").read_text()
    assert html.count("<img") == len(pngs) and "GRU" in html and "Elman" in html
    assert "a probe loss at every step" in html  # the task's loss sits at the last step only
    assert "GRU" in printed and "Elman" in printed and "findings" in printed and "report.html" in printed


def test_results_hold_both_models_and_the_task(demo: tuple[Path, str]) -> None:
    results = json.loads((demo[0] / "results.json").read_text())
    assert results["task"]["steps"] == STEPS and results["task"]["sequences"] == SEQUENCES
    assert set(results["training"]) == set(results["models"]) == {"GRU", "Elman"}
    for name, model in results["models"].items():
        topics = {finding["topic"] for finding in model["explanation"]["findings"]}
        assert topics == {"regimes", "timescales", "horizon", "blocking", "local gradients", "lyapunov"}
        assert model["loss"] == "the task's loss" and name in model["name"]
        (part,) = model["recurrences"].values()
        assert len(part["lyapunov"]["exponents"]) == PROBE


@pytest.mark.parametrize("name", ["GRU", "Elman"])
def test_test_error_and_credit_equal_plain_torch(name: str, demo: tuple[Path, str]) -> None:
    out = demo[0]
    results = json.loads((out / "results.json").read_text())
    rnn, head = trained(out, name)
    test = adding_problem(STEPS, SEQUENCES, SEED).split(list(SPLIT))["test"]
    with torch.no_grad():
        predictions = head(rnn(test.inputs.double())[0][-1])
    mse = float(((predictions - test.targets.double()) ** 2).mean())
    assert results["training"][name]["test_mse"] == pytest.approx(mse, rel=1e-4)  # trained and evaluated in float32

    inputs, targets = test.inputs[:, :PROBE].double(), test.targets[:PROBE].double()
    loss = torch.nn.functional.mse_loss(head(rnn(inputs)[0][-1]), targets)
    gradients = dict(zip([n for n, _ in rnn.named_parameters()], torch.autograd.grad(loss, list(rnn.parameters()))))
    total = results["models"][name]["credit"]["total"]
    if name == "GRU":
        for gate, rows in zip("rzn", gradients["weight_hh_l0"].chunk(3)):
            np.testing.assert_allclose(total[f"l0.W_h{gate}"], rows.numpy(), rtol=1e-9, atol=1e-13)
    else:
        np.testing.assert_allclose(total["l0.W_hh"], gradients["weight_hh_l0"].numpy(), rtol=1e-9, atol=1e-13)


def test_saved_models_are_read_by_analyze(demo: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["explain", str(demo[0] / "elman.pt"), "--nonlinearity", "tanh", "--steps", "5", "--json"])
    assert status == 0 and json.loads(capsys.readouterr().out)["model"].startswith("Model(Elman(")


def test_the_demo_report_renders_in_chromium(demo: tuple[Path, str], tmp_path: Path) -> None:
    screenshot = assert_renders(demo[0] / "report.html", tmp_path / "demo.png")
    assert screenshot.read_bytes().startswith(b"\x89PNG")


def test_json_output_is_valid_json_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["demo", "--steps", "6", "--hidden", "2", "--epochs", "1", "--out", str(tmp_path), "--json"]
    assert main(arguments) == 0
    printed = json.loads(capsys.readouterr().out)  # the training bars and messages went to stderr
    assert printed == json.loads((tmp_path / "results.json").read_text())
