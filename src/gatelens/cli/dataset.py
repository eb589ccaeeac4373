"""``gatelens analyze | explain … --batch-size N [--scheduler ADDRESS | --workers K]``: an input of more sequences than
one batch is analysed as a data set (:func:`gatelens.analyze_dataset`): batch by batch, here or on Dask, the
statistics pooled; results.json, the report and the findings show the pooled statistics, with the number of
sequences and batches. An input of at most --batch-size sequences runs as one batch, exactly as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from gatelens.analysis import Settings
from gatelens.analysis.dataset import DATASET_STAGES, DEFAULT_BATCH_SIZE, DatasetAnalysis, analyze_dataset
from gatelens.cli.common import Input, print_json, print_outcome
from gatelens.cli.sweep import quiet_dask
from gatelens.report.dataset import write_dataset_report
from gatelens.report.findings import findings_table


def add_dataset_options(command: argparse.ArgumentParser) -> None:
    """--batch-size, and where the batches run: --scheduler or --workers."""
    group = command.add_argument_group("data sets (more sequences than --batch-size)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"sequences per batch ({DEFAULT_BATCH_SIZE}); an input of more sequences is analysed batch by batch and "
        f"the statistics of {', '.join(DATASET_STAGES)} are pooled (credit and blocking, which are per batch, are "
        "then left out)",
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="run the batches on a running Dask scheduler, e.g. tcp://HOST:8786"
    )
    where.add_argument(
        "--workers", type=int, metavar="K", help="run the batches on a local Dask cluster of K processes"
    )


def over_batches(arguments: argparse.Namespace, given: Input, console: Console) -> bool:
    """Whether the input holds more sequences than --batch-size (the data-set path); says so when a cluster was
    asked for but one batch holds every sequence."""
    if arguments.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {arguments.batch_size}")
    if arguments.workers is not None and arguments.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {arguments.workers}")
    sequences = given.x.shape[0 if given.model.batch_first else 1]
    if sequences > arguments.batch_size:
        return True
    if arguments.scheduler is not None or arguments.workers is not None:
        console.print(f"{sequences} sequences fit in one batch (--batch-size {arguments.batch_size}): analysed here, "
                      "without Dask")  # fmt: skip
    return False


def run_analyze_dataset(
    arguments: argparse.Namespace, console: Console, given: Input, out: Path, settings: Settings
) -> int:
    """``gatelens analyze`` on a data set: results.json, the figures and report.html of the pooled statistics."""
    dataset = _analyze(arguments, console, given, settings, skip=arguments.skip)
    console.print(_left_out(dataset))
    results = dataset.to_dict() | {"input": given.note}
    title = f"gatelens: {Path(arguments.checkpoint).name} on {dataset.sequences} sequences"
    notes = [given.note, _left_out(dataset)]
    files = write_dataset_report(out, dataset, results=results, title=title, notes=notes)
    print_outcome(console, results, dataset.explanation, files, out, as_json=arguments.json)
    return 0


def run_explain_dataset(arguments: argparse.Namespace, console: Console, given: Input, settings: Settings) -> int:
    """``gatelens explain`` on a data set: the findings of the pooled statistics."""
    dataset = _analyze(arguments, console, given, settings, skip=arguments.skip)
    if arguments.json:
        print_json(dataset.explanation.to_dict() | {"input": given.note, "dataset": dataset.to_dict()["dataset"]})
    else:
        console.print(findings_table({"model": dataset.explanation}))
    return 0


def _analyze(arguments: argparse.Namespace, console: Console, given: Input, settings: Settings,
             skip: list[str]) -> DatasetAnalysis:  # fmt: skip
    """analyze_dataset with the options, a progress bar over the batches (and, here, the current batch's stages)."""
    only = arguments.only
    if only is not None and any(stage in DATASET_STAGES for stage in only):
        only = [stage for stage in only if stage in DATASET_STAGES]  # with none, analyze_dataset says why
    console.print(given.note)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
    )
    with quiet_dask(), Progress(*columns, console=console, transient=True) as progress:
        bars: dict[str, TaskID] = {}

        def advance(stage: str, done: float, total: float) -> None:
            label = "batches" if stage == "batches" else f"  this batch: {stage}"
            if label not in bars:
                bars[label] = progress.add_task(label, total=total)
            progress.update(bars[label], completed=done, total=total)

        dataset = analyze_dataset(
            given.model, given.x, batch_size=arguments.batch_size, only=only, skip=skip, settings=settings,
            scheduler=arguments.scheduler, workers=arguments.workers, progress=advance,
        )  # fmt: skip
    console.print(f"{dataset.describe()}; {dataset.seconds['wall']:.1f} s")
    return dataset


def _left_out(dataset: DatasetAnalysis) -> str:
    return (
        f"credit maps and blocking are per batch and are not pooled over the {dataset.batches} batches; run with "
        f"--batch-size {dataset.sequences} (one batch of every sequence) or on a subset for them"
    )
