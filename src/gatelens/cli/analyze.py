"""``gatelens analyze | explain | jacobians | credit CHECKPOINT [--input X]``: a user's model on a user's data.

analyze    every analysis; writes results.json, the figures and report.html into --out
explain    the findings only
jacobians  ∂h_t/∂h_{t-1} and its paths for every step and sequence, as a .npz
credit     the credit map of a probe loss, as a .npz
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gatelens.analysis import Analysis, Settings, analyze, probe_credits
from gatelens.analysis.lyapunov import DEFAULT_EXPONENTS
from gatelens.analysis.pipeline import MAX_LAG, PROBES, STAGES, recurrence_parts
from gatelens.cli.common import add_model_options, load_and_trace, print_json
from gatelens.experiments.folders import writable_folder
from gatelens.report.findings import findings_table
from gatelens.report.folder import write_report_folder

LOSS_HELP = (
    "the probe loss L = ⟨w, y⟩ on the outputs y with a fixed random readout w: on the final state h_n (last, "
    "many-to-one, the default; gl.credit's loss='last': each direction's output at the last step it processes, "
    "time T for a forward direction, time 1 for a reverse one) or at every step (all, many-to-many)"
)


def register(commands: Any) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="every analysis of a saved model on an input: results.json, figures, report.html",
        description="Trace the model on the input, run every analysis, and write results.json, one PNG per figure "
        "and a self-contained report.html into --out.",
        epilog="example: gatelens analyze model.pt --input x.npy --loss all --out analysis/",
    )
    add_model_options(analyze)
    analyze.add_argument("--loss", choices=tuple(PROBES), default="last", help=LOSS_HELP)
    add_stage_options(analyze)
    analyze.add_argument("--out", default="gatelens-analysis", help="results folder (default: gatelens-analysis)")
    analyze.set_defaults(handler=run_analyze)

    explain_command = commands.add_parser(
        "explain",
        help="the findings only, in plain language, each with its number",
        description="Trace the model on the input and print what gatelens finds: regimes, timescales, gradient "
        "horizon, blocking, local gradients, Lyapunov exponents.",
        epilog="example: gatelens explain model.pt --input x.npy --json",
    )
    add_model_options(explain_command)
    add_stage_options(explain_command)
    explain_command.set_defaults(handler=run_explain)

    jacobians = commands.add_parser(
        "jacobians",
        help="write ∂h_t/∂h_{t-1} and its paths for every step and sequence to a .npz",
        description="Write the per-step Jacobians J[i] = ∂h_{i+1}/∂h_i, (T, B, S, S), and their named paths (which "
        "sum to J) for each recurrence: the whole stack of a unidirectional model, or each layer and direction.",
        epilog="example: gatelens jacobians model.pt --input x.npy --dtype float64 --out J.npz",
    )
    add_model_options(jacobians)
    jacobians.add_argument("--out", default="jacobians.npz", help="the .npz to write (default: jacobians.npz)")
    jacobians.set_defaults(handler=run_jacobians)

    credit = commands.add_parser(
        "credit",
        help="write the credit map of a probe loss (by source step, by lag, loss step × source step) to a .npz",
        description="Write the credit map of the probe loss: for every weight block, the total gradient, its parts "
        "by source step, the norms by lag, and the loss step × source step norms.",
        epilog="example: gatelens credit model.pt --input x.npy --loss all --out C.npz",
    )
    add_model_options(credit)
    credit.add_argument("--loss", choices=tuple(PROBES), default="last", help=LOSS_HELP)
    credit.add_argument("--out", default="credit.npz", help="the .npz to write (default: credit.npz)")
    credit.set_defaults(handler=run_credit)


def add_stage_options(command: argparse.ArgumentParser) -> None:
    """Which analyses to run, and how far: --only, --skip, --max-lag, --exponents."""
    stages = command.add_argument_group("analyses")
    stages.add_argument(
        "--only", nargs="+", choices=STAGES, metavar="STAGE", help=f"run these stages only ({', '.join(STAGES)})"
    )
    stages.add_argument("--skip", nargs="+", choices=STAGES, default=[], metavar="STAGE", help="leave these out")
    stages.add_argument(
        "--max-lag",
        type=int,
        default=MAX_LAG,
        help=f"propagation: at most this many lags from the last step ({MAX_LAG}); it stops sooner once every "
        "sequence is below eps",
    )
    stages.add_argument(
        "--exponents",
        type=int,
        default=DEFAULT_EXPONENTS,
        help=f"Lyapunov exponents to follow, the largest ({DEFAULT_EXPONENTS})",
    )


def run_analyze(arguments: argparse.Namespace, console: Console) -> int:
    out = writable_folder(arguments.out)
    loaded = load_and_trace(arguments)
    console.print(loaded.note)
    analyses = analyze_with_progress(
        loaded.trace, "model", console, loss=arguments.loss, only=arguments.only, skip=arguments.skip,
        settings=_settings(arguments),
    )  # fmt: skip
    results = analyses.to_dict() | {"input": loaded.note}
    title = f"gatelens: {Path(arguments.checkpoint).name}"
    files = write_report_folder(out, [analyses], title=title, notes=[loaded.note], results=results)
    if arguments.json:
        print_json(results | {"files": [str(path) for path in files]})
    else:
        console.print(findings_table({"model": analyses.explanation}))
    console.print(f"results in {out}: " + ", ".join(path.name for path in files))
    return 0


def analyze_with_progress(trace: Any, name: str, console: Console, **options: Any) -> Analysis:
    """:func:`gatelens.analyze` with a progress bar per stage, each with its time remaining."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f} %"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bars: dict[str, TaskID] = {}

        def advance(stage: str, done: float, total: float) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(f"{name}: {stage}", total=total)
            progress.update(bars[stage], completed=done, total=total)

        return analyze(trace, name=name, progress=advance, **options)


