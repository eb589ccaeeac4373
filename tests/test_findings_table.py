"""The terminal table of findings side by side: every finding of every model appears once, in its column."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import gatelens as gl
from gatelens.report.findings import findings_table


def rendered(table: object) -> str:
    output = io.StringIO()
    Console(width=400, file=output).print(table)
    return " ".join(output.getvalue().split())


def explanations() -> dict[str, gl.Explanation]:
    torch.manual_seed(0)
    x = torch.randn(15, 2, 2)
    return {
        "GRU": gl.explain(gl.load(torch.nn.GRU(2, 4)).trace(x)),
        "bi-Elman": gl.explain(gl.load(torch.nn.RNN(2, 3, bidirectional=True)).trace(x)),
    }


def test_every_finding_appears_in_its_models_column() -> None:
    found = explanations()
    table = findings_table(found)
    assert [column.header for column in table.columns] == ["topic", "GRU", "bi-Elman"]
    cells = {column.header: [str(cell) for cell in column.cells] for column in table.columns}
    for name, explanation in found.items():
        column = " ".join(cells[name])
        for finding in explanation.findings:
            assert finding.text in column
        assert sum(cell != "—" for cell in cells[name]) == len(explanation.findings)
    topics = " ".join(cells["topic"])
    assert "l0_reverse" in topics  # the bidirectional model's topics have a row per recurrence
    assert "findings" in rendered(table)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one explanation"):
        findings_table({})
    with pytest.raises(TypeError, match="got dict"):
        findings_table({"GRU": {"findings": []}})
