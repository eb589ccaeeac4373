"""gl.analyze_dataset: statistics pooled over batches equal those of one batch holding every sequence (float64, to
1e-10) and those of independent oracles (each sequence's horizon on its own, by exact SVD); the Lyapunov means and
standard errors as computed by hand from per-batch runs; the same aggregate on a Dask cluster; the command line."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatelens as gl
from gatelens.analysis.dataset import DATASET_STAGES, PooledLyapunov, _batch, _own
from gatelens.cli import main

F64 = torch.float64
MODULES = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}


def _model(kind: str, layers: int = 1, hidden: int = 4, features: int = 3, seed: int = 0, **options: Any) -> gl.Model:
    torch.manual_seed(seed)
    return gl.load(MODULES[kind](features, hidden, num_layers=layers, **options).double())


def _inputs(model: gl.Model, steps: int, sequences: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, sequences, model.input_size, generator=generator, dtype=F64)
    return x.transpose(0, 1).contiguous() if model.batch_first else x


def _lengths(steps: int, sequences: int, seed: int) -> torch.Tensor:
    return torch.randint(1, steps + 1, (sequences,), generator=torch.Generator().manual_seed(seed))


def _close(found: Any, expected: Any, where: str = "") -> None:
    """Nested dicts and lists equal, floats to 1e-10 relative (NaN and ±inf equal to themselves)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), where
        for key in expected:
            _close(found[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(found, (list, tuple)) and len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected)):
            _close(a, b, f"{where}[{index}]")
    elif isinstance(expected, float) and isinstance(found, float):
        assert (
            found == expected
            or math.isclose(found, expected, rel_tol=1e-10, abs_tol=1e-300)
            or (math.isnan(found) and math.isnan(expected))
        ), f"{where}: {found} != {expected}"
    else:
        assert found == expected, f"{where}: {found!r} != {expected!r}"


