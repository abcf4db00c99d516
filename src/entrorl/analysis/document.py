"""Report documents: numbers formatted once, tables rendered the same way to Markdown, HTML and JSON, generated
prose, and matplotlib figures saved as PNG. Shared by the laboratory report and the report of a training run."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from entrorl._files import make_own_folder, naming_file, put_in_place_together, staging_folder

NA = "n/a"  # missing or undefined
NOT_APPLICABLE = "—"  # does not apply (e.g. a training statistic of the base model)


def finite(value: Any) -> float | None:
    """A finite float, or None (for None, nan, inf and anything not numeric)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond a float's range
        return None
    return number if math.isfinite(number) else None


def fmt(value: Any, *, signed: bool = False) -> str:
    """The one number format of the report: 3 significant figures, whole numbers from 100 up, ``n/a`` for
    missing or non-finite values; ``signed`` puts a ``+`` in front of positive values (for differences)."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        text = str(int(value))
        return "+" + text if signed and value > 0 else text
    number = finite(value)
    if number is None:
        return NA
    if number == 0.0:
        return "0"
    text = f"{number:.0f}" if abs(number) >= 99.95 else f"{number:.3g}"
    return "+" + text if signed and number > 0 else text


def json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_value(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite(value)
    return value


# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Cell:
    """One table cell: the text every output shows and the raw value ``report.json`` keeps next to it."""

    text: str
    value: Any = None
    numeric: bool = False


def num(value: Any, *, signed: bool = False) -> Cell:
    return Cell(fmt(value, signed=signed), json_value(value), True)


def text(value: str) -> Cell:
    return Cell(str(value), str(value), False)


def dash() -> Cell:
    return Cell(NOT_APPLICABLE, None, True)


def missing() -> Cell:
    return Cell(NA, None, True)


def agreement_cell(share: float, steps: int, unit: tuple[str, str] = ("step", "steps")) -> Cell:
    """A sign agreement with the number of steps (``unit``: what is counted, singular and plural; a TRL run's log
    entries) it counts: 0.5 of 4 steps is not 0.5 of 170."""
    return Cell(f"{fmt(share)} of {steps} {unit[0] if steps == 1 else unit[1]}", json_value(share), True) if steps else missing()


@dataclass
class Table:
    """A formatted table; :meth:`to_markdown`, :meth:`to_html` and :meth:`to_json` render the same cells."""

    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    title: str = ""

    def add(self, cells: list[Cell]) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table '{self.title}': {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(cells)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [{c: cell.text for c, cell in zip(self.columns, row)} for row in self.rows],
            "values": [{c: cell.value for c, cell in zip(self.columns, row)} for row in self.rows],
        }

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(md_escape(c) for c in self.columns) + " |"]
        numeric = [bool(self.rows) and all(row[i].numeric for row in self.rows) for i in range(len(self.columns))]
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(md_escape(cell.text) for cell in row) + " |")
        return "\n".join(lines)

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f'<td class="{"num" if cell.numeric else "txt"}">{html.escape(cell.text)}</td>' for cell in row) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~#&$])")  # & would start an entity, $ a formula (GitHub)
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_escape(value: str) -> str:
    """Markdown-safe text on one line: specials backslash-escaped, underscores escaped unless inside a word."""
    value = one_line(value)
    value = _MD_SPECIAL.sub(r"\\\1", value)
    return _MD_UNDERSCORE.sub(r"\\_", value)


def one_line(value: str) -> str:
    return str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "↵").replace("\t", "⇥")


# ------------------------------------------------------------------------------------------------ documents


@dataclass
class Paragraph:
    """Generated prose; spans between backticks are code (metric keys, commands)."""

    content: str


@dataclass
class Heading:
    content: str


@dataclass
class TableBlock:
    table: Table


@dataclass
class FigureBlock:
    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Any] = field(default_factory=list)

    def say(self, content: str) -> None:
        self.blocks.append(Paragraph(content))

    def table(self, table: Table) -> None:
        if table.title:
            self.blocks.append(Heading(table.title))
        self.blocks.append(TableBlock(table))


def build_section(section: Section, build: Callable[[Section], None], errors: dict[str, str]) -> Section:
    """``build(section)``; an error it raises is said in the section and recorded in ``errors`` under the section's
    anchor, so that one broken section does not take the report down."""
    try:
        build(section)
    except Exception as error:  # noqa: BLE001
        errors[section.anchor] = f"{type(error).__name__}: {error}"
        section.say(f"This section could not be generated: {type(error).__name__}: {error}")
    return section


def fork_context(fork: dict[str, Any]) -> str:
    """A fork token in its context on one line: ``…before⟦token⟧after…``."""
    before, token, after = (one_line(str(fork.get(key, ""))) for key in ("before", "token", "after"))
    return f"…{before}⟦{token}⟧{after}…"


def _paragraph_markdown(content: str) -> str:
    parts = content.split("`")
    return "".join(f"`{one_line(part)}`" if i % 2 else md_escape(part) for i, part in enumerate(parts))


def _paragraph_html(content: str) -> str:
    parts = content.split("`")
    return "".join(f"<code>{html.escape(part)}</code>" if i % 2 else html.escape(part) for i, part in enumerate(parts))


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {md_escape(title)}", ""]
    lines.append(" · ".join(f"[{md_escape(s.title)}](#{s.anchor})" for s in sections))
    lines.append("")
    for section in sections:
        lines += [f'<a id="{section.anchor}"></a>', "", f"## {md_escape(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                lines += [_paragraph_markdown(block.content), ""]
            elif isinstance(block, Heading):
                lines += [f"### {md_escape(block.content)}", ""]
            elif isinstance(block, TableBlock):
                lines += [block.table.to_markdown(), ""]
            elif isinstance(block, FigureBlock):
                lines += [f"![{md_escape(block.caption)}](figures/{block.name})", "", f"*{md_escape(block.caption)}*", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
nav a{margin-right:.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.txt{font-family:ui-monospace,Menlo,Consolas,monospace}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#555}
code{background:#f5f5f5;padding:0 .2em}
""".strip()


