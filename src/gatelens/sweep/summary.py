"""A sweep's aggregate table and figures, computed from its results table alone.

Aggregate rows: one per combination of the grid's values other than "seed" (so, over the seeds), in grid order, with
the number of points, how many are "ok" and how many "failed", and per metric over the ok points: for a metric
that is a bool, "<metric>_rate", the share of True; for a number, "<metric>_median", the upper median of the finite
values (as the experiments report medians over seeds). Other metrics (strings, lists) are left out.

Figures (one per metric of the experiment's ``Point.figures``): the aggregate against the grid key ``x`` (the
experiment's choice when the grid varies it, else the first varying numeric key), one line per combination of the
other varying keys, one panel per value of the experiment's ``panels`` key when the grid varies it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from gatelens.sweep.spec import SweepSpec, canonical

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEED = "seed"
MARKERS = (("o", 9), ("s", 7), ("^", 6), ("D", 4), ("v", 5), ("x", 6))  # shrinking, so that overlaps stay visible


def aggregate(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The aggregate rows (module docstring) of the points that have a row."""
    by_point = {row["point"]: row for row in rows}
    keys = [key for key in spec.grid if key != SEED]
    kinds = _kinds(spec, [row for row in rows if row["status"] == "ok"])
    groups: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, dict[str, Any]] = {}
    for point in spec.points:
        if point.key in by_point:
            values = {key: point.values[key] for key in keys}
            label = canonical(values)
            groups.setdefault(label, []).append(by_point[point.key])
            labels[label] = values
    table = []
    for label, members in groups.items():
        ok = [row for row in members if row["status"] == "ok"]
        entry = labels[label] | {"points": len(members), "ok": len(ok), "failed": len(members) - len(ok)}
        for metric, kind in kinds.items():
            values = [row[metric] for row in ok]
            if kind == "rate":
                entry[f"{metric}_rate"] = sum(values) / len(values) if values else None
            else:
                finite = sorted(value for value in values if math.isfinite(value))
                entry[f"{metric}_median"] = finite[len(finite) // 2] if finite else None
        table.append(entry)
    return table


def figures(spec: SweepSpec, table: list[dict[str, Any]]) -> dict[str, Figure]:
    """The figures (module docstring) by file stem; none when no numeric grid key varies."""
    point = spec.point
    varying = [key for key, values in spec.grid.items() if key != SEED and len(values) > 1]
    numeric = [key for key in varying if all(_is_number(value) for value in spec.grid[key])]
    x = point.x if point.x in numeric else next(iter(numeric), None)
    if x is None or not table:
        return {}
    panels = point.panels if point.panels in varying and point.panels != x else None
    lines = sorted((key for key in varying if key not in (x, panels)), key=lambda key: key != point.lines)
    drawn = {}
    for metric in point.figures:
        column = next((name for name in (f"{metric}_rate", f"{metric}_median") if name in table[0]), None)
        if column is not None:
            drawn[metric] = _figure(spec, table, column, x, panels, lines)
    return drawn


def describe(spec: SweepSpec, rows: list[dict[str, Any]], ran: int, lost: dict[str, str]) -> str:
    """A paragraph: how many points are done, ok and failed and why, how many ran now, and what was lost."""
    failed = [row for row in rows if row["status"] != "ok"]
    total, done = len(spec.points), len(rows)
    text = (
        f"{spec.experiment.name} ({spec.preset}), {total} point{'s' if total != 1 else ''}: "
        f"{done - len(failed)} ok, {len(failed)} failed"
        + (f", {total - done} without a row" if done < total else "")
        + f". This run ran {ran}; {done - ran if done >= ran else 0} were already done."
    )
    if failed:
        reasons = Counter(row["error"] for row in failed)
        text += " Failed: " + "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common()) + "."
    if lost:
        reasons = Counter(lost.values())
        text += (
            f" Lost on the cluster, so without a row: {len(lost)} ("
            + "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common())
            + "); run the sweep again with --resume (resume=True) to retry them."
        )
    return text


def _kinds(spec: SweepSpec, ok: list[dict[str, Any]]) -> dict[str, str]:
    """Each metric that can be aggregated: "rate" (bools) or "median" (numbers)."""
    kinds = {}
    for metric in spec.point.metrics:
        values = [row[metric] for row in ok]
        if values and all(isinstance(value, bool) for value in values):
            kinds[metric] = "rate"
        elif values and all(_is_number(value) for value in values):
            kinds[metric] = "median"
    return kinds


def _figure(
    spec: SweepSpec, table: list[dict[str, Any]], column: str, x: str, panels: str | None, lines: list[str]
) -> Figure:
    from matplotlib.figure import Figure  # when drawn: `import gatelens` stays free of matplotlib

    panel_values = spec.grid[panels] if panels else [None]
    figure = Figure(figsize=(5 * len(panel_values), 3.8))
    xs = sorted(spec.grid[x])
    for axes, panel in zip(figure.subplots(1, len(panel_values), squeeze=False)[0], panel_values):
        own = [row for row in table if panels is None or row[panels] == panel]
        combinations: dict[str, dict[str, Any]] = {}
        for row in own:
            combinations.setdefault(canonical([row[key] for key in lines]), {key: row[key] for key in lines})
        for index, values in enumerate(combinations.values()):
            points = sorted(
                (row[x], row[column])
                for row in own
                if all(row[key] == value for key, value in values.items()) and row[column] is not None
            )
            label = ", ".join(
                f"{value}" if key == spec.point.lines else f"{key} = {value}" for key, value in values.items()
            )
            marker, size = MARKERS[index % len(MARKERS)]
            axes.plot([p[0] for p in points], [p[1] for p in points], color=f"C{index % 10}", marker=marker,
                      markersize=size, label=label or column)  # fmt: skip
        if xs[0] > 0 and xs[-1] / xs[0] >= 8:
            axes.set_xscale("log")
            axes.set_xticks(xs, labels=[str(value) for value in xs])
            axes.set_xticks([], minor=True)
        if column.endswith("_rate"):
            axes.set_ylim(-0.05, 1.05)
        axes.set_xlabel(x)
        metric, kind = column.rsplit("_", 1)
        axes.set_ylabel(f"{metric}: share true" if kind == "rate" else f"{metric}: median over seeds")
        axes.set_title(f"{spec.experiment.name}" + (f", {panels} = {panel}" if panels else ""))
        if combinations:
            axes.legend(fontsize="small")
    return figure


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
