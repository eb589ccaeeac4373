"""gatelens jacobians and credit at scale: arrays streamed to the .npz a chunk of steps at a time equal the arrays
formed in memory; diagonal paths are stored as vectors; --steps, --sequences, --layer, --no-paths and --skip select
slices of the full arrays; a selection that would not fit the memory budget or the disk is refused before tracing,
naming options that do fit; and the peak memory stays near one chunk."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import gatelens as gl
from gatelens.analysis.pipeline import recurrence_parts
from gatelens.cli import arrays, budget, main
from gatelens.cli.npz import Member, disk_bound, write_npz
from gatelens.model import Model

T, B, I, H = 11, 3, 3, 4


def saved(tmp_path: Path, module: nn.Module, steps: int = T, batch: int = B) -> tuple[Path, Path, torch.Tensor]:
    """The module's state_dict and a (steps, batch, I) input, saved; the input as a float64 tensor."""
    checkpoint, x_path = tmp_path / "model.pt", tmp_path / "x.npy"
    torch.save(module.state_dict(), checkpoint)
    x = np.random.default_rng(1).standard_normal((steps, batch, I))
    np.save(x_path, x)
    return checkpoint, x_path, torch.from_numpy(x)


def run(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(arguments)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def written(tmp_path: Path, capsys: pytest.CaptureFixture[str], *arguments: str) -> dict[str, np.ndarray]:
    out = tmp_path / "out.npz"
    status, _, stderr = run([*arguments, "--dtype", "float64", "--out", str(out)], capsys)
    assert status == 0, stderr
    with np.load(out) as loaded:
        return {name: loaded[name] for name in loaded.files}


def dense(values: np.ndarray) -> np.ndarray:
    """A diagonal path's vectors (…, S) as the matrices diag(d) (…, S, S)."""
    return values[..., None] * np.eye(values.shape[-1])


MODULES = {
    "gru": lambda: nn.GRU(I, H),
    "gru stack": lambda: nn.GRU(I, H, num_layers=2),
    "lstm stack": lambda: nn.LSTM(I, H, num_layers=2),
    "bidirectional gru": lambda: nn.GRU(I, H, num_layers=2, bidirectional=True),
    "elman": lambda: nn.RNN(I, H),
}


# ---------------------------------------------------------------------------------------------------------------
# streaming is lossless


def test_the_npz_writer_round_trips_any_chunking_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = {"a/b": rng.standard_normal((7, 3, 5)), "c": rng.standard_normal(4).astype(np.float32), "d": np.float64(2)}
    for compress, step in ((True, 1), (False, 3), (True, 7)):
        members = [
            Member(name, value.shape, value.dtype, lambda v=value: (v[i : i + step] for i in range(0, len(v), step)))
            if value.ndim
            else Member(name, (), value.dtype, lambda v=value: iter([np.asarray(v)]))
            for name, value in values.items()
        ]
        out = tmp_path / f"{compress}-{step}.npz"
        write_npz(out, members, compress=compress)
        with np.load(out) as loaded:
            assert loaded.files == list(values)
            for name, value in values.items():
                assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)
        assert out.stat().st_size <= disk_bound(members)
    assert [path.name for path in tmp_path.iterdir() if path.suffix != ".npz"] == []  # no temporary left behind


