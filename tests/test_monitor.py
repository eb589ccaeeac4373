"""The training monitor against the analyses called directly, inside plain hand-written PyTorch training loops.

* rows at steps 0, every, 2·every, … whose numbers equal gl.propagation / regimes / local_gradients / lyapunov on
  gl.load of the same module at the same moment (horizons from each sequence's own end checked with one anchor per
  sequence), and whose gradient norm equals a hand computation after a real backward;
* the module's parameters, gradients and train/eval modes untouched;
* GRU, LSTM and RNN; recurrent found, named and given by a callable; bidirectional, batch_first, padded, float64;
* CSV and JSON files that parse back to the records, TensorBoard event files;
* the collapse and explode warnings, once each, and their flags;
* bad input at construction and a module without a recurrent layer at the first call.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
import warnings

import pytest
import torch
from torch import Tensor, nn

import gatelens as gl
from gatelens.analysis.regimes import REGIMES
from gatelens.experiments.monitor import COLUMNS, Monitor, MonitorWarning

T, B, I, H = 12, 4, 3, 6
KINDS = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


class Net(nn.Module):
    """A recurrent layer under the attribute ``rnn`` and a linear head on the last output."""

    def __init__(self, kind: str = "GRU", **options: object) -> None:
        super().__init__()
        self.rnn = KINDS[kind](I, H, **options)
        self.head = nn.Linear(H * (2 if options.get("bidirectional") else 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        output = self.rnn(x)[0]
        return self.head(output[:, -1] if self.rnn.batch_first else output[-1])


def _data(seed: int = 0, dtype: torch.dtype = torch.float32, batch_first: bool = False) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=generator, dtype=dtype)
    y = torch.randn(B, 1, generator=generator, dtype=dtype)
    return (x.transpose(0, 1).contiguous() if batch_first else x), y


def _expected(rnn: nn.Module, probe: Tensor, eps: float, lengths: list[int] | None = None) -> dict[str, object]:
    """The analyses called directly on gl.load(rnn), with one propagation anchor at each sequence's own end."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dropout", category=UserWarning)  # as the monitor does
        model = gl.load(rnn)
    trace = model.trace(probe, lengths=lengths)
    part = {"layer": 0, "direction": "forward"} if model.bidirectional else {}
    ends = lengths or [T] * B
    pr = gl.propagation(trace, anchors=sorted(set(end - 1 for end in ends)), **part)
    rows = {int(a): i for i, a in enumerate(pr.anchors.tolist())}
    horizon = pr.horizon(eps)
    horizons = [int(horizon[rows[end - 1], b]) for b, end in enumerate(ends)]
    own = sorted(end if h < 0 else h for h, end in zip(horizons, ends))
    exponents = sorted(gl.lyapunov(trace, k=1, **part).largest.tolist())
    return {
        "horizon": own[len(own) // 2],
        "horizon_reached_share": sum(h >= 0 for h in horizons) / len(horizons),
        **dict(zip(REGIMES, gl.regimes(trace, **part).census.tolist())),
        "largest_local_gradient": gl.local_gradients(trace, **part).largest["value"],
        "lyapunov": exponents[len(exponents) // 2],
    }


def _hand_norm(module: nn.Module) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters() if p.grad is not None))


def _snapshot(module: nn.Module) -> tuple[list[Tensor], list[Tensor | None], list[bool]]:
    params = [p.detach().clone() for p in module.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    return params, grads, [m.training for m in module.modules()]


def _assert_same(before: tuple, after: tuple) -> None:
    for old, new in zip(before[0], after[0]):
        assert torch.equal(old, new)
    for old, new in zip(before[1], after[1]):
        assert (old is None and new is None) or torch.equal(old, new)
    assert before[2] == after[2]


def _train(net: nn.Module, monitor: Monitor, steps: int, x: Tensor, y: Tensor) -> list[dict[str, object] | None]:
    """A plain training loop calling the monitor after backward, as the project's trainer does."""
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05)
    returned = []
    for step in range(steps):
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        returned.append(monitor(step, net, loss=loss.item()))
        optimiser.step()
        optimiser.zero_grad()
    return returned


