"""Table cells shared by the report's sections: a metric with its 95% interval."""

from __future__ import annotations

from brainmri.stats.metrics import fmt


def ci(m: dict, pct: bool = True) -> str:
    """'value [low, high]': in percent to one decimal, or (pct=False) as a fraction to three."""
    scale, spec = (100.0, ".1f") if pct else (1.0, ".3f")
    return f"{fmt(m['value'], spec, scale)} [{fmt(m['ci_low'], spec, scale)}, {fmt(m['ci_high'], spec, scale)}]"
