"""The report: sections (claim, measurement, verdict) rendered to Markdown and to one
self-contained HTML page (images inline as base64, no network)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path  # a PNG written by the experiment
    caption: str


@dataclass
class Text:
    markdown: str  # paragraphs; **bold** and `code` are rendered in HTML too


Block = Table | Figure | Text


@dataclass
class Section:
    name: str  # the experiment's name, also the anchor
    title: str
    claim: str  # the chapter's claim or question
    verdict: str  # computed from the comparisons' CIs
    blocks: list[Block] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)  # its entries of verdicts.json


def _cell(text: str) -> str:
    """A Markdown table cell: a literal | would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in t.rows]
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return "\n".join(lines)


def render_markdown(title: str, preamble: str, sections: list[Section], out_dir: Path) -> str:
    parts = [f"# {title}", "", preamble, "", "## Contents", ""]
    parts += [f"{i}. [{s.title}](#{s.name})" for i, s in enumerate(sections, 1)]
    for i, s in enumerate(sections, 1):
        parts += [
            "",
            f'<a id="{s.name}"></a>',
            f"## {i}. {s.title}",
            "",
            f"**Claim.** {s.claim}",
            "",
        ]
        for b in s.blocks:
            if isinstance(b, Table):
                parts += [_md_table(b), ""]
            elif isinstance(b, Figure):
                rel = (
                    Path(b.path).resolve().relative_to(out_dir.resolve())
                    if Path(b.path).resolve().is_relative_to(out_dir.resolve())
                    else b.path
                )
                parts += [f"![{b.caption}]({rel})", "", f"*Figure: {b.caption}*", ""]
            else:
                parts += [b.markdown, ""]
        parts += [f"**Verdict.** {s.verdict}"]
    return "\n".join(parts) + "\n"


def _inline_md(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*", r"<i>\1</i>", out)


def render_html(title: str, preamble: str, sections: list[Section]) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "line-height:1.5;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        ".wrap{overflow-x:auto}th{background:#f4f4f4}"
        "td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}"
        "figcaption{font-size:.9em;color:#555}.claim{background:#f6f8fa;padding:.6em 1em}"
        ".verdict{border-left:4px solid #2a7;padding:.4em 1em}code{background:#f0f0f0}"
    )
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f"<p>{_inline_md(p)}</p>" for p in preamble.split("\n\n") if p.strip()]
    body.append("<h2>Contents</h2><ol>")
    body += [f'<li><a href="#{s.name}">{html.escape(s.title)}</a></li>' for s in sections]
    body.append("</ol>")
    for i, s in enumerate(sections, 1):
        body.append(f'<h2 id="{s.name}">{i}. {html.escape(s.title)}</h2>')
        body.append(f'<p class="claim"><b>Claim.</b> {_inline_md(s.claim)}</p>')
        for b in s.blocks:
            if isinstance(b, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
                rows = "".join(
                    "<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>"
                    for r in b.rows
                )
                cap = f"<caption>{_inline_md(b.caption)}</caption>" if b.caption else ""
                body.append(f'<div class="wrap"><table>{cap}<tr>{head}</tr>{rows}</table></div>')
            elif isinstance(b, Figure):
                data = base64.b64encode(Path(b.path).read_bytes()).decode()
                body.append(
                    f'<figure><img alt="{html.escape(b.caption)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>Figure: '
                    f"{_inline_md(b.caption)}</figcaption></figure>"
                )
            else:
                body += [f"<p>{_inline_md(p)}</p>" for p in b.markdown.split("\n\n") if p.strip()]
        body.append(f'<p class="verdict"><b>Verdict.</b> {_inline_md(s.verdict)}</p>')
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{css}</style></head><body>{''.join(body)}</body></html>\n"
    )