def test_rows_at_every_step_equal_the_analyses_and_leave_the_module_alone() -> None:
    net = Net("GRU", num_layers=2, dropout=0.2)  # dropout between layers: gl.load's notice must stay quiet
    x, y = _data()
    probe = x + 0.5
    monitor = Monitor(probe, every=4, eps=1e-2)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(11):
        net.train(step % 2 == 0)  # both modes, each of which must survive the call
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        before = _snapshot(net)
        row = monitor(step, net, loss=loss.item())
        _assert_same(before, _snapshot(net))
        if step % 4:
            assert row is None
            continue
        expected = {"step": step, "loss": loss.item(), "gradient_norm": _hand_norm(net)}
        expected |= _expected(net.rnn, probe, 1e-2)
        assert set(row) == set(COLUMNS)
        assert row["gradient_norm"] == pytest.approx(expected.pop("gradient_norm"), rel=1e-12)
        assert {key: row[key] for key in expected} == expected
        optimiser.step()
        optimiser.zero_grad()
    assert [r["step"] for r in monitor.records] == [0, 4, 8]
    assert len({r["largest_local_gradient"] for r in monitor.records}) == 3  # the weights did change in between


def test_gradient_norm_is_none_without_gradients_and_loss_accepts_a_tensor() -> None:
    net = Net()
    monitor = Monitor(_data()[0], every=1)
    assert monitor(0, net, loss=torch.tensor(0.25))["gradient_norm"] is None
    assert monitor.records[0]["loss"] == 0.25
    assert monitor(1, net)["loss"] is None


@pytest.mark.parametrize(
    "kind, options, recurrent",
    [
        ("GRU", {}, None),
        ("LSTM", {}, "rnn"),
        ("RNN", {"nonlinearity": "relu"}, lambda m: m.rnn),
        ("LSTM", {"num_layers": 2, "bidirectional": True}, None),
        ("GRU", {"batch_first": True}, "rnn"),
        ("RNN", {"num_layers": 2}, None),
    ],
    ids=["gru", "lstm-named", "rnn-callable", "lstm-bidirectional", "gru-batch-first", "rnn-two-layers"],
)
def test_plain_training_loops(kind: str, options: dict, recurrent: object) -> None:
    torch.manual_seed(1)
    net = Net(kind, **options)
    x, y = _data(batch_first=bool(options.get("batch_first")))
    monitor = Monitor(x, every=3, recurrent=recurrent)
    returned = _train(net, monitor, 7, x, y)
    assert [row is not None for row in returned] == [step % 3 == 0 for step in range(7)]
    assert monitor.records == [row for row in returned if row is not None]
    expected = _expected(net.rnn, x, 1e-3)  # the weights after the last update: record again at a later step
    row = monitor(9, net)
    assert {key: value for key, value in row.items() if key in expected} == expected
    last = monitor.records[-1]
    assert sum(last[key] for key in REGIMES) == pytest.approx(1.0)


def test_padded_float64_probe_horizon_from_each_sequence_end() -> None:
    torch.manual_seed(0)
    net = Net("GRU").double()
    with torch.no_grad():
        net.rnn.bias_hh_l0[H : 2 * H] = -1.0  # z ≈ 0.3: the long sequence falls below eps, the short ones do not
    x, _ = _data(dtype=torch.float64)
    lengths = [12, 3, 2, 3]
    monitor = Monitor(x, every=1, lengths=lengths, eps=0.05)
    row = monitor(0, net)
    expected = _expected(net.rnn, x, 0.05, lengths)
    assert {key: row[key] for key in expected} == expected
    # one sequence reaches eps (at lag 6); the others never do and count as their own lengths 3, 2, 3, not T
    assert row["horizon_reached_share"] == 0.25 and row["horizon"] == 3


