"""``report.html``: one self-contained page with the findings first and the figures under them.

The page is laid out top to bottom as

    header     the title, the ``summary`` rows (model, input shape, dtype, device, versions, …) and the ``notes``
    findings   one column per model and, in :func:`gatelens.explain`'s order, one row per topic (per topic and
               recurrence where a bidirectional model has several findings on it): each cell holds the finding's
               number (``Finding.value``, labelled) and its sentence; on a narrow screen the columns stack, each
               cell naming its model
    figures    each figure's title, its PNG and a one-line caption saying how to read it

The file needs nothing but itself: the figures are embedded as ``data:image/png;base64`` URIs, the CSS is inline,
there is no JavaScript, and a Content-Security-Policy meta tag tells the browser to load nothing else (so a stray
external reference fails loudly in the browser test instead of silently reaching the network). Every piece of
text, in elements and in attributes alike, goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gatelens.analysis import Explanation, Finding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # a figure's file stem: safe in a path and in an id

# What Finding.value is for each of explain's topics, shown beside the number; other topics say "value".
VALUE_LABELS = {
    "regimes": "blocked share",
    "timescales": "longest τ (steps)",
    "horizon": "horizon ℓ (steps)",
    "blocking": "steps with collapsed rows",
    "local gradients": "largest ‖∂⁺h/∂θ‖",
    "lyapunov": "λ₁ (per step)",
}

# Readable at 1366×768 and on a phone: a centred column of at most 72rem, figures at most 900 px wide.
CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --tint: #f6f8fa; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5; font-size: 16px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", "Liberation Sans", Arial,
  sans-serif; }
main { max-width: 72rem; margin: 0 auto; padding: 1.25rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; line-height: 1.25; margin: 0 0 0.75rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 0.75rem; padding-bottom: 0.25rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 0 0 0.5rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace;
  font-size: 0.8rem; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; }
.summary { width: auto; font-size: 0.9rem; margin-bottom: 0.5rem; }
.summary th { color: var(--muted); font-weight: 600; padding: 0.1rem 1.25rem 0.1rem 0; white-space: nowrap; }
.summary td { padding: 0.1rem 0; overflow-wrap: anywhere; }
.notes { margin: 0.5rem 0 0; padding: 0.5rem 0.75rem 0.5rem 2rem; background: var(--tint);
  border-left: 3px solid var(--accent); font-size: 0.9rem; }
.findings { table-layout: fixed; }
.findings thead th { padding: 0.4rem 0.75rem; border-bottom: 2px solid var(--line); font-size: 1.05rem; }
.findings thead th code { display: block; font-weight: normal; font-size: 0.75rem; color: var(--muted); }
.findings th.topic-col { width: 9.5rem; padding-left: 0; }
.findings tbody { border-top: 1px solid var(--line); }
.findings tbody th { padding: 0.6rem 0.75rem 0.6rem 0; font-weight: 600; }
.findings tbody td { padding: 0.6rem 0.75rem; overflow-wrap: anywhere; }
.findings tbody tr + tr > * { border-top: 1px dashed var(--line); }
.rec { display: block; font-weight: normal; color: var(--muted); font-size: 0.85rem; }
.model { display: none; font-weight: 600; }
.number { display: block; font-size: 0.85rem; color: var(--muted); }
.number data { color: var(--ink); font-weight: 600; font-size: 1rem; font-variant-numeric: tabular-nums; }
.finding { margin: 0.15rem 0 0; }
.finding + .number { margin-top: 0.5rem; }
.none { color: var(--muted); }
figure { margin: 0 0 2rem; max-width: 900px; break-inside: avoid; }
figure img { display: block; width: 100%; max-width: 900px; height: auto; border: 1px solid var(--line); }
figcaption { margin-top: 0.4rem; color: var(--muted); font-size: 0.95rem; }
@media (max-width: 44rem) {
  main { padding: 1rem; }
  .findings, .findings tbody, .findings tr, .findings th, .findings td { display: block; width: auto; }
  .findings thead { display: none; }
  .findings tbody th { padding: 0.6rem 0 0.2rem; }
  .findings tbody td { padding: 0.3rem 0 0.6rem; border: 0; }
  .findings tbody tr + tr > * { border-top: 0; }
  .model { display: block; }
}
"""


