"""The report as one self-contained HTML page, rendered from the same lines as the Markdown."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right}"
    ".warning{background:#fff4e5;border-left:6px solid #d97706;padding:.6em 1em}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{font-size:12px;color:#555}"
)
WARNINGS = ("**SYNTHETIC", "**Too few images")  # paragraphs opening so are drawn as warnings (results.py, data_summary.py)


def html_element(line: str | pd.DataFrame, folder: Path) -> str | None:
    """One report line as HTML; None for what the page leaves out (blank lines, Markdown pipe tables)."""
    if isinstance(line, pd.DataFrame):
        return line.to_html(index=False, border=0, classes="results", escape=True)
    if line.startswith("# "):
        return f"<h1>{html.escape(line[2:])}</h1>"
    if line.startswith("## "):
        return f"<h2>{html.escape(line[3:])}</h2>"
    if line.startswith("### "):
        return f"<h3>{html.escape(line[4:])}</h3>"
    if line.startswith("!["):
        alt, src = line[2:].split("](")
        data = base64.b64encode((folder / src.rstrip(")")).read_bytes()).decode()
        cap = html.escape(alt)
        return f'<figure><img alt="{cap}" src="data:image/png;base64,{data}"><figcaption>{cap}</figcaption></figure>'
    if line.startswith("- "):
        return f"<li>{html.escape(line[2:]).replace('**', '')}</li>"
    if line.strip() and not line.startswith("|"):
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(line))
        return f'<p class="warning">{text}</p>' if line.startswith(WARNINGS) else f"<p>{text}</p>"
    return None


def html_page(md: list, folder: Path) -> str:
    """A self-contained page: the same content, images (PNGs in `folder`) inlined as data URIs."""
    body = [e for e in (html_element(line, folder) for line in md) if e is not None]
    head = f"<meta charset='utf-8'><title>Brain MRI results</title><style>{STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"
