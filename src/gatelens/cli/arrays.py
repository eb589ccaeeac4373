"""``gatelens jacobians | credit CHECKPOINT [--input X]``: the arrays behind the analyses, streamed to a .npz.

jacobians  J[i] = ∂h_{i+1}/∂h_i and its named paths per recurrence, (T, B, S, S); a diagonal path as (T, B, S)
credit     the credit map of a probe loss: total, by_source, by_lag, norms, path_shares per weight block or path

Both size everything before tracing (from the model, the input's shape and a one-step trace) and refuse at once,
naming the options that fit, when the peak memory would exceed --max-memory or the archive would not fit on the disk
(:mod:`gatelens.cli.budget`). Then they trace once and write each array a chunk of steps at a time
(:mod:`gatelens.cli.npz`), so memory holds the trace and one chunk, never an array of every step. --steps, --layer,
--no-paths and --skip only choose what is written: each array equals the unselected command's, sliced (a chunk's J
is ``rec.jacobians(steps=chunk)``; where torch's batched products round by batch size, as in the GRU's fast J, that
is the whole trace's J to the last bit). --sequences traces the chosen sequences alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from gatelens.analysis import probe_credits
from gatelens.analysis.credit import CHUNK_ELEMENTS, FACTOR_TEMPORARIES
from gatelens.analysis.pipeline import PROBES, recurrence_parts
from gatelens.cells.base import Cell, cache_tensors
from gatelens.cli import budget
from gatelens.cli.analyze import LOSS_HELP
from gatelens.cli.budget import Limits, Need, byte_size, check_fits, chunk_steps, gib
from gatelens.cli.common import add_model_options, load_input, print_json
from gatelens.cli.npz import Member, write_npz
from gatelens.experiments.folders import writable_folder
from gatelens.model import LayoutWarning, Model
from gatelens.trace import Recurrence, Trace

RANDOM_STEPS = 50  # without --input and without an end in --steps: random sequences of this many steps
CREDIT_FIELDS = ("total", "by_source", "by_lag", "norms", "path_shares")
PROBE_SAMPLES = 2  # random states on which a path's structure (diagonal or not) is read


def register(commands: Any) -> None:
    jacobians = commands.add_parser(
        "jacobians",
        conflict_handler="resolve",  # --steps A:B replaces the model options' --steps N (see add_selection_options)
        help="write ∂h_t/∂h_{t-1} and its paths for every step and sequence to a .npz",
        description="Write the per-step Jacobians J[i] = ∂h_{i+1}/∂h_i, (T, B, S, S), and their named paths (which "
        "sum to J) for each recurrence: the whole stack of a unidirectional model, or each layer and direction. A "
        "path that is diagonal for the cell (a GRU's carry path diag(z), say) is written as its diagonal, "
        "NAME/PATH.diagonal, (T, B, S); d[..., None] * np.eye(S) restores the matrix. The arrays are streamed to "
        "the .npz a chunk of steps at a time; the command refuses at once, naming the options that fit, when they "
        "would need more than --max-memory or more disk than is free.",
        epilog="example: gatelens jacobians model.pt --input x.npy --steps 0:100 --layer 1 --out J.npz",
    )
    add_model_options(jacobians)
    selection = add_selection_options(jacobians, "J[A:B] and its paths", "")
    selection.add_argument(
        "--layer",
        type=int,
        metavar="N",
        help="layer N's own recurrence (S = its state size; both directions of a bidirectional layer) instead of the "
        "whole stack of a unidirectional model, or of every layer of a bidirectional one",
    )
    selection.add_argument("--no-paths", action="store_true", help="write the Jacobians only, not their paths")
    add_output_options(jacobians, "jacobians.npz")
    jacobians.set_defaults(handler=run_jacobians)

    credit = commands.add_parser(
        "credit",
        conflict_handler="resolve",
        help="write the credit map of a probe loss (by source step, by lag, loss step × source step) to a .npz",
        description="Write the credit map of the probe loss: for every weight block, the total gradient (total), "
        "its parts by source step (by_source, (T, *shape)), the norms by lag (by_lag, (T,)), and the loss step × "
        "source step norms (norms, (T, T)); per path, its share of the gradient at each step (path_shares, (T,)). "
        "The arrays are streamed to the .npz; the command refuses at once, naming the options that fit, when they "
        "would need more than --max-memory or more disk than is free.",
        epilog="example: gatelens credit model.pt --input x.npy --loss all --skip norms --out C.npz",
    )
    add_model_options(credit)
    credit.add_argument("--loss", choices=tuple(PROBES), default="last", help=LOSS_HELP)
    selection = add_selection_options(
        credit,
        "rows A..B−1 of by_source and path_shares, rows and columns of norms (total and by_lag, sums over every step, "
        "stay whole)",
        ", and the probe loss is theirs",
    )
    selection.add_argument(
        "--layer", type=int, metavar="N", help="write the blocks and paths of layer N only (the map is of the model)"
    )
    selection.add_argument(
        "--skip",
        nargs="+",
        choices=CREDIT_FIELDS,
        default=[],
        metavar="FIELD",
        help="leave these arrays out: by_source (T × the weights), by_lag (a loss at many steps sums the "
        "contributions of each lag: T × the weights in memory), norms (T × T per block), path_shares, total",
    )
    add_output_options(credit, "credit.npz")
    credit.set_defaults(handler=run_credit)


def add_selection_options(command: argparse.ArgumentParser, steps: str, sequences: str) -> argparse._ArgumentGroup:
    """--steps A:B and --sequences, each with what it means for the command; the command's parser resolves the clash
    of --steps A:B with the model options' --steps N (random sequences of N steps, which --steps :N still gives)."""
    selection = command.add_argument_group("what to write")
    selection.add_argument(
        "--steps",
        dest="step_range",
        type=step_range,
        default=(None, None),
        metavar="A:B",
        help=f"steps A..B−1 only, 0-based and half-open as a Python slice (100:200, :50, --steps=-100:); N alone is "
        f":N: {steps}. In a reverse direction, steps count in its own processing order. Without --input, the random "
        f"sequences are B steps long ({RANDOM_STEPS} when B is left out or negative). Default: every step",
    )
    selection.add_argument(
        "--sequences",
        type=sequence_list,
        metavar="I,J,A:B",
        help="these sequences of the input only (0-based; single indices and Python-style ranges, separated by "
        f"commas: 0,3,8:12): the model is traced on them alone{sequences}. Default: every sequence",
    )
    return selection