@dataclass(frozen=True)
class ReportFigure:
    """One figure of the report: ``name`` is its file stem ("jacobian_norms"), ``title`` its heading, ``caption``
    one line saying how to read it, ``png`` the image's bytes (checked to be a PNG; its size is read from them)."""

    name: str
    title: str
    caption: str
    png: bytes
    size: tuple[int, int] = field(init=False, repr=False, compare=False)  # (width, height) in pixels

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise ValueError(
                f"a figure's name is its file stem: letters, digits, '_', '-' or '.', not starting with a "
                f"punctuation mark; got {self.name!r}"
            )
        _check_line(self.title, f"figure {self.name!r}: title")
        _check_line(self.caption, f"figure {self.name!r}: caption")
        if not isinstance(self.png, (bytes, bytearray, memoryview)):
            raise TypeError(f"figure {self.name!r}: png must be the PNG file's bytes, got {type(self.png).__name__}")
        png = bytes(self.png)
        object.__setattr__(self, "png", png)
        object.__setattr__(self, "size", _png_size(png, self.name))

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _png_size(png: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, the first chunk of every PNG: a clear error now rather than a broken
    image in the browser later."""
    if len(png) < 24 or not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError(
            f"figure {name!r}: png is not a PNG image (it starts with {png[:8]!r}, not {PNG_SIGNATURE!r}); "
            "save the figure with format='png'"
        )
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    if width == 0 or height == 0:
        raise ValueError(f"figure {name!r}: the PNG is empty ({width}×{height} pixels)")
    return width, height


def render_report(
    *,
    title: str,
    findings: Mapping[str, Explanation],
    figures: Sequence[ReportFigure],
    summary: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The report as an HTML5 document (module docstring). ``findings`` maps each model's name to its
    :class:`~gatelens.Explanation` (one column each, in the mapping's order); ``figures`` come in the given order;
    ``summary`` is (key, value) rows; ``notes`` are plain lines shown under them."""
    _check_line(title, "title")
    columns = _check_findings(findings)
    figures = _check_figures(figures)
    rows = _check_summary(summary)
    notes = _check_notes(notes)
    esc = _escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may load from anywhere: images only from data: URIs, styles only inline.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="generator" content="gatelens">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{esc(title)}</h1>",
    ]
    if rows:
        parts.append('<table class="summary"><tbody>')
        parts += [f'<tr><th scope="row">{esc(key)}</th><td>{esc(value)}</td></tr>' for key, value in rows]
        parts.append("</tbody></table>")
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>")
    parts.append("</header>")
    parts += _findings_section(columns)
    if figures:
        parts.append('<section id="figures" aria-labelledby="figures-title">')
        parts.append('<h2 id="figures-title">Figures</h2>')
        parts += [_figure(figure) for figure in figures]
        parts.append("</section>")
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    findings: Mapping[str, Explanation],
    figures: Sequence[ReportFigure],
    summary: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Render the report (:func:`render_report`, which checks every argument first) and write it to ``path``
    as UTF-8; returns the path."""
    text = render_report(title=title, findings=findings, figures=figures, summary=summary, notes=notes)
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _check_line(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} must not be empty")
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} must be one line, got {text!r}")


def _check_findings(findings: object) -> dict[str, Explanation]:
    if not isinstance(findings, Mapping):
        raise TypeError(
            "findings must map each model's name to its Explanation (from gl.explain), e.g. {'GRU': explanation}; "
            f"got {type(findings).__name__}"
        )
    if not findings:
        raise ValueError("findings must hold at least one model's Explanation, got an empty mapping")
    columns = {}
    for name, explanation in findings.items():
        _check_line(name, "a model's name in findings")
        if not isinstance(explanation, Explanation):
            raise TypeError(
                f"findings[{name!r}] must be an Explanation (from gl.explain), got {type(explanation).__name__}"
            )
        columns[name] = explanation
    return columns


def _check_figures(figures: object) -> list[ReportFigure]:
    if isinstance(figures, (str, bytes)) or not isinstance(figures, Sequence):
        raise TypeError(f"figures must be a sequence of ReportFigure, got {type(figures).__name__}")
    seen: set[str] = set()
    for index, figure in enumerate(figures):
        if not isinstance(figure, ReportFigure):
            raise TypeError(f"figures[{index}] must be a ReportFigure, got {type(figure).__name__}")
        if figure.name in seen:
            raise ValueError(f"two figures are named {figure.name!r}; each name is a file stem and must be unique")
        seen.add(figure.name)
    return list(figures)


def _check_summary(summary: object) -> list[tuple[str, str]]:
    if isinstance(summary, Mapping):
        summary = list(summary.items())
    if isinstance(summary, (str, bytes)) or not isinstance(summary, Sequence):
        raise TypeError(f"summary must be a sequence of (key, value) string pairs, got {type(summary).__name__}")
    rows = []
    for index, row in enumerate(summary):
        if not (isinstance(row, tuple) and len(row) == 2 and all(isinstance(part, str) for part in row)):
            raise TypeError(f"summary[{index}] must be a (key, value) pair of strings, got {row!r}")
        rows.append(row)
    return rows


def _check_notes(notes: object) -> list[str]:
    if isinstance(notes, (str, bytes)) or not isinstance(notes, Sequence):
        raise TypeError(f"notes must be a sequence of strings (one per line), got {type(notes).__name__}")
    for index, note in enumerate(notes):
        if not isinstance(note, str):
            raise TypeError(f"notes[{index}] must be a string, got {type(note).__name__}")
    return list(notes)


def _findings_section(columns: dict[str, Explanation]) -> list[str]:
    """A table with one column per model and one tbody per topic, topics in the order the models' findings first
    name them (explain's order); a model's column, read top to bottom, is its explanation in order."""
    esc = _escape
    parts = [
        '<section id="findings" aria-labelledby="findings-title">',
        '<h2 id="findings-title">Findings</h2>',
        '<table class="findings">',
        '<thead><tr><th scope="col" class="topic-col">topic</th>',
    ]
    parts += [f'<th scope="col">{esc(name)}<code>{esc(str(item.model))}</code></th>' for name, item in columns.items()]
    parts.append("</tr></thead>")
    topics: dict[str, list[tuple[str, Finding]]] = {}
    for model, explanation in columns.items():
        for finding in explanation.findings:
            topics.setdefault(finding.topic, []).append((model, finding))
    for topic, findings in topics.items():
        parts.append(f'<tbody data-topic="{esc(topic)}">')
        for recurrence, cells in _rows(findings):
            shared = "" if recurrence is None else f'<span class="rec">{esc(recurrence)}</span>'
            row = f'<tr><th scope="row">{esc(topic)}{shared}</th>'
            for model in columns:
                found = cells.get(model)
                content = (
                    "".join(_finding(finding, recurrence is None) for finding in found)
                    if found
                    else '<p class="none">—</p>'
                )
                row += f'<td><span class="model">{esc(model)}</span>{content}</td>'
            parts.append(row + "</tr>")
        parts.append("</tbody>")
    parts += ["</table>", "</section>"]
    return parts


def _rows(findings: list[tuple[str, Finding]]) -> list[tuple[str | None, dict[str, list[Finding]]]]:
    """One topic's rows: (the recurrence they are about, or None where the cells name their own; model → findings).

    Where no model has more than one finding on the topic, they share one row, even when their recurrences differ
    (explain's blocking finding is about "all" without an event and about the event's recurrence with one).
    Otherwise (a bidirectional model: one finding per layer and direction) there is a row per recurrence, in
    order of first appearance, so a model with more recurrences than another adds rows inside the topic."""
    models = [model for model, _ in findings]
    if len(set(models)) == len(models):
        recurrences = {finding.recurrence for _, finding in findings}
        shared = recurrences.pop() if len(recurrences) == 1 else None
        return [(shared, {model: [finding] for model, finding in findings})]
    rows: dict[str, dict[str, list[Finding]]] = {}
    for model, finding in findings:
        rows.setdefault(finding.recurrence, {}).setdefault(model, []).append(finding)
    return list(rows.items())


def _finding(finding: Finding, own_recurrence: bool) -> str:
    """A finding's number (labelled with what it is) and its sentence; its recurrence first when the row has none."""
    label = VALUE_LABELS.get(finding.topic, "value")
    value = finding.value
    if value is None:
        number = '<span class="none">none</span>'
    else:
        number = f'<data value="{_escape(repr(float(value)))}">{_escape(_format(float(value)))}</data>'
    recurrence = f'<span class="rec">{_escape(finding.recurrence)}</span>' if own_recurrence else ""
    return (
        f'{recurrence}<span class="number">{_escape(label)}: {number}</span>'
        f'<p class="finding">{_escape(finding.text)}</p>'
    )


def _format(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.3g}"


def _figure(figure: ReportFigure) -> str:
    esc = _escape
    width, height = figure.size
    return (
        f'<figure id="figure-{esc(figure.name)}">'
        f"<h3>{esc(figure.title)}</h3>"
        f'<img src="{figure.data_uri}" alt="{esc(figure.title)}" width="{width}" height="{height}">'
        f"<figcaption>{esc(figure.caption)}</figcaption>"
        "</figure>"
    )
