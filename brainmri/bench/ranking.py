"""Which runtime is faster at one batch size, and when two cannot be told apart (the tie rule)."""

from __future__ import annotations

TIGHT = 0.10  # an IQR within a tenth of the median is a precise measurement: two such whose quartiles overlap are tied


def ranking(rows: list[dict], batch: int) -> dict:
    """The runtimes at one batch size, fastest first by median. Two neighbours are told apart when the slower one's
    25th percentile lies above the faster one's 75th. When their quartiles overlap but both spreads are narrow
    (IQR within TIGHT of the median), they are `tied`: measured well, equally fast. Otherwise they are
    `not_told_apart`, and the batch size is not rankable: the spread is too wide."""
    at = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["p50_ms"])
    tied, mixed = [], []
    for a, b in zip(at, at[1:], strict=False):
        if b["p25_ms"] <= a["p75_ms"]:
            narrow = all(r["p75_ms"] - r["p25_ms"] <= TIGHT * r["p50_ms"] for r in (a, b))
            (tied if narrow else mixed).append([a["runtime"], b["runtime"]])
    return {"fastest_first": [r["runtime"] for r in at], "tied": tied, "not_told_apart": mixed, "rankable": not mixed, "tie_iqr": TIGHT}