def add_output_options(command: argparse.ArgumentParser, default: str) -> None:
    output = command.add_argument_group("output")
    output.add_argument("--out", default=default, help=f"the .npz to write (default: {default})")
    output.add_argument(
        "--max-memory",
        type=byte_size,
        default=budget.DEFAULT_MEMORY,
        metavar="SIZE",
        help="refuse at once, naming the options that fit, if the command would need more memory than this (4G; "
        "K, M, G, T are powers of 1024). Streaming keeps it near the trace plus one chunk of steps",
    )
    output.add_argument(
        "--no-compress",
        action="store_true",
        help="store the arrays uncompressed: larger, but written at the disk's speed (deflate, the default, runs at "
        "some 10–40 MB/s on float data and saves 30–70 %%)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Option values


def step_range(text: str) -> tuple[int | None, int | None]:
    """``A:B``, ``A:``, ``:B`` or ``N`` (= ``:N``) ↦ (A, B), either end None."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return None, int(parts[0])
        if len(parts) == 2:
            return tuple(int(part) if part.strip() else None for part in parts)  # type: ignore[return-value]
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a range of steps A:B (e.g. 0:100, :50, -100:), got {text!r}")


def sequence_list(text: str) -> list[int | tuple[int | None, int | None]]:
    """``0,3,8:12`` ↦ [0, 3, (8, 12)]: indices and ranges, resolved against B later."""
    items: list[int | tuple[int | None, int | None]] = []
    for part in text.split(","):
        try:
            items.append(step_range(part) if ":" in part else int(part))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected sequence indices and ranges separated by commas (e.g. 0,3,8:12), got {text!r}"
            ) from None
    return items


# ---------------------------------------------------------------------------------------------------------------
# What is written: a selection of steps, sequences, layer and arrays, and what it needs


@dataclass(frozen=True)
class Selection:
    """Steps start..stop−1 (array indices), the input's sequences, a layer (None: all), and the arrays kept."""

    start: int
    stop: int
    sequences: tuple[int, ...]
    every_sequence: bool  # no --sequences: suggestions say 0:k
    layer: int | None
    paths: bool = True  # jacobians: the paths too
    skip: frozenset[str] = frozenset()  # credit: fields left out
    chunk: int = 1  # steps formed at once (chosen from the memory left once the selection fits)

    @property
    def steps(self) -> int:
        return self.stop - self.start

    def flags(self, base: Selection) -> list[str]:
        """The options that turn ``base`` into this selection."""
        flags = []
        if (self.start, self.stop) != (base.start, base.stop):
            flags.append(f"--steps {self.start}:{self.stop}")
        if self.sequences != base.sequences:
            flags.append(f"--sequences {sequence_text(self.sequences, self.every_sequence)}")
        if self.layer != base.layer:
            flags.append(f"--layer {self.layer}")
        if self.paths != base.paths:
            flags.append("--no-paths")
        if self.skip != base.skip:
            flags.append("--skip " + " ".join(name for name in CREDIT_FIELDS if name in self.skip))
        return flags


def sequence_text(sequences: tuple[int, ...], from_zero: bool) -> str:
    """Indices as --sequences writes them: runs of consecutive indices as A:B."""
    if from_zero and sequences == tuple(range(len(sequences))):
        return f"0:{len(sequences)}"
    runs: list[str] = []
    start = previous = None
    for index in (*sequences, None):
        if previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            runs.append(str(start) if previous == start else f"{start}:{previous + 1}")  # type: ignore[operator]
        start = previous = index
    return ",".join(runs)


def windows(start: int, stop: int, size: int) -> list[slice]:
    return [slice(first, min(first + size, stop)) for first in range(start, stop, size)]


# ---------------------------------------------------------------------------------------------------------------
# Reading the model and its input, sizing from a one-step trace


@dataclass(frozen=True)
class Prepared:
    """The model, its input (the chosen sequences, untraced), the selection and what sizing needs."""

    model: Model
    x: torch.Tensor
    note: str
    selection: Selection
    steps: int  # T of the input
    probe: Trace  # the model traced on the input's first step
    trace_bytes: int  # bytes a trace holds per step and sequence
    limits: Limits
    baseline: int  # the process's peak memory before tracing
    _parts: dict[int | None, list[Part]] = field(default_factory=dict)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.model.dtype).element_size()

    @property
    def time_axis(self) -> int:
        return 1 if self.model.batch_first else 0

    def parts(self, layer: int | None) -> list[Part]:
        """The recurrences ``jacobians`` writes for --layer ``layer`` (read from the probe once)."""
        if layer not in self._parts:
            self._parts[layer] = jacobian_parts(self.probe, layer, self.limits.memory - self.baseline)
        return self._parts[layer]

    def trace(self, steps: int | None = None) -> Trace:
        """The model traced on the chosen sequences, on the first ``steps`` steps (all if None)."""
        if steps is None or steps == self.steps:
            return self.model.trace(self.x.to(self.model.device))
        with warnings.catch_warnings():
            if self.steps >= self.x.shape[1 - self.time_axis]:  # T ≥ B: a prefix of fewer steps than sequences
                warnings.simplefilter("ignore", LayoutWarning)  # is no sign of a swapped layout
            return self.model.trace(self.x.narrow(self.time_axis, 0, steps).to(self.model.device))


