"""The results folder of a sweep: its spec, and the results table written one row at a time.

    sweep.json     the spec, the sweep's hash, the table's columns and the package versions: written once, before
                   the first point runs; a folder whose sweep.json names another sweep is refused
    results.csv    one row per finished point, appended (then flushed and fsync'ed) as soon as it finishes, in the
                   order points finish: so a crash loses at most the points in flight

Columns: point (its hash), status ("ok" or "error"), the grid's keys, the experiment's metrics (empty for an
error), error ("Type: message" of what the point raised), seconds (the point's own run time), worker (the Dask
worker's address), started and finished (UTC), config (the whole configuration, as JSON).

Cells: numbers as JSON numbers (floats round-trip exactly), True/False, empty for None, strings as they are (as
JSON when they would read back as something else or hold a control character), lists and tables as JSON. So a
physical line is a row, and a torn last line (a crash during the write) is recognised and dropped when the table is
read back. A point never has two rows: rows are deduplicated by hash when written and when read back.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gatelens.sweep.spec import RESERVED, SweepSpec

RESULTS = "results.csv"
STATE = "sweep.json"
LOCK = ".sweep.lock"
DECISIVE = ("gatelens", "torch")  # the versions that decide a point's numbers: all rows of a sweep share them


def columns(spec: SweepSpec) -> list[str]:
    """The results table's columns for ``spec``."""
    first, last = list(RESERVED[:2]), list(RESERVED[2:])
    return first + list(spec.grid) + list(spec.point.metrics) + last


def encode(value: Any) -> str:
    """One cell's text (module docstring)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        plain = value != "" and value.isprintable() and decode(value) == value
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def decode(text: str) -> Any:
    """The value of one cell written by :func:`encode`."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