def _tensors_close(found: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(found.double(), expected.double(), rtol=1e-10, atol=0, equal_nan=True)


def _own_horizon(model: gl.Model, x: torch.Tensor, length: int, part: Any, eps: float, max_lag: int) -> int:
    """The oracle: sequence b traced alone over its own L_b steps, its horizon by exact SVD from its last step."""
    one = x[:length, None] if not model.batch_first else x[None, :length]
    trace = model.trace(one)
    result = gl.propagation(trace, layer=part.layer, direction=part.direction, max_lag=min(length, max_lag))
    return int(result.horizon(eps)[0, 0])


# ---------------------------------------------------------------------------------------------------------------
# pooled = one batch holding every sequence


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(MODULES)),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    hidden=st.integers(2, 4),
    steps=st.integers(1, 10),
    sequences=st.integers(1, 9),
    batch_size=st.integers(1, 10),
    padded=st.booleans(),
    eps=st.sampled_from([1e-3, 0.1, 0.5]),
    max_lag=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_pooled_statistics_equal_one_batch_of_every_sequence(
    kind: str, layers: int, bidirectional: bool, batch_first: bool, hidden: int, steps: int, sequences: int,
    batch_size: int, padded: bool, eps: float, max_lag: int, seed: int,
) -> None:  # fmt: skip
    model = _model(kind, layers, hidden, seed=seed, bidirectional=bidirectional, batch_first=batch_first)
    x = _inputs(model, steps, sequences, seed)
    lengths = _lengths(steps, sequences, seed) if padded else None
    chosen = gl.Settings(eps=eps, max_lag=max_lag, k=3)
    pooled = gl.analyze_dataset(model, x, batch_size=batch_size, lengths=lengths, settings=chosen)
    whole = gl.analyze(model, x, lengths=lengths, only=DATASET_STAGES, settings=chosen)
    assert pooled.batches == math.ceil(sequences / batch_size) and pooled.sequences == sequences
    assert pooled.valid_steps == (steps * sequences if lengths is None else int(lengths.sum()))
    own_lengths = [steps] * sequences if lengths is None else lengths.tolist()
    assert len(pooled.recurrences) == len(whole.recurrences)
    for part, one in zip(pooled.recurrences, whole.recurrences):
        assert (part.label, part.layer, part.direction) == (one.label, one.layer, one.direction)
        # regimes: census from summed counts, means from pooled sums
        assert torch.equal(part.regimes.census_by_unit, one.regimes.census_by_unit.double())
        for name in ("census", "looks_blocked", "mean_carry", "mean_admit", "mean_gate", "timescale"):
            _tensors_close(getattr(part.regimes, name), getattr(one.regimes, name))
        assert part.regimes.unit_kind == one.regimes.unit_kind and part.regimes.valid == int(one.regimes.valid.sum())
        # horizons: each sequence's, from its own last step, against the sequence traced alone (exact SVD)
        expected = [_own_horizon(model, x[:, b] if not batch_first else x[b], own_lengths[b], part, eps, max_lag)
                    for b in range(sequences)]  # fmt: skip
        assert part.horizons.per_sequence.tolist() == expected
        # local gradients: the pooled per-step values' statistics, and the largest one
        _close(part.local.summary(), one.local.summary())
        _close(part.local.largest, one.local.largest)
        # Lyapunov: per sequence
        _tensors_close(part.lyapunov.exponents, one.lyapunov.exponents)
        assert torch.equal(part.lyapunov.rank, one.lyapunov.rank.cpu())
        assert torch.equal(part.lyapunov.counted, one.lyapunov.counted.cpu())
    single = gl.analyze_dataset(model, x, batch_size=sequences, lengths=lengths, settings=chosen)
    assert single.batches == 1
    expected_dict, found_dict = single.to_dict(), pooled.to_dict()
    for result in (expected_dict, found_dict):  # what depends on the split: the batches and the Lyapunov batch means
        del result["dataset"], result["seconds"]
        for recurrence in result["recurrences"].values():
            del recurrence["lyapunov"]["batches"]
        result["explanation"]["findings"] = [f for f in result["explanation"]["findings"] if f["topic"] != "lyapunov"]
    _close(found_dict, expected_dict)


def test_horizon_quantiles_count_the_unreached_sequences_as_longest() -> None:
    from gatelens.analysis.dataset import PooledHorizons

    result = PooledHorizons("l0", 1e-3, 10, torch.tensor([3, -1, 5, 1, -1]), torch.full((5,), 12))
    assert result.reached == 3 and result.histogram.tolist() == [0, 1, 0, 1, 0, 1] + [0] * 5
    assert [result.quantile(q) for q in (0, 0.2, 0.4, 0.6, 0.61, 1)] == [1, 1, 3, 5, math.inf, math.inf]
    assert result.summary()["median"] == 5 and result.to_dict()["summary"]["p95"] is None


def test_lyapunov_means_and_standard_errors_by_hand_from_per_batch_runs() -> None:
    model = _model("gru", layers=2, hidden=3)
    steps, sequences, size = 30, 11, 4
    x = _inputs(model, steps, sequences, seed=3)
    lengths = _lengths(steps, sequences, seed=3)
    pooled = gl.analyze_dataset(
        model, x, batch_size=size, lengths=lengths, only=["lyapunov"], settings=gl.Settings(k=4)
    )
    (part,) = pooled.recurrences
    runs = []
    for a in range(0, sequences, size):
        own = lengths[a : a + size]
        runs.append(gl.lyapunov(model, x[: int(own.max()), a : a + size], lengths=own, k=4).exponents.numpy())
    every = np.concatenate(runs)  # (N, k)
    assert np.isfinite(every).all()
    np.testing.assert_allclose(part.lyapunov.exponents.numpy(), every, rtol=1e-10, atol=0)
    np.testing.assert_allclose(part.lyapunov.mean.numpy(), every.mean(0), rtol=1e-10, atol=0)
    np.testing.assert_allclose(part.lyapunov.stderr.numpy(), every.std(0, ddof=1) / np.sqrt(sequences), rtol=1e-10)
    means = np.stack([run.mean(0) for run in runs])  # (3 batches, k): 4, 4 and 3 sequences
    np.testing.assert_allclose(part.lyapunov.batch_means.numpy(), means, rtol=1e-10, atol=0)
    np.testing.assert_allclose(part.lyapunov.batch_mean.numpy(), means.mean(0), rtol=1e-10, atol=0)
    np.testing.assert_allclose(part.lyapunov.batch_stderr.numpy(), means.std(0, ddof=1) / np.sqrt(3), rtol=1e-10)
    (finding,) = [f for f in pooled.explanation.findings if f.topic == "lyapunov"]
    assert finding.value == pytest.approx(every[:, 0].mean(), rel=1e-12)
    assert f"over {sequences} sequences; over the 3 batches" in finding.text