def prepare(arguments: argparse.Namespace, out: Path) -> Prepared:
    """Read the model and its input (random sequences as long as --steps asks), choose the sequences, resolve the
    selection and trace the first step, for sizing."""
    first, last = arguments.step_range
    random_steps = last if arguments.input is None and last is not None and last > 0 else RANDOM_STEPS
    given = load_input(argparse.Namespace(**{**vars(arguments), "steps": random_steps}))
    model, x = given.model, given.x
    time_axis = 1 if model.batch_first else 0
    steps, batch = x.shape[time_axis], x.shape[1 - time_axis]
    start, stop, _ = slice(first, last).indices(steps)
    if stop <= start:
        raise ValueError(f"--steps {_range_text(first, last)} selects none of the {steps} steps")
    sequences = _sequences(arguments.sequences, batch)
    if arguments.layer is not None and not 0 <= arguments.layer < model.num_layers:
        raise ValueError(
            f"--layer {arguments.layer}: the model has {model.num_layers} layer(s), 0..{model.num_layers - 1}"
        )
    if len(sequences) < batch:
        x = x.index_select(1 - time_axis, torch.tensor(sequences))
    selection = Selection(
        start, stop, tuple(sequences), arguments.sequences is None, arguments.layer,
        paths=not getattr(arguments, "no_paths", False), skip=frozenset(getattr(arguments, "skip", ())),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)  # one step of B sequences looks swapped; the full trace warns
        probe = model.trace(x.narrow(time_axis, 0, 1).to(model.device))
    limits = Limits(arguments.max_memory, shutil.disk_usage(out.parent).free, out.parent.resolve())
    note = given.note + _selection_note(selection, steps, batch)
    per_step = _trace_bytes(probe) // len(sequences)
    return Prepared(model, x, note, selection, steps, probe, per_step, limits, budget.baseline())


