"""report.html as text: its structure read back with html.parser, escaping, self-containment and bad input.

The explanations are real (gl.explain on tiny traced torch modules) and so are the PNGs (small matplotlib
figures drawn with the Agg canvas). ``sample_report`` is shared with the browser test.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Callable
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

import gatelens as gl
from gatelens.report.html import ReportFigure, render_report, write_report

EVIL = "<script>alert(1)</script> & \"double\" 'single' </td></table>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ---------------------------------------------------------------------------------------------- the sample report


def explanation_of(make: Callable[[], nn.Module], seed: int = 0) -> gl.Explanation:
    """gl.explain on the module ``make`` builds (initialised from ``seed``) over a random (T=12, B=2, I=2) batch."""
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        module = make()
        x = torch.randn(12, 2, 2)
    return gl.explain(gl.load(module).trace(x))


def png_of(kind: str, width: float = 3.0, height: float = 2.0) -> bytes:
    """A small real figure as PNG bytes, drawn without pyplot."""
    figure = Figure(figsize=(width, height), dpi=60)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if kind == "line":
        axes.plot(range(10), [v * v for v in range(10)], color="tab:blue")
    else:
        axes.imshow([[i * j for j in range(8)] for i in range(6)], cmap="viridis")
    axes.set_title(kind)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def sample_report() -> dict[str, Any]:
    """render_report's arguments for a GRU and an Elman RNN side by side, with two figures."""
    return {
        "title": "gatelens demo: GRU vs Elman RNN",
        "findings": {
            "GRU": explanation_of(lambda: nn.GRU(2, 4)),
            "Elman": explanation_of(lambda: nn.RNN(2, 4)),
        },
        "figures": [
            ReportFigure("jacobian_norms", "step Jacobians", "Top: the norm of each step's Jacobian.", png_of("line")),
            ReportFigure("regimes", "gate regimes", "Each unit (row) at each step (column).", png_of("map", 4, 2.5)),
        ],
        "summary": [("model", "torch.nn.GRU(2, 4) and torch.nn.RNN(2, 4)"), ("input", "(T, B, I) = (12, 2, 2)")],
        "notes": ["inputs were random: no --input given"],
    }


@pytest.fixture(scope="module")
def sample() -> dict[str, Any]:
    return sample_report()


