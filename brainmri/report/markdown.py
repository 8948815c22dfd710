"""The report as Markdown: its lines and tables joined into one text."""

from __future__ import annotations

import pandas as pd


def md_table(frame: pd.DataFrame) -> str:
    """A pipe table, every cell as str() gives it."""
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def markdown_page(md: list) -> str:
    """The report's lines (Markdown strings and DataFrames) as one Markdown text."""
    return "\n".join(md_table(x) if isinstance(x, pd.DataFrame) else x for x in md)