def _sequences(items: list[int | tuple[int | None, int | None]] | None, batch: int) -> list[int]:
    if items is None:
        return list(range(batch))
    chosen: list[int] = []
    for item in items:
        if isinstance(item, tuple):
            chosen += range(*slice(*item).indices(batch))
        elif -batch <= item < batch:
            chosen.append(item % batch)
        else:
            raise ValueError(f"--sequences {item} is out of range: the input has {batch} sequences, 0..{batch - 1}")
    if not chosen:
        raise ValueError(f"--sequences selects none of the {batch} sequences")
    twice = sorted(index for index, count in Counter(chosen).items() if count > 1)
    if twice:
        raise ValueError(f"--sequences names sequence(s) {twice} more than once")
    return chosen


def _range_text(first: int | None, last: int | None) -> str:
    return f"{'' if first is None else first}:{'' if last is None else last}"


def _selection_note(selection: Selection, steps: int, batch: int) -> str:
    parts = []
    if selection.steps < steps:
        parts.append(f"steps {selection.start}:{selection.stop} of {steps}")
    if len(selection.sequences) < batch:
        parts.append(f"sequences {sequence_text(selection.sequences, selection.every_sequence)} of {batch}")
    return f"; writing {', '.join(parts)}" if parts else ""


def _trace_bytes(probe: Trace) -> int:
    """Bytes of a one-step trace: every recurrence's gates, state and time order, the input and the output; a
    stack's states once more (trace.recurrence() concatenates them)."""
    total = probe.inputs.nbytes + probe.output.nbytes
    for rec in probe.recurrences.values():
        total += sum(tensor.nbytes for tensor in cache_tensors(rec.cache)) + rec.states[1:].nbytes
        total += rec.input_index.nbytes + (0 if rec.mask is None else rec.mask.nbytes)
    if not probe.model.bidirectional and probe.model.num_layers > 1:
        total += sum(rec.states[1:].nbytes for rec in probe.recurrences.values())
    return total


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


def as_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def npz_path(out: str) -> Path:
    path = Path(out)
    if path.suffix != ".npz":
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; name the .npz file to write, e.g. {path / 'arrays.npz'}")
    writable_folder(path.parent if str(path.parent) else ".")
    return path


# ---------------------------------------------------------------------------------------------------------------
# jacobians


@dataclass(frozen=True)
class Part:
    """One recurrence to write: where it is (layer, direction as trace.recurrence takes them), its name, state size,
    paths, and which of them are diagonal for its cell."""

    layer: int | None
    direction: str | None
    name: str
    state_size: int
    paths: tuple[str, ...]
    diagonal: frozenset[str]

    def member_name(self, path: str) -> str:
        return f"{self.name}/{path}.diagonal" if path in self.diagonal else f"{self.name}/{path}"


def diagonal_paths(cell: Cell, seed: int = 0) -> frozenset[str]:
    """The paths of ``cell`` whose every off-diagonal entry is 0, on random inputs and states: diagonal by the
    cell's structure (a GRU's carry path diag(z); not an LSTM's, whose carry reaches h through c)."""
    generator = torch.Generator().manual_seed(seed)
    x, state = (
        torch.randn((PROBE_SAMPLES, size), generator=generator, dtype=torch.float64).to(cell.device, cell.dtype)
        for size in (cell.input_size, cell.state_size)
    )
    _, cache = cell.step(x, 0.5 * state)
    diagonal = set()
    for name, path in cell.jacobian_paths(cache).items():
        off = path.clone()
        off.diagonal(dim1=-2, dim2=-1).zero_()
        if not bool(off.any()):
            diagonal.add(name)
    return frozenset(diagonal)