def render_html(title: str, sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{html.escape(title)}</h1>"]
    out.append("<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections) + "</nav>")
    for section in sections:
        out.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(f"<p>{_paragraph_html(block.content)}</p>")
            elif isinstance(block, Heading):
                out.append(f"<h3>{html.escape(block.content)}</h3>")
            elif isinstance(block, TableBlock):
                out.append(block.table.to_html())
            elif isinstance(block, FigureBlock):
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ figures


class Figures:
    """Draws with matplotlib's object API (no pyplot, no global backend change) into PNGs, which
    :func:`write_report_files` then writes into ``directory`` together with the report's text."""

    def __init__(self, directory: Path, enabled: bool = True, *, disabled_by: str = "write_report was called with figures=False"):
        self.directory = directory
        self.saved: dict[str, str] = {}  # name -> caption
        self.pngs: dict[str, bytes] = {}  # name -> the image, until written
        if not enabled:
            self.unavailable = f"figures were not drawn ({disabled_by})"
            return
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except ImportError as error:  # the report still has every table
            self.unavailable = f"figures were not drawn: matplotlib could not be imported ({error})"
        else:
            self.unavailable = None

    def draw(self, name: str, caption: str, width: float, height: float, paint: Callable[[Any], str | None]) -> FigureBlock | Paragraph:
        """Draw ``paint(figure)`` into ``name``; ``paint`` returns why there is nothing to plot, if so, which the report
        says instead of the figure."""
        if self.unavailable:
            return Paragraph(self.unavailable)
        import matplotlib
        from matplotlib.figure import Figure

        with matplotlib.rc_context({"font.size": 7, "axes.titlesize": 7.5, "legend.fontsize": 6, "axes.linewidth": 0.6,
                                    "lines.linewidth": 1.1}):
            figure = Figure(figsize=(width, height), layout="constrained")
            nothing_to_plot = paint(figure)
            if nothing_to_plot:
                return Paragraph(f"No figure {name}: {nothing_to_plot}.")
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
        png = buffer.getvalue()
        self.pngs[name] = png
        self.saved[name] = caption
        return FigureBlock(name, caption, png)


def write_report_files(out: Path, texts: dict[str, str], figures: Figures) -> None:
    """Write ``texts`` (file name -> content) into ``out`` and the PNGs ``figures`` drew into its folder as one set
    (:func:`entrorl._files.put_in_place_together`): a report that fails on the way (a full disk) or is interrupted
    leaves the previous one whole, its figures included, never a mix of the two. A figure of the previous report that
    this one did not draw stays as it was. A link at one of the report's files or at its figures' folder is replaced,
    not followed (a run directory received from someone else may hold one to a file of this user's elsewhere)."""
    figure_folder = os.path.relpath(figures.directory, out)
    files = {os.path.join(figure_folder, name): png for name, png in figures.pngs.items()}
    files.update({name: text.encode("utf-8", "backslashreplace") for name, text in texts.items()})  # a path not UTF-8
    with staging_folder(out, "report") as staging:
        (staging / figure_folder).mkdir()
        for name, content in files.items():
            try:
                (staging / name).write_bytes(content)
            except OSError as error:  # a full disk: the error names no file by itself
                raise naming_file(error, out / name, instead_of=staging / name) from None
        if figures.pngs:
            make_own_folder(figures.directory)
        put_in_place_together(staging, out, list(files), follow_links=False)


def power_of_ten(values) -> int:
    """The power of ten to divide ``values`` by so that their largest magnitude lies in [0.01, 10000); 0 when it
    already does (or none is finite and non-zero)."""
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))
    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes > 0)]
    if not magnitudes.size:
        return 0
    power = int(math.floor(math.log10(float(magnitudes.max()))))
    return power if not -2 <= power <= 3 else 0


def colours(names: list[str]) -> dict[str, Any]:
    try:
        import matplotlib
    except ImportError:
        return {}
    if len(names) <= 10:
        palette = matplotlib.colormaps["tab10"]
        return {name: palette(i) for i, name in enumerate(names)}
    palette = matplotlib.colormaps["tab20"]  # the strong shades first, then their light pairs
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {name: palette(order[i % 20]) for i, name in enumerate(names)}


def subplot_grid(figure, count: int, columns: int, **shared):
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    axes = figure.subplots(rows, columns, squeeze=False, **shared).ravel()
    for axis in axes[count:]:
        axis.set_visible(False)
    return axes[:count]