def test_lyapunov_statistics_leave_minus_infinity_out_and_count_it() -> None:
    inf = math.inf
    exponents = torch.tensor([[-0.1, -inf], [-0.3, -0.5], [0.2, -inf], [-0.2, -0.4], [-inf, -inf]], dtype=F64)
    result = PooledLyapunov("l0", exponents, torch.tensor([1, 2, 1, 2, 0]), torch.full((5,), 9), [0, 2, 4, 5])
    assert result.negative_infinite.tolist() == [1, 3]
    finite = [-0.1, -0.3, 0.2, -0.2]
    assert result.mean[0] == pytest.approx(np.mean(finite)) and result.mean[1] == pytest.approx(-0.45)
    assert result.stderr[0] == pytest.approx(np.std(finite, ddof=1) / 2)
    means = result.batch_means
    assert means[0].tolist() == pytest.approx([-0.2, -0.5]) and means[1].tolist() == pytest.approx([0.0, -0.4])
    assert means[2].isnan().all()  # batch 3's only sequence is −inf in both: no finite mean
    assert result.batch_mean.tolist() == pytest.approx([-0.1, -0.45])
    assert result.batch_stderr[0] == pytest.approx(np.std([-0.2, 0.0], ddof=1) / np.sqrt(2))


def test_an_initial_state_is_split_with_its_sequences() -> None:
    model = _model("lstm", layers=2, hidden=3)
    x = _inputs(model, 12, 7, seed=5)
    generator = torch.Generator().manual_seed(5)
    h0 = (torch.randn(2, 7, 3, generator=generator, dtype=F64), torch.randn(2, 7, 3, generator=generator, dtype=F64))
    pooled = gl.analyze_dataset(model, x, batch_size=3, h0=h0, only=["regimes", "lyapunov"])
    whole = gl.analyze(model, x, h0=h0, only=["regimes", "lyapunov"])
    _tensors_close(pooled.recurrences[0].regimes.timescale, whole.recurrences[0].regimes.timescale)
    _tensors_close(pooled.recurrences[0].lyapunov.exponents, whole.recurrences[0].lyapunov.exponents)
    states = {"l0": torch.randn(7, 6, dtype=F64), "l1": torch.randn(7, 6, dtype=F64)}  # full (h, c) states
    as_dict = gl.analyze_dataset(model, x, batch_size=2, h0=states, only=["regimes"])
    _tensors_close(as_dict.recurrences[0].regimes.mean_carry,
                   gl.analyze(model, x, h0=states, only=["regimes"]).recurrences[0].regimes.mean_carry)  # fmt: skip


