"""The findings of several models side by side, as a terminal table: one row per topic and recurrence."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from gatelens.analysis import Explanation
from gatelens.analysis.explain import Finding


def findings_table(explanations: Mapping[str, Explanation]) -> Table:
    """A rich table with a column per model and a row per topic. Where a model has several findings on a topic
    (one per layer and direction of a bidirectional model), the topic has a row per recurrence, with "—" where a
    model has none."""
    if not explanations:
        raise ValueError("findings_table needs at least one explanation, got none")
    by_topic: dict[str, dict[str, list[Finding]]] = {}
    for name, explanation in explanations.items():
        if not isinstance(explanation, Explanation):
            raise TypeError(f"findings_table needs Explanations (from gl.explain), got {type(explanation).__name__}")
        for finding in explanation.findings:
            by_topic.setdefault(finding.topic, {}).setdefault(name, []).append(finding)
    table = Table(title="findings", show_lines=True, expand=True)
    table.add_column("topic", style="bold", no_wrap=True)
    for name in explanations:
        table.add_column(name, ratio=1)
    for topic, found in by_topic.items():
        if all(len(findings) == 1 for findings in found.values()):
            cells = [_cell(found[name][0]) if name in found else "—" for name in explanations]
            table.add_row(topic, *cells)
            continue
        recurrences = list(dict.fromkeys(f.recurrence for findings in found.values() for f in findings))
        for recurrence in recurrences:
            cells = [
                next((f.text for f in found.get(name, []) if f.recurrence == recurrence), "—") for name in explanations
            ]
            table.add_row(f"{topic}\n({recurrence})", *cells)
    return table


def _cell(finding: Finding) -> str:
    return f"({finding.recurrence}) {finding.text}"