def jacobian_parts(probe: Trace, layer: int | None, room: int) -> list[Part]:
    """The recurrences written: those of recurrence_parts, or layer ``layer``'s (each direction if bidirectional).

    Which paths are diagonal is read from PROBE_SAMPLES states, unless their paths would take more than ``room``
    bytes: then the paths count as dense, and the selection is refused anyway, since one step of one sequence needs
    more (jacobian_need)."""
    if layer is None:
        places = recurrence_parts(probe)
    else:
        places = [(layer, d) for d in (("forward", "reverse") if probe.model.bidirectional else (None,))]
    parts = []
    for place in places:
        rec = probe.recurrence(*place)
        paths = rec.cell.path_names + (("padding",) if rec.mask is not None else ())
        probing = PROBE_SAMPLES * (len(paths) + 1) * rec.cell.state_size**2 * rec.states.element_size()
        diagonal = diagonal_paths(rec.cell) if probing <= room else frozenset()
        diagonal |= {"padding"}  # the identity on the steps past a sequence's end
        parts.append(Part(*place, rec.name, rec.cell.state_size, paths, diagonal & frozenset(paths)))
    return parts


def jacobian_members(prepared: Prepared, selection: Selection, trace: Trace | None = None) -> list[Member]:
    """The arrays of ``jacobians``: per recurrence, NAME/jacobian and each path (NAME/PATH, or NAME/PATH.diagonal),
    read ``selection.chunk`` steps at a time from ``trace`` (without a trace: for sizing only)."""
    n, batch, dtype = selection.steps, len(selection.sequences), numpy_dtype(prepared.model.dtype)
    members = []
    for part in prepared.parts(selection.layer):
        size = part.state_size
        rec = None if trace is None else trace.recurrence(part.layer, part.direction)  # once: a stack concatenates
        members.append(Member(f"{part.name}/jacobian", (n, batch, size, size), dtype, _chunks(rec, None, selection)))
        for path in part.paths if selection.paths else ():
            shape = (n, batch, size) if path in part.diagonal else (n, batch, size, size)
            chunks = _chunks(rec, (path, path in part.diagonal), selection)
            members.append(Member(part.member_name(path), shape, dtype, chunks))
    return members


def jacobian_need(prepared: Prepared, selection: Selection) -> Need:
    """The arrays and memory of ``jacobians`` for a selection. Forming one step of J for B sequences takes at most
    every path and their sum, (P + 1) · B · S² values; forming the paths, (P + 2) · B · S² (a stack's blocks and feeds
    included); counted twice, for the freed blocks of one chunk that the allocator keeps for the next."""
    batch, item = len(selection.sequences), prepared.itemsize
    per_step = max(
        budget.ALLOCATOR_SLACK * (len(part.paths) + 1 + selection.paths) * batch * part.state_size**2 * item
        for part in prepared.parts(selection.layer)
    )
    traced = selection.stop if _forward_only(prepared.model) else prepared.steps
    memory = {"before tracing": prepared.baseline, "the trace": traced * batch * prepared.trace_bytes}
    return Need(jacobian_members(prepared, selection), memory, per_step)


def _forward_only(model: Model) -> bool:
    """Whether every recurrence reads the input forward, so the steps before B determine J[:B] (a trace of x[:B])."""
    return not model.bidirectional and not model.reverse


def jacobian_variants(prepared: Prepared, selection: Selection) -> list[Selection]:
    """Single changes that shrink ``jacobians``: --no-paths, and each --layer N of a model with several layers."""
    variants = [dataclasses.replace(selection, paths=False)] if selection.paths else []
    if selection.layer is None and prepared.model.num_layers > 1:
        variants += [dataclasses.replace(selection, layer=n) for n in range(prepared.model.num_layers)]
        if selection.paths:
            variants += [dataclasses.replace(selection, layer=n, paths=False) for n in range(prepared.model.num_layers)]
    return variants


def run_jacobians(arguments: argparse.Namespace, console: Console) -> int:
    out = npz_path(arguments.out)
    prepared = prepare(arguments, out)
    selection, limits = prepared.selection, prepared.limits
    need = check_fits(
        "jacobians", lambda chosen: jacobian_need(prepared, chosen), selection, limits,
        jacobian_variants(prepared, selection),
    )  # fmt: skip
    console.print(prepared.note)
    with console.status("tracing"):
        trace = prepared.trace(selection.stop if _forward_only(prepared.model) else None)
    chunked = dataclasses.replace(selection, chunk=chunk_steps(need, limits))
    return _write(out, jacobian_members(prepared, chunked, trace), arguments, console)