def test_a_worker_is_sent_its_own_batch_not_the_whole_data_set() -> None:
    model = _model("gru")
    x = _inputs(model, 20, 400)
    batch = _batch(model, x, None, None, DATASET_STAGES, gl.Settings(), 0, 4)
    sent = len(pickle.dumps(_own(batch.arguments())))
    assert sent < 20 * 4 * 3 * 8 + 4096  # the batch's 20 × 4 × 3 float64 values and little else


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"only": ["credit"]}, "credit cannot be pooled over batches"),
        ({"only": ["regimes", "blocking"]}, "blocking cannot be pooled over batches"),
        ({"skip": list(DATASET_STAGES)}, "no stage left to run"),
        ({"lengths": [3] * 4}, r"lengths has shape \(4,\), expected \(5,\)"),
        ({"h0": torch.zeros(1, 4, 4, dtype=F64)}, "axis 1 must hold the N = 5 sequences"),
        ({"workers": 0}, "workers must be an int ≥ 1"),
        ({"workers": 1, "scheduler": "tcp://127.0.0.1:1"}, "--workers sets the size of the local cluster"),
    ],
)
def test_bad_options_are_refused_before_any_batch_runs(options: dict[str, Any], message: str) -> None:
    model = _model("gru")
    with pytest.raises(ValueError, match=message):
        gl.analyze_dataset(model, _inputs(model, 6, 5), **options)


def test_bad_inputs_are_refused_with_the_layout() -> None:
    model = _model("gru")
    with pytest.raises(ValueError, match=r"x must hold N sequences as \(T, N, I\)"):
        gl.analyze_dataset(model, torch.zeros(6, 3, dtype=F64))
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the model is torch.float64"):
        gl.analyze_dataset(model, torch.zeros(6, 5, 3))
    with pytest.raises(TypeError, match="needs a gatelens Model"):
        gl.analyze_dataset(model.trace(_inputs(model, 6, 5)), _inputs(model, 6, 5))
    bad = _inputs(model, 6, 9)
    bad[2, 7, 0] = math.nan
    with pytest.raises(ValueError, match=r"sequences 6\.\.8 of the data set .*x contains NaN or Inf"):
        gl.analyze_dataset(model, bad, batch_size=3)


def test_progress_hears_every_batch_and_the_stages_of_each() -> None:
    model = _model("rnn")
    heard: list[tuple[str, float, float]] = []
    gl.analyze_dataset(model, _inputs(model, 5, 7), batch_size=3, progress=lambda *event: heard.append(event))
    batches = [event for event in heard if event[0] == "batches"]
    assert batches == [("batches", done, 3) for done in range(4)]
    assert {event[0] for event in heard} == {"batches", *DATASET_STAGES}


def test_a_memory_mapped_input_is_read_batch_by_batch(tmp_path: Path) -> None:
    model = _model("gru", batch_first=True)
    x = _inputs(model, 8, 10)
    np.save(tmp_path / "x.npy", x.numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    from_file = gl.analyze_dataset(model, mapped, batch_size=4)
    in_memory = gl.analyze_dataset(model, x, batch_size=4)
    _close(from_file.to_dict()["recurrences"], in_memory.to_dict()["recurrences"])


# ---------------------------------------------------------------------------------------------------------------
# Dask


def _without_timing(results: dict[str, Any]) -> dict[str, Any]:
    results = json.loads(json.dumps(results))
    for key in ("seconds", "where"):
        results.pop(key, None)
        results.get("dataset", {}).pop(key, None)
    results.pop("files", None)
    return results


def test_a_dask_cluster_gives_the_serial_aggregate() -> None:
    from distributed import Client, LocalCluster

    model = _model("gru", layers=2, hidden=5)
    x = _inputs(model, 15, 13, seed=2)
    lengths = _lengths(15, 13, seed=2)
    serial = gl.analyze_dataset(model, x, batch_size=4, lengths=lengths)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        heard: list[tuple[str, float, float]] = []
        on_dask = gl.analyze_dataset(model, x, batch_size=4, lengths=lengths, client=client,
                                     progress=lambda *event: heard.append(event))  # fmt: skip
    assert on_dask.where == "the Dask client's cluster (2 workers)" and serial.where == "this process"
    assert heard[0] == ("batches", 0, 4) and heard[-1] == ("batches", 4, 4) and len(heard) == 5
    _close(_without_timing(on_dask.to_dict()), _without_timing(serial.to_dict()))


# ---------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, torch.nn.GRU, np.ndarray]:
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 6)
    checkpoint = tmp_path / "model.pt"
    torch.save(gru.state_dict(), checkpoint)
    x = np.random.default_rng(0).standard_normal((20, 11, 3))
    np.save(tmp_path / "x.npy", x)
    return checkpoint, tmp_path / "x.npy", gru, x


