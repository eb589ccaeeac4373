"""``sweep``: run an experiment's per-point function over a grid on a Dask cluster, writing each row as it finishes.

Order of work. Everything is checked before any point runs: the spec (experiment, preset, keys, values), the
options, the output folder (writable; not another sweep's; with rows only when resuming), the scheduler (reachable,
within the timeout) and its workers (same gatelens and torch). Then sweep.json is written, the missing points are
submitted (one Dask task each, in grid order), and as each finishes its row is appended to results.csv from this
process; when all are done the aggregate table and figures are written.

Failures. A point that raises gives a row with status "error" and is not retried. A task lost with its worker is
run again by Dask on another worker (up to Dask's ``distributed.scheduler.allowed-failures``, 3 by default); one
lost for good (KilledWorker, the scheduler gone) has no row, is reported, and runs again on ``resume``. Each task
key carries a per-run token, so a resumed sweep never meets the keys of an interrupted one on the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from asyncio import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gatelens.experiments.folders import writable_folder
from gatelens.sweep.cluster import check_options, connect
from gatelens.sweep.spec import GridPoint, SweepSpec, read_spec
from gatelens.sweep.summary import aggregate, describe, figures
from gatelens.sweep.table import DECISIVE, ResultsTable, encode, locked, versions
from gatelens.sweep.task import run_point

RESULTS_ROOT = "gatelens-results"
POLL = 0.1  # seconds between looks at the finished tasks
RUNNING_EVERY = 1.0  # seconds between asking the scheduler how many of ours are running
FINAL = ("finished", "error", "cancelled")  # a future's states that do not change any more on their own


@dataclass(frozen=True)
class SweepResult:
    """What a sweep left in its folder: ``rows`` (every point's row, this run's and earlier ones, in grid order),
    ``failed`` (the rows with status "error"), ``lost`` (point hash → why it has no row), ``ran`` (points run by this
    call), ``summary`` (the aggregate rows), ``text`` (a paragraph saying all that) and the ``files`` written."""

    out: Path
    spec: SweepSpec
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    lost: dict[str, str]
    ran: int
    summary: list[dict[str, Any]]
    text: str
    files: list[Path]

    @property
    def complete(self) -> bool:
        """Every point has a row (ok or error)."""
        return len(self.rows) == len(self.spec.points)


def sweep(
    spec: Any,
    client: Any = None,
    *,
    out: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    timeout: float = 10.0,
    progress: bool = False,
    console: Console | None = None,
) -> SweepResult:
    """Run the sweep ``spec`` (a TOML file's path, a dict, or a :class:`SweepSpec`; see ``gatelens.sweep.spec``)
    and write its folder ``out`` (default ``gatelens-results/sweep-<name>``): sweep.json, results.csv, summary.csv,
    summary.md and one figure per plotted metric.

    Where it runs: on ``client`` (a ``dask.distributed.Client``, left open), else on the scheduler at ``scheduler``
    (e.g. "tcp://host:8786"; reached within ``timeout`` seconds or a ConnectionError), else on a local cluster of
    ``workers`` processes (default: one per CPU, at most one per point) started and closed here. ``resume=True``
    runs only the points without a row. ``progress=True`` shows points done, failed and running and the time
    left on ``console`` (default: a rich console on stderr).
    """
    spec = read_spec(spec)
    check_options(client, scheduler, workers, timeout)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    folder = writable_folder(out if out is not None else default_folder(spec))
    with locked(folder):
        table = ResultsTable.open(folder, spec, resume=resume)
        todo = [point for point in spec.points if point.key not in table.done]
        before, lost = len(table.rows), {}
        try:
            if todo:
                with connect(client, scheduler, workers, timeout, len(todo)) as active:
                    table.start()
                    view = _progress(console, progress)
                    if progress and not active.scheduler_info().get("workers"):
                        view.console.print("no Dask worker is connected to the scheduler yet: the sweep waits for "
                                           "one (start workers with: dask worker SCHEDULER_ADDRESS)")  # fmt: skip
                    with view:
                        lost = _run(active, spec, todo, table, view)
            else:
                table.start()  # nothing to run: the folder is still a complete sweep's
        finally:
            table.close()
        return _finish(folder, spec, table, ran=len(table.rows) - before, lost=lost)


def default_folder(spec: SweepSpec) -> Path:
    """Where a sweep writes without ``out``."""
    return Path(RESULTS_ROOT) / f"sweep-{spec.name}"


def _run(client: Any, spec: SweepSpec, todo: list[GridPoint], table: ResultsTable, view: Progress) -> dict[str, str]:
    """Submit the points, write each row as its task finishes; returns the points lost (hash → reason)."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    by_key = {f"gatelens-sweep-{point.key}-{token}": point for point in todo}
    metrics = spec.point.metrics
    expected = {name: version for name, version in versions().items() if name in DECISIVE}
    futures = client.map(
        run_point, [spec.point.run] * len(todo), [point.config for point in todo], [metrics] * len(todo),
        [expected] * len(todo), key=list(by_key), retries=0,
    )  # fmt: skip
    total, failed = len(spec.points), sum(row["status"] != "ok" for row in table.rows)
    task = view.add_task(spec.name, total=total, completed=len(table.rows), failed=failed, running=0)
    lost: dict[str, str] = {}
    pending = set(by_key)
    asked = 0.0
    finished = as_completed(futures, loop=client.loop)
    try:
        while not finished.is_empty():
            batch = finished.next_batch(block=False)
            for future in batch:
                if future.status not in FINAL:  # its result was lost with its worker: Dask runs it again
                    finished.add(future)
                    continue
                point = by_key[future.key]
                try:
                    outcome = future.result()  # fetched from a worker; if that worker just died, computed again
                except (Exception, CancelledError) as error:  # noqa: BLE001 - lost to the cluster, not the point
                    lost[point.key] = _reason(future, error)
                else:
                    row = _row(spec, point, outcome)
                    if table.append(row) and row["status"] != "ok":
                        failed += 1
                pending.discard(future.key)
                future.release()
                view.update(task, completed=len(table.rows), failed=failed)
            if not batch:
                if time.monotonic() - asked > RUNNING_EVERY:
                    view.update(task, running=_running(client, pending))
                    asked = time.monotonic()
                time.sleep(POLL)
    except BaseException:  # an interrupt: what is written stays written; the rest is cancelled on the cluster
        with contextlib.suppress(Exception):  # the cluster may be what failed; the interrupt is what matters
            client.cancel([future for future in futures if future.key in pending])
        raise
    view.update(task, running=0)
    return lost


def _row(spec: SweepSpec, point: GridPoint, outcome: dict[str, Any]) -> dict[str, Any]:
    return {
        "point": point.key,
        "status": outcome["status"],
        **point.values,
        **{metric: outcome["metrics"].get(metric) for metric in spec.point.metrics},
        "error": outcome["error"],
        "seconds": outcome["seconds"],
        "worker": outcome["worker"],
        "started": outcome["started"],
        "finished": outcome["finished"],
        "config": point.config,
    }


def _reason(future: Any, error: BaseException) -> str:
    if future.status == "cancelled" or isinstance(error, CancelledError):
        return "cancelled (the connection to the scheduler was lost?)"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _running(client: Any, pending: set[str]) -> int:
    """How many of ``pending`` the workers are running now (0 if the scheduler cannot say)."""
    try:
        processing = client.processing()
    except Exception:  # noqa: BLE001 - the count is only for the progress display
        return 0
    return sum(1 for keys in processing.values() for key in keys if key in pending)


def _progress(console: Console | None, show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points · failed {task.fields[failed]} · running {task.fields[running]} · left"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show,
    )


def _finish(folder: Path, spec: SweepSpec, table: ResultsTable, *, ran: int, lost: dict[str, str]) -> SweepResult:
    """The aggregate table, its Markdown and the figures, written into ``folder``; the result."""
    from gatelens.experiments.runner import markdown_table

    order = {point.key: index for index, point in enumerate(spec.points)}
    rows = sorted(table.rows, key=lambda row: order[row["point"]])
    failed = [row for row in rows if row["status"] != "ok"]
    summary = aggregate(spec, rows)
    text = describe(spec, rows, ran, lost)
    files = [folder / "sweep.json", table.path]
    files.append(_write_table(folder / "summary.csv", summary))
    markdown = f"# sweep {spec.name}: {spec.experiment.name} ({spec.preset})\n\n{text}\n\n## summary\n\n"
    markdown += markdown_table(summary) + "\n"
    if failed:
        columns = ["point", *spec.grid, "error"]
        markdown += "\n## failed points\n\n" + markdown_table([{key: row[key] for key in columns} for row in failed])
        markdown += "\n"
    (folder / "summary.md").write_text(markdown, encoding="utf-8")
    files.append(folder / "summary.md")
    for stem, figure in figures(spec, summary).items():
        path = folder / f"{stem}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        files.append(path)
    return SweepResult(folder, spec, rows, failed, lost, ran, summary, text, files)


def _write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[encode(row.get(column)) for column in columns] for row in rows])
    return path