@pytest.mark.parametrize("kind", MODULES)
def test_streamed_jacobians_equal_the_traces_arrays(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One step per chunk (CHUNK_BYTES = 1) against trace.jacobians() and trace.jacobian_paths() over every step.

    Equal exactly wherever torch forms a step's values the same way in a batch of any size: every path, and J of the
    Elman and LSTM cells. The GRU's fast J contracts all steps × sequences in one einsum, whose rounding depends on
    how many there are; a chunk's J is rec.jacobians(steps=chunk) exactly, and the whole trace's to a few ulps."""
    torch.manual_seed(0)
    module = MODULES[kind]()
    checkpoint, x_path, x = saved(tmp_path, module)
    monkeypatch.setattr(budget, "CHUNK_BYTES", 1)
    flags = ["--nonlinearity", "tanh"] if kind == "elman" else []  # a state_dict does not record it
    streamed = written(tmp_path, capsys, "jacobians", str(checkpoint), "--input", str(x_path), *flags)
    trace = gl.load(module).to(torch.float64).trace(x)
    expected_names = set()
    for layer, direction in recurrence_parts(trace):
        rec = trace.recurrence(layer, direction)
        jacobian = streamed[f"{rec.name}/jacobian"]
        if kind in ("elman", "lstm stack"):
            assert np.array_equal(jacobian, rec.jacobians().numpy())
        per_step = torch.cat([rec.jacobians(steps=slice(i, i + 1)) for i in range(T)]).numpy()
        assert np.array_equal(jacobian, per_step)
        whole = rec.jacobians().numpy()
        np.testing.assert_allclose(jacobian, whole, rtol=0, atol=8 * np.finfo(np.float64).eps * np.abs(whole).max())
        expected_names.add(f"{rec.name}/jacobian")
        for path, term in rec.jacobian_paths().items():
            name = next(n for n in (f"{rec.name}/{path}", f"{rec.name}/{path}.diagonal") if n in streamed)
            stored = dense(streamed[name]) if name.endswith(".diagonal") else streamed[name]
            assert np.array_equal(stored, term.numpy()), name
            expected_names.add(name)
    assert set(streamed) == expected_names


def test_diagonal_paths_are_vectors_that_restore_the_dense_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GRU's carry path diag(z) is written as z; in a stack only the top layer's carry stays diagonal (the
    lower one reaches the layers above through their input); an LSTM's carry reaches h through c, so it is dense."""
    torch.manual_seed(0)
    gru = nn.GRU(I, H, num_layers=2)
    checkpoint, x_path, x = saved(tmp_path, gru)
    stack = written(tmp_path, capsys, "jacobians", str(checkpoint), "--input", str(x_path))
    paths = gl.load(gru).to(torch.float64).trace(x).jacobian_paths()
    assert stack["stack/l1.carry.diagonal"].shape == (T, B, 2 * H) and "stack/l0.carry" in stack
    assert np.array_equal(dense(stack["stack/l1.carry.diagonal"]), paths["l1.carry"].numpy())
    assert [name for name in stack if name.endswith(".diagonal")] == ["stack/l1.carry.diagonal"]
    layer = written(tmp_path, capsys, "jacobians", str(checkpoint), "--input", str(x_path), "--layer", "0")
    z = gl.load(gru).to(torch.float64).trace(x).recurrence(0).cache.z  # the update gate at every step, (T, B, H)
    assert np.array_equal(layer["l0/carry.diagonal"], z.numpy())

    lstm = nn.LSTM(I, H)
    checkpoint, x_path, _ = saved(tmp_path, lstm)
    assert not [name for name in written(tmp_path, capsys, "jacobians", str(checkpoint), "--input", str(x_path))
                if name.endswith(".diagonal")]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# selections are slices of the full arrays


def test_steps_sequences_layer_and_no_paths_select_slices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    gru = nn.GRU(I, H, num_layers=2)
    checkpoint, x_path, x = saved(tmp_path, gru, batch=5)
    model = gl.load(gru).to(torch.float64)
    base = ["jacobians", str(checkpoint), "--input", str(x_path)]

    chosen = written(tmp_path, capsys, *base, "--steps", "3:7", "--sequences", "4,0:2", "--layer", "1")
    trace = model.trace(x[:, [4, 0, 1]])  # the model is traced on the chosen sequences alone
    assert chosen["l1/jacobian"].shape == (4, 3, H, H)
    assert np.array_equal(chosen["l1/jacobian"], trace.jacobians(layer=1, steps=slice(3, 7)).numpy())
    for path, term in trace.jacobian_paths(layer=1, steps=slice(3, 7)).items():
        stored = chosen.get(f"l1/{path}")
        stored = dense(chosen[f"l1/{path}.diagonal"]) if stored is None else stored
        assert np.array_equal(stored, term.numpy())
    full = model.trace(x).jacobians(layer=1, steps=slice(3, 7))[:, [4, 0, 1]].numpy()
    np.testing.assert_allclose(chosen["l1/jacobian"], full, rtol=1e-12, atol=1e-14)  # same J, other batch rounding

    only = written(tmp_path, capsys, *base, "--steps=-2:", "--no-paths")  # = as argparse needs
    assert list(only) == ["stack/jacobian"]
    assert np.array_equal(only["stack/jacobian"], model.trace(x).jacobians(steps=slice(T - 2, T)).numpy())
    first = written(tmp_path, capsys, *base, "--steps", "4", "--no-paths")  # N alone: the first N steps
    assert np.array_equal(first["stack/jacobian"], model.trace(x).jacobians(steps=slice(0, 4)).numpy())

    bidirectional = nn.GRU(I, H, bidirectional=True)
    checkpoint, x_path, x = saved(tmp_path, bidirectional)
    both = written(tmp_path, capsys, "jacobians", str(checkpoint), "--input", str(x_path), "--steps", "2:5")
    trace = gl.load(bidirectional).to(torch.float64).trace(x)
    assert np.array_equal(both["l0_reverse/jacobian"], trace.jacobians(0, "reverse", steps=slice(2, 5)).numpy())
    assert np.array_equal(both["l0/jacobian"], trace.jacobians(0, "forward", steps=slice(2, 5)).numpy())


def test_credit_selections_are_slices_of_the_credit_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed one source step at a time, by_source equals CreditMap.by_source exactly; --steps slices by_source,
    path_shares and both axes of norms; total and by_lag stay whole; --layer keeps one layer's blocks and paths."""
    torch.manual_seed(0)
    gru = nn.GRU(I, H, num_layers=2)
    checkpoint, x_path, x = saved(tmp_path, gru)
    monkeypatch.setattr(budget, "CHUNK_BYTES", 1)
    base = ["credit", str(checkpoint), "--input", str(x_path), "--loss", "all"]
    whole = written(tmp_path, capsys, *base)
    credit_map = gl.probe_credits(gl.load(gru).to(torch.float64).trace(x))["many-to-many"]
    for field in arrays.CREDIT_FIELDS:
        for name, value in getattr(credit_map, field).items():
            assert np.array_equal(whole[f"{field}/{name}"], value.numpy()), f"{field}/{name}"
    assert len(whole) == 4 * len(credit_map.total) + len(credit_map.path_shares)

    part = written(tmp_path, capsys, *base, "--steps", "2:6", "--layer", "1", "--skip", "by_lag", "total")
    assert {name.split("/")[0] for name in part} == {"by_source", "norms", "path_shares"}
    assert {name.split("/")[1].split(".")[0] for name in part} == {"l1"}
    for name, value in part.items():
        field, key = name.split("/", 1)
        full = getattr(credit_map, field)[key]
        assert np.array_equal(value, (full[2:6, 2:6] if field == "norms" else full[2:6]).numpy()), name


# ---------------------------------------------------------------------------------------------------------------
# refusals: at once, with the sizes and options that fit


def suggestions(message: str) -> list[list[str]]:
    """The option sets a refusal says fit, as argument lists; none repeats another with more options."""
    found = re.search(r"These fit: (.*?)(?:; or |$)", message)
    assert found, message
    offered = [option.split() for option in found[1].split("; ")]
    for one in offered:
        assert not [other for other in offered if other != one and set(one) <= set(other)], offered
    return offered


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of steps of every trace the commands make, in order."""
    steps: list[int] = []
    original = Model.trace

    def counted(self: Model, x: torch.Tensor, *args: object, **kwargs: object) -> gl.Trace:
        steps.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(Model, "trace", counted)
    return steps


def test_a_selection_over_the_memory_budget_is_refused_before_tracing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, traced: list[int]
) -> None:
    torch.manual_seed(0)
    checkpoint, x_path, _ = saved(tmp_path, nn.GRU(I, 64, num_layers=2), steps=40, batch=8)
    monkeypatch.setattr(budget, "baseline", lambda: 100 << 20)  # the process's peak so far, fixed: it grows with
    allowed = (100 << 20) + (8 << 20)  # each run here. 8 MiB more: one step of the stack's J and paths takes
    # 2 (allocator) · 10 · 8 · 128² · 4 B = 10.5 MB, of layer 0's alone 2 · 6 · 8 · 64² · 4 B = 1.6 MB
    arguments = ["jacobians", str(checkpoint), "--input", str(x_path), "--max-memory", str(allowed), "--no-compress"]
    status, stdout, stderr = run([*arguments, "--out", str(tmp_path / "J.npz")], capsys)
    assert status == 2 and stderr.count("\n") == 1 and stderr.startswith("gatelens: error: gatelens jacobians refused")
    assert traced == [1], "only the one-step probe may run before the refusal"
    assert re.search(r"it needs [\d.]+ [MG]iB of memory \(.*\), more than --max-memory", stderr)
    assert not (tmp_path / "J.npz").exists()
    offered = suggestions(stderr)
    assert ["--layer", "0"] in offered or ["--no-paths"] in offered
    for options in offered:  # every option offered is a real one, and fits
        status, _, stderr = run([*arguments, *options, "--out", str(tmp_path / "fits.npz")], capsys)
        assert status == 0, (options, stderr)


@pytest.mark.parametrize(
    ("command", "free"),
    [(["jacobians"], 3 << 20), (["credit", "--loss", "all"], 200 << 10)],
    ids=["jacobians", "credit"],
)
def test_an_archive_larger_than_the_free_disk_is_refused_with_options_that_fit(
    command: list[str],
    free: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    traced: list[int],
) -> None:
    torch.manual_seed(0)
    checkpoint, x_path, _ = saved(tmp_path, nn.GRU(I, 16, num_layers=2), steps=30, batch=6)
    monkeypatch.setattr(arrays.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    arguments = [*command, str(checkpoint), "--input", str(x_path), "--no-compress", "--out", str(tmp_path / "A.npz")]
    status, _, stderr = run(arguments, capsys)
    assert status == 2 and "refused before tracing" in stderr and f"{budget.gib(free)} free" in stderr, stderr
    assert traced == [1], "only the one-step probe may run before the refusal"
    size, unit = re.search(r"arrays take ([\d.]+) (KiB|MiB)", stderr).groups()
    assert float(size) * {"KiB": 1 << 10, "MiB": 1 << 20}[unit] > free
    offered = suggestions(stderr)
    assert any(option[0] == "--steps" for option in offered) and len(offered) >= 2
    for options in offered:
        status, _, stderr = run([*arguments, *options], capsys)
        assert status == 0, (options, stderr)
        assert (tmp_path / "A.npz").stat().st_size <= free


def test_bad_selections_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, x_path, _ = saved(tmp_path, nn.GRU(I, H))
    base = ["jacobians", str(checkpoint), "--input", str(x_path), "--out", str(tmp_path / "J.npz")]
    for options, message in (
        (["--steps", "5:5"], "--steps 5:5 selects none of the 11 steps"),
        (["--sequences", "3"], "--sequences 3 is out of range: the input has 3 sequences, 0..2"),
        (["--sequences", "0,0:2"], "--sequences names sequence(s) [0] more than once"),
        (["--layer", "1"], "--layer 1: the model has 1 layer(s), 0..0"),
    ):
        status, _, stderr = run([*base, *options], capsys)
        assert status == 2 and stderr == f"gatelens: error: {message}\n", stderr
    status, _, stderr = run(["credit", *base[1:], "--skip", *arrays.CREDIT_FIELDS], capsys)
    assert status == 2 and "nothing to write" in stderr
    for options in (["--steps", "a:b"], ["--max-memory", "lots"], ["--sequences", "1;2"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *options])
        assert exit_info.value.code == 2 and "expected" in capsys.readouterr().err


def test_option_values_parse_as_documented() -> None:
    assert budget.byte_size("4G") == 4 << 30 and budget.byte_size("1.5GiB") == 3 << 29
    assert budget.byte_size("512m") == 512 << 20 and budget.byte_size("1000") == 1000
    assert arrays.step_range("100:200") == (100, 200) and arrays.step_range(":50") == (None, 50)
    assert arrays.step_range("-100:") == (-100, None) and arrays.step_range("7") == (None, 7)
    assert arrays.sequence_list("0,3,8:12") == [0, 3, (8, 12)]
    assert arrays.sequence_text((0, 1, 2, 5, 7, 8), from_zero=False) == "0:3,5,7:9"


# ---------------------------------------------------------------------------------------------------------------
# memory: one chunk, not the arrays


def test_jacobians_stay_near_one_chunk_of_memory(tmp_path: Path) -> None:
    """A GRU of 128 units over 150 steps of 8 sequences: J and its three dense paths take 315 MB, which the command
    once held at once; streamed, its peak stays within 140 MiB of what the process held before it ran (about 50 MiB
    when measured)."""
    torch.manual_seed(0)
    checkpoint, x_path = tmp_path / "model.pt", tmp_path / "x.npy"
    torch.save(nn.GRU(8, 128).state_dict(), checkpoint)
    np.save(x_path, np.random.default_rng(0).standard_normal((150, 8, 8)).astype(np.float32))
    arrays_bytes = 4 * 150 * 8 * 128 * 128 * 4
    bound = 140 << 20
    assert arrays_bytes > 2 * bound
    script = textwrap.dedent(f"""
        import json, resource
        from gatelens.cli import main
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        status = main(["jacobians", {str(checkpoint)!r}, "--input", {str(x_path)!r}, "--no-compress",
                       "--out", {str(tmp_path / "J.npz")!r}])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"status": status, "before": before, "peak": peak}}))
    """)
    if sys.platform != "linux":
        pytest.skip("ru_maxrss is in KiB on Linux only")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0, result.stderr
    assert report["peak"] - report["before"] < bound, report
    with np.load(tmp_path / "J.npz") as loaded:
        assert loaded["l0/jacobian"].shape == (150, 8, 128, 128) and loaded["l0/carry.diagonal"].shape == (150, 8, 128)