def test_half_precision_module_is_analysed_in_float32() -> None:
    torch.manual_seed(4)
    net = Net("LSTM").to(torch.bfloat16)
    x, _ = _data()
    row = Monitor(x.to(torch.bfloat16), every=1)(0, net)
    copy = Net("LSTM")
    copy.load_state_dict({name: value.float() for name, value in net.state_dict().items()})  # exact conversion
    expected = _expected(copy.rnn, x.to(torch.bfloat16).float(), 1e-3)
    assert {key: row[key] for key in expected} == expected


def test_csv_and_json_files(tmp_path) -> None:
    net = Net()
    x, y = _data()
    out = tmp_path / "runs" / "first"
    monitor = Monitor(x, every=2, out=out, tensorboard=False)
    monitor(0, net)  # no loss, no gradients: empty CSV cells, null in JSON
    _train(net, monitor, 5, x, y)  # records steps 0, 2, 4 again: five rows in all
    monitor(6, net, loss=math.nan)
    assert len(monitor.records) == 5
    lines = (out / "monitor.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 6
    with open(out / "monitor.csv", newline="") as file:
        parsed = list(csv.DictReader(file))
    for row, record in zip(parsed, monitor.records):
        for key in COLUMNS:
            value = record[key]
            if value is None:
                assert row[key] == ""
            elif isinstance(value, bool):
                assert row[key] == str(value)
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(float(row[key]))
            else:
                assert type(value)(row[key]) == value
    saved = json.loads((out / "monitor.json").read_text())
    assert saved == monitor.to_dict()
    json.dumps(saved, allow_nan=False)
    assert saved[0]["loss"] is None and saved[0]["gradient_norm"] is None and saved[-1]["loss"] is None
    assert saved[1]["loss"] == monitor.records[1]["loss"] and saved[1]["horizon"] == monitor.records[1]["horizon"]
    assert monitor(7, net) is None and len((out / "monitor.csv").read_text().splitlines()) == 6
    assert sorted(p.name for p in out.iterdir()) == ["monitor.csv", "monitor.json"]
    Monitor(x, every=2, out=out, tensorboard=False)(0, net)  # a new monitor starts the files afresh
    assert (
        len((out / "monitor.csv").read_text().splitlines()) == 2
        and len(json.loads((out / "monitor.json").read_text())) == 1
    )


def test_horizon_collapse_warns_once() -> None:
    torch.manual_seed(2)
    net = Net("GRU")
    x, _ = _data()
    with torch.no_grad():
        net.rnn.weight_hh_l0.mul_(0.1)
        net.rnn.bias_hh_l0[H : 2 * H] = 4.0  # z ≈ 0.98: the flow never falls below eps within T
    monitor = Monitor(x, every=1, explode=1e4)
    first = monitor(0, net)
    assert first["horizon"] == T and first["horizon_reached_share"] == 0.0 and not first["horizon_collapsed"]
    with torch.no_grad():
        net.rnn.bias_hh_l0[H : 2 * H] = -4.0  # z ≈ 0.02: the state is replaced at every step
    with pytest.warns(MonitorWarning, match=rf"horizon collapsed to \d steps, below 0.5 × the {T} steps") as caught:
        second = monitor(1, net)
    assert len(caught) == 1 and "not repeated" in str(caught[0].message)
    third = monitor(2, net)  # still collapsed: flagged again, but no second warning (it would fail this test)
    assert second["horizon"] < T / 2 and second["horizon_collapsed"] and third["horizon_collapsed"]
    assert not any(row["local_exploded"] for row in monitor.records)


def test_local_gradient_explosion_warns_once() -> None:
    torch.manual_seed(3)
    net = Net("RNN", nonlinearity="relu", bias=False)  # h is positively homogeneous in W_ih: ×100 scales h ×100
    x, _ = _data()
    with torch.no_grad():
        net.rnn.weight_hh_l0.mul_(0.3)
    monitor = Monitor(x, every=5, collapse=1e-6)
    first = monitor(0, net)
    with torch.no_grad():
        net.rnn.weight_ih_l0.mul_(100.0)
    with pytest.warns(MonitorWarning, match="largest local gradient grew to .*more than 10 ×") as caught:
        second = monitor(5, net)
    assert len(caught) == 1
    third = monitor(10, net)
    assert second["largest_local_gradient"] > 10 * first["largest_local_gradient"]
    assert [row["local_exploded"] for row in (first, second, third)] == [False, True, True]
    assert not any(row["horizon_collapsed"] for row in monitor.records)


def test_tensorboard_event_files(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = Net()
    x, y = _data()
    monitor = Monitor(x, every=2, out=tmp_path)
    _train(net, monitor, 3, x, y)
    monitor.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Scalars("gatelens/horizon")
    assert [(e.step, e.value) for e in logged] == [(r["step"], r["horizon"]) for r in monitor.records]
    assert {f"gatelens/{key}" for key in COLUMNS[1:]} <= set(events.Tags()["scalars"])


def test_without_tensorboard_it_is_skipped_quietly(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail as if not installed
    monitor = Monitor(_data()[0], every=1, out=tmp_path)
    monitor(0, Net())
    monitor.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.csv", "monitor.json"]


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"every": 0}, ValueError, "every must be an int ≥ 1"),
        ({"every": 2.0}, ValueError, "every must be an int ≥ 1"),
        ({"eps": 1.5}, ValueError, r"eps must be a number in \(0, 1\)"),
        ({"collapse": 0}, ValueError, r"collapse must be a number in \(0, 1\)"),
        ({"explode": 0.5}, ValueError, "explode must be a number > 1"),
        ({"recurrent": nn.GRU(3, 4)}, TypeError, "recurrent must be None, a submodule name"),
        ({"tensorboard": "yes"}, TypeError, "tensorboard must be True or False"),
        ({"probe": torch.full((T, B, I), math.nan)}, ValueError, "probe contains NaN"),
        ({"probe": torch.zeros(T, B, I, dtype=torch.long)}, TypeError, "probe must be a floating-point tensor"),
        ({"probe": torch.zeros(T)}, ValueError, r"probe must be a non-empty 3-D batch .* got shape \(12,\)"),
        ({"probe": [[0.0]]}, TypeError, "probe must be a torch.Tensor"),
    ],
)
def test_bad_input_at_construction(options: dict, error: type, match: str) -> None:
    options = {"probe": _data()[0]} | options
    with pytest.raises(error, match=match):
        Monitor(**options)