# ------------------------------------------------------------------------------------------- the page, as a tree


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text for child in self.children)

    def iter(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        """Every descendant (document order) with this tag and class."""
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (
                    cls is None or cls in (child.attrs.get("class") or "").split()
                ):
                    found.append(child)
                found += child.iter(tag, cls)
        return found

    def find(self, tag: str | None = None, cls: str | None = None, id: str | None = None) -> Node:
        found = [node for node in self.iter(tag, cls) if id is None or node.attrs.get("id") == id]
        assert found, f"no <{tag} class={cls} id={id}>"
        return found[0]


class Page(HTMLParser):
    """A strict little tree builder: every element closed in order, character references decoded."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.declarations: list[str] = []
        self.order: list[Node] = []  # every element in document order
        self.feed(text)
        self.close()
        assert self.stack == [self.root], f"unclosed elements: {[n.tag for n in self.stack[1:]]}"

    def handle_decl(self, decl: str) -> None:
        self.declarations.append(decl)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        assert len(node.attrs) == len(attrs), f"repeated attribute in <{tag}>"
        self.stack[-1].children.append(node)
        self.order.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID, f"</{tag}> closes a void element"
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def findings_columns(page: Page) -> tuple[list[str], list[tuple[str, list[Node]]]]:
    """The findings table: its model headers and, per row, the row header's text and the model cells."""
    table = page.root.find("section", id="findings").find("table", "findings")
    headers = [th for th in table.find("thead").iter("th")][1:]
    models = [next(c for c in th.children if isinstance(c, str)) for th in headers]
    rows = [(tr.find("th").text, tr.iter("td")) for tr in table.iter("tr")[1:]]
    return models, rows


# --------------------------------------------------------------------------------------------------- structure


def test_document_head_and_order(sample: dict[str, Any]) -> None:
    page = Page(render_report(**sample))
    assert [d.lower() for d in page.declarations] == ["doctype html"]
    assert page.root.find("html").attrs["lang"] == "en"
    metas = page.root.find("head").iter("meta")
    assert {"charset": "utf-8"} in [m.attrs for m in metas]
    assert any(m.attrs.get("name") == "viewport" and "width=device-width" in (m.attrs["content"] or "") for m in metas)
    assert page.root.find("title").text == sample["title"] == page.root.find("h1").text
    # Header, then findings, then figures, in document order; nothing outside <main> in the body.
    order = [node for node in page.order if node.tag in {"header", "section"}]
    assert [(n.tag, n.attrs.get("id")) for n in order] == [
        ("header", None),
        ("section", "findings"),
        ("section", "figures"),
    ]
    body = page.root.find("body")
    assert [c.tag for c in body.children if isinstance(c, Node)] == ["main"]
    assert not [c for c in body.children if isinstance(c, str) and c.strip()]


def test_summary_and_notes(sample: dict[str, Any]) -> None:
    page = Page(render_report(**sample))
    rows = page.root.find("header").find("table", "summary").iter("tr")
    assert [(tr.find("th").text, tr.find("td").text) for tr in rows] == sample["summary"]
    assert [li.text for li in page.root.find("ul", "notes").iter("li")] == sample["notes"]
    # No summary and no notes: neither element.
    bare = Page(render_report(title="t", findings=sample["findings"], figures=[]))
    assert not bare.root.iter("table", "summary") and not bare.root.iter("ul", "notes")
    assert not [n for n in bare.order if n.attrs.get("id") == "figures"]


def test_findings_side_by_side_in_explain_order(sample: dict[str, Any]) -> None:
    page = Page(render_report(**sample))
    models, rows = findings_columns(page)
    assert models == ["GRU", "Elman"]
    headers = page.root.find("table", "findings").find("thead").iter("code")
    assert [code.text for code in headers] == [e.model for e in sample["findings"].values()]
    for column, (model, explanation) in enumerate(sample["findings"].items()):
        # Each model's column, read top to bottom, is its explanation in explain's order (one finding per topic
        # here, so one row per topic), and each cell names its model (shown when the columns stack).
        cells = [cells[column] for _, cells in rows]
        assert [cell.find("p", "finding").text for cell in cells] == [f.text for f in explanation.findings]
        assert [header for header, _ in rows] == [
            _row_header(sample["findings"], f.topic) for f in explanation.findings
        ]
        assert {cell.find("span", "model").text for cell in cells} == {model}
        for cell, finding in zip(cells, explanation.findings):
            number = cell.find("span", "number")
            if finding.value is None:
                assert not number.iter("data") and "none" in number.text
            else:
                assert float(number.find("data").attrs["value"]) == finding.value


def _row_header(findings: dict[str, gl.Explanation], topic: str) -> str:
    """The row header of a topic on which each model has one finding: the topic, and the recurrence if shared."""
    recurrences = {f.recurrence for e in findings.values() for f in e.findings if f.topic == topic}
    return topic + (recurrences.pop() if len(recurrences) == 1 else "")


def test_one_row_per_topic_when_recurrences_differ(sample: dict[str, Any]) -> None:
    """explain's blocking finding is about "all" without an event and about the event's recurrence with one: the
    two models' blocking findings still share a row, each cell naming its own recurrence."""
    gru, elman = sample["findings"]["GRU"], sample["findings"]["Elman"]

    def moved(explanation: gl.Explanation, recurrence: str) -> gl.Explanation:
        findings = [replace(f, recurrence=recurrence) if f.topic == "blocking" else f for f in explanation.findings]
        return replace(explanation, findings=findings)

    page = Page(render_report(title="t", findings={"GRU": moved(gru, "all"), "Elman": moved(elman, "l0")}, figures=[]))
    _, rows = findings_columns(page)
    assert [header for header, _ in rows] == [f.topic + ("" if f.topic == "blocking" else "l0") for f in gru.findings]
    blocking = next(cells for header, cells in rows if header == "blocking")
    assert [cell.find("span", "rec").text for cell in blocking] == ["all", "l0"]
    others = [cells for header, cells in rows if header != "blocking"]
    assert not [cell for cells in others for cell in cells if cell.iter("span", "rec")]


def test_rows_of_a_model_with_more_recurrences_stay_in_their_topic() -> None:
    """A bidirectional GRU has findings on l0 and l0_reverse where the Elman RNN has l0 only: its extra rows go
    inside each topic (one tbody per topic, in explain's order) and the Elman's cell there is "—"."""
    findings = {
        "Elman": explanation_of(lambda: nn.RNN(2, 3)),
        "BiGRU": explanation_of(lambda: nn.GRU(2, 3, bidirectional=True)),
    }
    page = Page(render_report(title="t", findings=findings, figures=[]))
    table = page.root.find("table", "findings")
    topics = [tbody.attrs["data-topic"] for tbody in table.iter("tbody")]
    assert topics == list(dict.fromkeys(f.topic for f in findings["BiGRU"].findings))
    _, rows = findings_columns(page)
    bi = [cells[1].find("p", "finding").text for _, cells in rows]
    assert bi == [f.text for f in findings["BiGRU"].findings]
    missing = [header for header, cells in rows if cells[0].find("p").text == "—"]
    assert missing and all(header.endswith("l0_reverse") for header in missing)
    assert len(missing) == len(rows) - len(findings["Elman"].findings)


def test_one_embedded_png_per_figure_with_its_caption(sample: dict[str, Any]) -> None:
    page = Page(render_report(**sample))
    section = page.root.find("section", id="figures")
    assert len(page.root.iter("img")) == len(sample["figures"])
    for node, figure in zip(section.iter("figure"), sample["figures"], strict=True):
        assert node.attrs["id"] == f"figure-{figure.name}"
        assert node.find("h3").text == figure.title
        img = node.find("img")
        prefix = "data:image/png;base64,"
        assert img.attrs["src"].startswith(prefix)
        assert base64.b64decode(img.attrs["src"][len(prefix) :], validate=True) == figure.png
        assert img.attrs["alt"] == figure.title
        assert (int(img.attrs["width"]), int(img.attrs["height"])) == figure.size
        assert node.children[-1].tag == "figcaption" and node.children[-1].text == figure.caption
    # The PNG's size is read from its header: 3 × 2 inches at 60 dpi.
    assert sample["figures"][0].size == (180, 120)


def test_self_contained(sample: dict[str, Any]) -> None:
    text = render_report(**sample)
    page = Page(text)
    for node in page.order:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = node.attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), f"<{node.tag} {name}={value[:40]!r}>"
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert not page.root.iter("script") and not page.root.iter("link") and not page.root.iter("iframe")
    # The page itself forbids loading anything but data: images and its inline style.
    csp = [m.attrs["content"] for m in page.root.iter("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]


# ------------------------------------------------------------------------------------------------------ escaping


def test_every_text_is_escaped(sample: dict[str, Any]) -> None:
    explanation = sample["findings"]["GRU"]
    evil = replace(
        explanation,
        model=EVIL,
        findings=[replace(f, topic=f"{f.topic} {EVIL}", recurrence=EVIL, text=EVIL) for f in explanation.findings],
    )
    figure = ReportFigure("evil", EVIL, EVIL, png_of("line"))
    text = render_report(title=EVIL, findings={EVIL: evil}, figures=[figure], summary=[(EVIL, EVIL)], notes=[EVIL])
    assert "<script" not in text and "</td></table>" not in text
    page = Page(text)  # the structure survives: every element closes where it should
    assert not page.root.iter("script")
    assert page.root.find("title").text == EVIL == page.root.find("h1").text
    assert page.root.find("table", "summary").find("th").text == EVIL
    assert page.root.find("ul", "notes").find("li").text == EVIL
    models, rows = findings_columns(page)
    assert models == [EVIL]
    assert page.root.find("table", "findings").find("thead").find("code").text == EVIL
    assert {cells[0].find("p", "finding").text for _, cells in rows} == {EVIL}
    assert {cells[0].find("span", "model").text for _, cells in rows} == {EVIL}
    topics = [tbody.attrs["data-topic"] for tbody in page.root.find("table", "findings").iter("tbody")]
    assert topics[-1] == f"lyapunov {EVIL}"
    node = page.root.find("figure")
    assert node.find("img").attrs["alt"] == EVIL  # quotes in an attribute value
    assert node.find("h3").text == EVIL and node.find("figcaption").text == EVIL


# ---------------------------------------------------------------------------------------------------- the file


def test_write_report(sample: dict[str, Any], tmp_path: Path) -> None:
    path = write_report(str(tmp_path / "report.html"), **sample)
    assert path == tmp_path / "report.html"
    assert path.read_bytes().decode("utf-8") == render_report(**sample)


# ---------------------------------------------------------------------------------------------------- bad input


def _figure(**change: Any) -> ReportFigure:
    fields = {"name": "fig", "title": "a title", "caption": "how to read it", "png": png_of("line")}
    return ReportFigure(**(fields | change))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"png": b"GIF89a" + bytes(40)}, ValueError, "'fig': png is not a PNG image"),
        ({"png": b""}, ValueError, "not a PNG image"),
        ({"png": "not bytes"}, TypeError, "png must be the PNG file's bytes, got str"),
        ({"name": "../fig"}, ValueError, "file stem"),
        ({"name": ""}, ValueError, "file stem"),
        ({"title": " "}, ValueError, "'fig': title must not be empty"),
        ({"title": None}, TypeError, "title must be a string, got NoneType"),
        ({"caption": ""}, ValueError, "caption must not be empty"),
        ({"caption": "line one\nline two"}, ValueError, "caption must be one line"),
    ],
)
def test_bad_figure(change: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _figure(**change)


def test_figure_png_from_bytearray() -> None:
    figure = _figure(png=bytearray(png_of("line")))
    assert isinstance(figure.png, bytes) and figure.size == (180, 120)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"title": ""}, ValueError, "title must not be empty"),
        ({"title": "two\nlines"}, ValueError, "title must be one line"),
        ({"title": 3}, TypeError, "title must be a string, got int"),
        ({"findings": {}}, ValueError, "at least one model's Explanation"),
        ({"findings": ["GRU"]}, TypeError, "findings must map each model's name to its Explanation"),
        ({"findings": {"GRU": "the GRU's findings"}}, TypeError, r"findings\['GRU'\] must be an Explanation"),
        ({"findings": {"": None}}, ValueError, "a model's name in findings must not be empty"),
        ({"figures": "jacobian_norms"}, TypeError, "figures must be a sequence of ReportFigure, got str"),
        ({"figures": [{"name": "x"}]}, TypeError, r"figures\[0\] must be a ReportFigure, got dict"),
        ({"summary": [("model",)]}, TypeError, r"summary\[0\] must be a \(key, value\) pair of strings"),
        ({"summary": [("steps", 12)]}, TypeError, r"summary\[0\] must be a \(key, value\) pair of strings"),
        ({"notes": "one note"}, TypeError, "notes must be a sequence of strings"),
        ({"notes": [None]}, TypeError, r"notes\[0\] must be a string, got NoneType"),
    ],
)
def test_bad_report(
    sample: dict[str, Any], change: dict[str, Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        render_report(**(sample | change))
    with pytest.raises(error, match=match):  # nothing is written when the arguments are wrong
        write_report(tmp_path / "report.html", **(sample | change))
    assert not (tmp_path / "report.html").exists()


def test_figure_names_are_unique(sample: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="two figures are named 'fig'"):
        render_report(**(sample | {"figures": [_figure(), _figure(title="another")]}))


def test_explanation_from_dict_is_refused(sample: dict[str, Any]) -> None:
    """The JSON form of an explanation is not an Explanation: the error names the type given."""
    as_dict = sample["findings"]["GRU"].to_dict()
    with pytest.raises(TypeError, match=r"findings\['GRU'\] must be an Explanation \(from gl.explain\), got dict"):
        render_report(**(sample | {"findings": {"GRU": as_dict}}))


def test_summary_as_mapping(sample: dict[str, Any]) -> None:
    as_mapping = render_report(**(sample | {"summary": dict(sample["summary"])}))
    assert as_mapping == render_report(**sample)
