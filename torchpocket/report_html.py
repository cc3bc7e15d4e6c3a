"""``report.html``: the run's ``report.md`` as one self-contained page (images inlined as ``data:`` URIs).

It renders the Markdown subset that :mod:`torchpocket.report` writes: ``#`` / ``##`` headings, pipe tables
(right-aligned where the separator says ``---:``), ``-`` bullet lists, image lines ``![alt](file.png)``,
paragraphs, and inline ``**bold**`` and ```code```. Anything else is kept as escaped text, so a page never
carries markup it was not meant to.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from torchpocket.utils import atomic_write_text

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_STYLE = """body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem}
th{background:#f3f3f3}td.r,th.r{text-align:right}img{max-width:100%;display:block;margin:1rem 0}
code{background:#f3f3f3;padding:0 .2rem}"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[str]) -> list[str]:
    head, body = _cells(rows[0]), rows[1:]
    right: list[bool] = [False] * len(head)
    if body and set(body[0].replace("|", "").replace(" ", "")) <= set("-:"):
        right = [c.endswith(":") for c in _cells(body[0])]
        body = body[1:]

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(
            f'<{tag}{" class=r" if i < len(right) and right[i] else ""}>{_inline(c)}</{tag}>'
            for i, c in enumerate(cells)) + "</tr>"

    return ["<table>", row(head, "th"), *(row(_cells(r), "td") for r in body), "</table>"]


def _image(alt: str, src: str, base: Path) -> str:
    path = base / src
    if path.suffix.lower() == ".png" and path.is_file():
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">'


def markdown_to_html(text: str, *, base: Path, title: str) -> str:
    """The page for ``text`` (Markdown as :func:`torchpocket.report.write_report` writes it); images are
    read from ``base`` and inlined."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += _table(lines[i:j])
            i = j
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
        elif m := re.match(r"^(#{1,3}) (.*)$", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif m := _IMAGE.match(line):
            out.append(_image(m.group(1), m.group(2), base))
            i += 1
        else:
            out.append(f"<p>{_inline(line)}</p>")
            i += 1
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(out) + "\n</body></html>\n")


def write_html(report_md: Path) -> Path:
    """Write ``report.html`` beside ``report_md`` and return its path."""
    text = report_md.read_text()
    first = text.splitlines()[0] if text else ""
    title = first[2:] if first.startswith("# ") else "torchpocket report"
    path = report_md.with_suffix(".html")
    atomic_write_text(path, markdown_to_html(text, base=report_md.parent, title=title))
    return path