def test_unwritable_out_fails_at_construction(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not a writable directory"):
        Monitor(_data()[0], out=blocker / "runs")
    assert not (blocker.parent / "runs").exists()


def test_read_only_out_fails_at_construction(tmp_path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:  # a read-only directory, which root could still write
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match="is not a writable directory: Permission denied"):
        Monitor(_data()[0], out=tmp_path / "runs")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.GRU(I, H), nn.LSTM(H, H)


@pytest.mark.parametrize(
    "module, recurrent, error, match",
    [
        (nn.Sequential(nn.Linear(I, 1)), None, TypeError, "one recurrent layer .* in the Sequential; found 0: none"),
        (TwoLayers(), None, TypeError, r"found 2: encoder \(GRU\), decoder \(LSTM\)"),
        (Net(), "rnm", ValueError, r"recurrent='rnm': the Net has no such submodule \(its children: rnn, head\)"),
        (Net(), lambda m: m.head, TypeError, "gives a Linear, expected an nn.GRU"),
    ],
    ids=["none", "two", "misnamed", "not-recurrent"],
)
def test_no_recurrent_part_fails_at_the_first_call(
    module: nn.Module, recurrent: object, error: type, match: str
) -> None:
    monitor = Monitor(_data()[0], every=5, recurrent=recurrent)
    assert monitor(3, module) is None  # nothing is looked for between records
    with pytest.raises(error, match=match):
        monitor(5, module)
    assert monitor.records == []


def test_bad_step_and_loss() -> None:
    monitor = Monitor(_data()[0])
    with pytest.raises(ValueError, match="step must be an int ≥ 0"):
        monitor(-1, Net())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        monitor(0, "net")
    with pytest.raises(TypeError, match="loss must be a number or a one-element tensor"):
        monitor(0, Net(), loss=torch.zeros(2))