def _chunks(
    rec: Recurrence | None, path: tuple[str, bool] | None, selection: Selection
) -> Callable[[], Iterator[np.ndarray]] | None:
    """J (``path`` None) or one path (its name, whether diagonal), ``selection.chunk`` steps at a time. A zip member
    is written whole before the next opens, so each path takes its own pass over the steps, forming every path of
    each chunk (the cells form them together): forming is far cheaper than compressing or writing them."""
    if rec is None:
        return None

    def chunks() -> Iterator[np.ndarray]:
        for window in windows(selection.start, selection.stop, selection.chunk):
            if path is None:
                yield as_numpy(rec.jacobians(steps=window))
                continue
            name, diagonal = path
            term = rec.jacobian_paths(steps=window)[name]
            if diagonal:
                values = term.diagonal(dim1=-2, dim2=-1)
                if int(torch.count_nonzero(term)) != int(torch.count_nonzero(values)):  # the probe missed a structure
                    raise RuntimeError(f"{rec.name}/{name} is not diagonal at steps {window.start}..{window.stop - 1}")
                term = values
            yield as_numpy(term)

    return chunks


# ---------------------------------------------------------------------------------------------------------------
# credit


def credit_need(prepared: Prepared, loss: str, selection: Selection) -> Need:
    """The arrays and memory of ``credit`` for a selection.

    Memory: the trace; the probe readouts, the gradients entering the states and their BPTT adjoints, O(T·B·S);
    then the largest of: by_lag for a loss at many steps, whose sweep sums every lag's contributions, T · |θ|, and
    takes each block's norms in float64, 2 T · |block|; norms, the pair norms of every loss step L × T per block,
    and the sweep's chains; one chunk of by_source."""
    model, item, steps = prepared.model, prepared.itemsize, prepared.steps
    n, batch = selection.steps, len(selection.sequences)
    dtype, skip = numpy_dtype(model.dtype), selection.skip
    blocks = {name: tuple(w.shape) for name, w in model.weights.items() if _in_layer(name, selection.layer)}
    paths = [name for name in _path_names(prepared.probe) if _in_layer(name, selection.layer)]
    shapes = {
        "total": {name: shape for name, shape in blocks.items()},
        "by_source": {name: (n, *shape) for name, shape in blocks.items()},
        "by_lag": {name: (steps,) for name in blocks},
        "norms": {name: (n, n) for name in blocks},
        "path_shares": {name: (n,) for name in paths},
    }
    members = [
        Member(f"{field}/{name}", shape, dtype)
        for field in CREDIT_FIELDS
        if field not in skip
        for name, shape in shapes[field].items()
    ]
    states = sum(rec.cell.state_size for rec in prepared.probe.recurrences.values())
    outputs = prepared.probe.output.shape[-1]
    many = loss == "all" or (model.bidirectional and model.num_layers > 1)  # loss steps reaching some recurrence
    chains = steps if many else 1
    sweep = 8 * chains * batch * states * item  # the chains, their factors and norms at one step
    parameters = sum(w.numel() for w in model.weights.values())
    largest_block = max(w.numel() for w in model.weights.values())
    work = {
        "by_lag": (steps * (parameters + 2 * largest_block) * item + sweep if many else 0) + 3 * CHUNK_ELEMENTS * item,
        "norms": chains * steps * len(model.weights) * item + sweep,
        "path_shares": CHUNK_ELEMENTS * item,
        "total": CHUNK_ELEMENTS * item,
    }
    largest = max([0] + [size for name, size in work.items() if name not in skip])
    source_step = FACTOR_TEMPORARIES * batch * states * item + max(math.prod(s) for s in blocks.values()) * item
    memory = {
        "before tracing": prepared.baseline,
        "the trace": steps * batch * prepared.trace_bytes,
        "gradients and adjoints": steps * batch * (2 * outputs + 3 * states) * item,
        "the largest field's sweep": largest,
    }
    return Need(members, memory, source_step if "by_source" not in skip else 0)


def _in_layer(name: str, layer: int | None) -> bool:
    """Whether a block or path name (l0.W_hz, l1_reverse.carry) belongs to layer ``layer`` (None: every layer)."""
    return layer is None or re.match(rf"l{layer}(_reverse)?\.", name) is not None


def _path_names(probe: Trace) -> list[str]:
    """Every path of path_shares, named as the credit map names them (l0.carry, l0_reverse.update, …)."""
    names = []
    for place in recurrence_parts(probe):
        rec = probe.recurrence(*place)
        paths = rec.cell.path_names + (("padding",) if rec.mask is not None else ())
        names += list(rec.qualify(dict.fromkeys(paths)))
    return names