class ResultsTable:
    """The results table of one sweep in one folder: :meth:`open` reads and checks what is there, :meth:`start`
    writes sweep.json and opens results.csv for appending, :meth:`append` writes one row durably."""

    def __init__(
        self, folder: Path, spec: SweepSpec, rows: list[dict[str, Any]], fresh: bool, header: list[str]
    ) -> None:
        self.folder = folder
        self.spec = spec
        self.columns = header  # columns(spec), or an existing table's own order of them
        self.rows = rows  # decoded, one per point, in the order they were written
        self.done = {row["point"] for row in rows}
        self._fresh = fresh  # no sweep.json yet
        self._file: io.TextIOWrapper | None = None

    @property
    def path(self) -> Path:
        return self.folder / RESULTS

    @classmethod
    def open(cls, folder: Path, spec: SweepSpec, *, resume: bool) -> ResultsTable:
        """The table in ``folder`` for ``spec``, with the rows already there; refuses a folder holding another
        sweep's results, or this sweep's when ``resume`` is false. Writes nothing unless the table needs repair (a
        torn last line, a duplicate row): then it is rewritten atomically without them."""
        state_path, path = folder / STATE, folder / RESULTS
        if state_path.exists():
            state = _read_state(state_path)
            if state.get("sweep") != spec.key:
                count = state.get("points")
                raise ValueError(
                    f"{folder} holds the results of another sweep ({state.get('experiment')}, {count} "
                    f"point{'' if count == 1 else 's'}; sweep {state.get('sweep')}), not of this spec (sweep "
                    f"{spec.key}); choose another output folder"
                )
            written = state.get("versions", {})
            current = versions()
            differ = [f"{name} {written.get(name)} (now {current[name]})" for name in DECISIVE
                      if written.get(name) != current[name]]  # fmt: skip
            if differ:
                raise ValueError(
                    f"{folder} was written with {', '.join(differ)}; rows from other versions would not be "
                    f"comparable: choose another output folder"
                )
        elif path.exists():
            raise ValueError(f"{path} exists but is not a sweep's results table (no {STATE} beside it); choose another "
                             "output folder")  # fmt: skip
        header, rows = _read_rows(path, spec) if path.exists() else (columns(spec), [])
        table = cls(folder, spec, rows, fresh=not state_path.exists(), header=header)
        if table.rows and not resume:
            missing = len(spec.points) - len(table.rows)
            if not missing:
                raise ValueError(f"{folder} already holds every point of this sweep; its results are there, or choose "
                                 "another output folder to run it again")  # fmt: skip
            raise ValueError(
                f"{folder} already holds {len(table.rows)} of the {len(spec.points)} points of this sweep; resume it "
                f"(--resume, or resume=True) to run the {missing} missing, or choose another output folder"
            )
        return table

    def start(self) -> None:
        """Write sweep.json (first time only) and open results.csv for appending (with its header if new)."""
        if self._fresh:
            state = {
                "sweep": self.spec.key,
                "experiment": self.spec.experiment.name,
                "points": len(self.spec.points),
                "spec": self.spec.to_dict(),
                "columns": self.columns,
                "created": now(),
                "versions": versions(),
            }
            _write_atomically(self.folder / STATE, json.dumps(state, indent=2, ensure_ascii=False) + "\n")
            self._fresh = False
        new = not self.path.exists()
        self._file = self.path.open("a", newline="", encoding="utf-8")
        if new:
            self._write(self.columns)
            _sync_folder(self.folder)  # the new file's directory entry is durable too

    def append(self, row: dict[str, Any]) -> bool:
        """Write ``row`` (every column) as one line, flushed and fsync'ed; False (nothing written) if its point
        already has a row."""
        if row["point"] in self.done:
            return False
        cells = [encode(row[column]) for column in self.columns]
        self._write(cells)
        self.done.add(row["point"])
        self.rows.append({column: decode(cell) for column, cell in zip(self.columns, cells)})  # as read back
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, cells: list[str]) -> None:
        assert self._file is not None, "start() opens the table"
        self._file.write(_line(cells))
        self._file.flush()
        os.fsync(self._file.fileno())


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a sweep writes into it (where the OS has fcntl), so that two sweeps
    never append to the same table; a second one is refused at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one sweep per folder is then the user's to ensure
        yield
        return
    with (folder / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(
                f"another sweep is writing into {folder}; wait for it, or choose another output folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def now() -> str:
    """The current UTC time, to the millisecond, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def versions() -> dict[str, str]:
    """The versions that decide a point's numbers (and Dask's)."""
    import torch

    from gatelens import __version__

    found = {"gatelens": __version__, "torch": torch.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import distributed

        found["distributed"] = distributed.__version__
    return found


def _line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable sweep record: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a sweep record (expected a JSON object)")
    return state


def _read_rows(path: Path, spec: SweepSpec) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of an existing table, checked against ``spec`` (the same columns, in any order); a
    torn last line and duplicate rows are dropped and the file rewritten without them."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")
    if torn:
        lines.pop()  # a crash in the middle of a write: that point runs again
    expected = columns(spec)
    if not lines:
        if torn:
            path.unlink()  # not even the header was complete
        return expected, []
    header = next(csv.reader(lines[:1]))
    if sorted(header) != sorted(expected) or len(set(header)) != len(header):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise ValueError(f"{path} does not hold this sweep's columns (missing: {', '.join(missing) or 'none'}; "
                         f"unexpected: {', '.join(extra) or 'none'})")  # fmt: skip
    expected = header
    keys = {point.key for point in spec.points}
    rows, kept, duplicates = [], lines[:1], 0
    seen: set[str] = set()
    for number, (line, cells) in enumerate(zip(lines[1:], csv.reader(lines[1:])), start=2):
        if len(cells) != len(expected):
            raise ValueError(f"{path} line {number} has {len(cells)} cells, expected {len(expected)}; the table is "
                             "damaged")  # fmt: skip
        row = {column: decode(cell) for column, cell in zip(expected, cells)}
        if row["point"] not in keys:
            raise ValueError(f"{path} line {number} holds point {row['point']!r}, which is not in this sweep")
        if row["point"] in seen:
            duplicates += 1
            continue
        seen.add(row["point"])
        rows.append(row)
        kept.append(line)
    if torn or duplicates:
        _write_atomically(path, "".join(kept))
    return header, rows


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8", newline="") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS can open a directory (Windows)
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