def test_cli_analyze_over_batches_writes_the_pooled_statistics(
    files: tuple[Path, Path, torch.nn.GRU, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, path, gru, x = files
    out = tmp_path / "out"
    arguments = ["analyze", str(checkpoint), "--input", str(path), "--dtype", "float64", "--batch-size", "4"]
    assert main([*arguments, "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    printed, messages = json.loads(captured.out), " ".join(captured.err.split())  # rich wraps lines
    assert "11 sequences of up to 20 steps (220 valid steps) in 3 batches of 4 or 3" in messages
    assert "credit maps and blocking are per batch" in messages
    saved = json.loads((out / "results.json").read_text())
    assert {key: printed[key] for key in saved} == saved and "credit" not in saved
    assert saved["dataset"] | {"where": None} == {
        "sequences": 11, "batches": 3, "batch_size": 4, "batch_edges": [0, 4, 8, 11], "steps": 20, "valid_steps": 220,
        "where": None,
    }  # fmt: skip
    expected = gl.analyze_dataset(gl.load(gru.double()), torch.from_numpy(x), batch_size=4).to_dict()
    _close(_without_timing(saved)["recurrences"], _without_timing(expected)["recurrences"])
    assert saved["explanation"]["findings"] == expected["explanation"]["findings"]
    names = {file.name for file in out.iterdir()}
    assert names == {"results.json", "report.html", "timescales.png", "horizons.png", "local-gradients.png",
                     "lyapunov.png"}  # fmt: skip
    report = (out / "report.html").read_text()
    assert "11 sequences of up to 20 steps" in report and report.count("<img") == 4


def test_cli_keeps_one_batch_when_the_input_fits(
    files: tuple[Path, Path, torch.nn.GRU, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, path, _, _ = files
    out = tmp_path / "single"
    assert main(["analyze", str(checkpoint), "--input", str(path), "--out", str(out), "--workers", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "11 sequences fit in one batch (--batch-size 64): analysed here, without Dask" in printed
    saved = json.loads((out / "results.json").read_text())
    assert "dataset" not in saved and "credit" in saved and saved["stages"][-1] == "blocking"


def test_cli_explain_over_batches_and_its_errors(
    files: tuple[Path, Path, torch.nn.GRU, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, path, _, _ = files
    assert main(["explain", str(checkpoint), "--input", str(path), "--batch-size", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dataset"]["batches"] == 3 and printed["dataset"]["sequences"] == 11
    assert [f["topic"] for f in printed["findings"]] == ["regimes", "timescales", "horizon", "local gradients",
                                                         "lyapunov"]  # fmt: skip
    status = main(["analyze", str(checkpoint), "--input", str(path), "--batch-size", "5", "--only", "credit"])
    assert status == 2 and "credit cannot be pooled over batches" in capsys.readouterr().err
    assert main(["explain", str(checkpoint), "--input", str(path), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(checkpoint), "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_on_local_dask_workers_gives_the_serial_results(
    files: tuple[Path, Path, torch.nn.GRU, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, path, _, _ = files
    arguments = ["analyze", str(checkpoint), "--input", str(path), "--dtype", "float64", "--batch-size", "3"]
    assert main([*arguments, "--out", str(tmp_path / "serial")]) == 0
    assert main([*arguments, "--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    assert "on a local Dask cluster of 2 workers" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    serial, dask = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("serial", "dask"))
    _close(_without_timing(dask), _without_timing(serial))
