"""``gatelens analyze | explain CHECKPOINT [--input X]``: a user's model on a user's data.

analyze    every analysis; writes results.json, the figures and report.html into --out
explain    the findings only

(``jacobians`` and ``credit``, which write arrays to a .npz, live in :mod:`gatelens.cli.arrays`.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gatelens.analysis import Analysis, Settings, analyze
from gatelens.analysis.lyapunov import DEFAULT_EXPONENTS
from gatelens.analysis.pipeline import MAX_LAG, PROBES, STAGES
from gatelens.cli.common import add_model_options, load_input, print_json, print_outcome, trace_input
from gatelens.cli.dataset import add_dataset_options, over_batches, run_analyze_dataset, run_explain_dataset
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
    add_dataset_options(analyze)
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
    add_dataset_options(explain_command)
    explain_command.set_defaults(handler=run_explain)


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
    given = load_input(arguments)
    if over_batches(arguments, given, console):  # more sequences than one batch: analysed as a data set
        return run_analyze_dataset(arguments, console, given, out, _settings(arguments))
    loaded = trace_input(given)
    console.print(loaded.note)
    analyses = analyze_with_progress(
        loaded.trace, "model", console, loss=arguments.loss, only=arguments.only, skip=arguments.skip,
        settings=_settings(arguments),
    )  # fmt: skip
    results = analyses.to_dict() | {"input": loaded.note}
    title = f"gatelens: {Path(arguments.checkpoint).name}"
    files = write_report_folder(out, [analyses], title=title, notes=[loaded.note], results=results)
    print_outcome(console, results, analyses.explanation, files, out, as_json=arguments.json)
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
    given = load_input(arguments)
    if over_batches(arguments, given, console):
        return run_explain_dataset(arguments, console, given, _settings(arguments))
    loaded = trace_input(given)
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