def credit_variants(prepared: Prepared, selection: Selection) -> list[Selection]:
    """Single changes that shrink ``credit``: leaving out by_lag, norms, by_source (alone, then together), and
    each --layer N of a model with several layers."""
    skips = [{"by_lag"}, {"norms"}, {"by_source"}, {"by_lag", "norms"}, {"by_source", "by_lag", "norms"}]
    variants = [
        dataclasses.replace(selection, skip=selection.skip | frozenset(skip))
        for skip in skips
        if not skip <= selection.skip
    ]
    if selection.layer is None and prepared.model.num_layers > 1:
        variants += [dataclasses.replace(selection, layer=n) for n in range(prepared.model.num_layers)]
    return variants


def run_credit(arguments: argparse.Namespace, console: Console) -> int:
    out = npz_path(arguments.out)
    prepared = prepare(arguments, out)
    selection, limits = prepared.selection, prepared.limits
    if set(CREDIT_FIELDS) <= selection.skip:
        raise ValueError("--skip leaves out every array; nothing to write")
    need = check_fits(
        "credit", lambda chosen: credit_need(prepared, arguments.loss, chosen), selection, limits,
        credit_variants(prepared, selection),
    )  # fmt: skip
    console.print(prepared.note)
    with console.status("tracing"):
        trace = prepared.trace()
    credit_map = probe_credits(trace, seed=arguments.seed)[PROBES[arguments.loss]]
    owner = {name: rec for rec, _ in credit_map.streams for name in rec.qualify(dict(rec.cell.weights))}
    start, stop = selection.start, selection.stop
    size = chunk_steps(need, limits)

    def total(name: str) -> Iterator[np.ndarray]:
        yield as_numpy(credit_map.total[name])

    def by_source(name: str) -> Iterator[np.ndarray]:
        """Σ_b δ_bᵀ ⊗ u_b per source step, from the owner's parameter factors a chunk of steps at a time: exactly
        what CreditMap.by_source forms for all steps at once (param_vjp contracts the same factors)."""
        rec = owner[name]
        for window in windows(start, stop, size):
            factors = rec.param_factors(credit_map.adjoints[rec.name][window], steps=window)
            yield as_numpy(factors[name].contract())

    def by_lag(name: str) -> Iterator[np.ndarray]:
        yield as_numpy(credit_map.by_lag[name])

    def norms(name: str) -> Iterator[np.ndarray]:
        """Rows start..stop−1 and columns start..stop−1 of CreditMap.norms, from its nonzero rows (norm_rows)."""
        loss_steps, values = credit_map.norm_rows[name]
        rows = max(1, budget.CHUNK_BYTES // (4 * prepared.itemsize * selection.steps))
        for window in windows(start, stop, rows):
            block = values.new_zeros(window.stop - window.start, selection.steps)
            inside = (loss_steps >= window.start) & (loss_steps < window.stop)
            block[loss_steps[inside] - window.start] = values[inside][:, start:stop]
            yield as_numpy(block)

    def path_shares(name: str) -> Iterator[np.ndarray]:
        yield as_numpy(credit_map.path_shares[name][start:stop])

    fields = {"total": total, "by_source": by_source, "by_lag": by_lag, "norms": norms, "path_shares": path_shares}
    members = []
    for planned in need.members:
        field_name, name = planned.name.split("/", 1)
        members.append(dataclasses.replace(planned, chunks=lambda f=fields[field_name], n=name: f(n)))
    return _write(out, members, arguments, console)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write(out: Path, members: list[Member], arguments: argparse.Namespace, console: Console) -> int:
    with console.status("writing") as status:

        def progress(index: int, rows: int) -> None:
            member = members[index]
            status.update(f"writing {member.name} ({index + 1} of {len(members)}): {rows} of {member.shape[0]} rows")

        write_npz(out, members, compress=not arguments.no_compress, progress=progress)
    if arguments.json:
        print_json({"file": str(out), "arrays": {member.name: list(member.shape) for member in members}})
    else:
        names = [member.name for member in members]
        shown = ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else "")
        console.print(
            f"wrote {len(names)} arrays ({gib(out.stat().st_size)}) to {out}: {shown}; "
            f"numpy.load({str(out)!r}).files lists them all"
        )
    return 0