def run_explain(arguments: argparse.Namespace, console: Console) -> int:
    loaded = load_and_trace(arguments)
    console.print(loaded.note)
    skip = sorted({"credit", *arguments.skip})
    analysis = analyze_with_progress(
        loaded.trace, "model", console, only=arguments.only, skip=skip, settings=_settings(arguments)
    )
    if arguments.json:
        print_json(analysis.explanation.to_dict() | {"input": loaded.note})
    else:
        console.print(findings_table({"model": analysis.explanation}))
    return 0


def _settings(arguments: argparse.Namespace) -> Settings:
    return Settings(max_lag=arguments.max_lag, k=arguments.exponents, seed=arguments.seed)


def run_jacobians(arguments: argparse.Namespace, console: Console) -> int:
    out = _npz_path(arguments.out)
    loaded = load_and_trace(arguments)
    console.print(loaded.note)
    arrays: dict[str, np.ndarray] = {}
    with console.status("forming Jacobians"):
        for layer, direction in recurrence_parts(loaded.trace):
            label = loaded.trace.recurrence(layer, direction).name
            arrays[f"{label}/jacobian"] = _numpy(loaded.trace.jacobians(layer=layer, direction=direction))
            for path, term in loaded.trace.jacobian_paths(layer=layer, direction=direction).items():
                arrays[f"{label}/{path}"] = _numpy(term)
    return _write_npz(out, arrays, arguments, console)


def run_credit(arguments: argparse.Namespace, console: Console) -> int:
    out = _npz_path(arguments.out)
    loaded = load_and_trace(arguments)
    console.print(loaded.note)
    arrays: dict[str, np.ndarray] = {}
    with console.status("computing the credit map"):
        credit_map = probe_credits(loaded.trace, seed=arguments.seed)[PROBES[arguments.loss]]
        for field in ("total", "by_source", "by_lag", "norms", "path_shares"):
            arrays |= {f"{field}/{name}": _numpy(value) for name, value in getattr(credit_map, field).items()}
    return _write_npz(out, arrays, arguments, console)


def _npz_path(out: str) -> Path:
    path = Path(out)
    if path.suffix != ".npz":
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; name the .npz file to write, e.g. {path / 'arrays.npz'}")
    writable_folder(path.parent if str(path.parent) else ".")
    return path


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def _write_npz(out: Path, arrays: dict[str, np.ndarray], arguments: argparse.Namespace, console: Console) -> int:
    np.savez_compressed(out, **arrays)
    if arguments.json:
        print_json({"file": str(out), "arrays": {name: list(array.shape) for name, array in arrays.items()}})
    else:
        names = list(arrays)
        shown = ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else "")
        console.print(f"wrote {len(names)} arrays to {out}: {shown}; numpy.load({str(out)!r}).files lists them all")
    return 0
