"""The report's 'Calibrated probabilities': each model's calibration map, its ECE before and after, and its reliability
diagram."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.report.plots import reliability_figure, save


def _map_text(cal: dict) -> str:
    """The map's name and its fitted parameters (an N-class temperature records T itself)."""
    if cal["method"] == "temperature":
        return f"temperature (T = {cal['T'] if 'T' in cal else 1 / cal['a']:.2f})"
    return cal["method"] + (f" (a = {cal['a']:.2f}, c = {cal['c']:+.2f})" if cal["method"] == "platt" else "")


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def calibration_section(p: Params, trained: dict, evaluated: dict, out: Path) -> list:
    """ECE before and after each model's calibration map, and its reliability diagram (drawn into `out`)."""
    rows, tables = [], {}
    for name in p.models:
        cal = trained[name].get("calibration")
        if not cal:
            continue
        rows.append(
            {
                "Model": name,
                "Map": _map_text(cal),
                "Fitted on": cal.get("fitted_on", "n/a"),
                "ECE before": _num(cal.get("ece_before")),
                "ECE after": _num(cal.get("ece_after")),
                "Log loss before -> after": f"{_num(cal.get('bce_before'))} -> {_num(cal.get('bce_after'))}",
                "Test ECE (after)": _num(_test_ece(evaluated[name].get("calibration", {}))),
                "Test ECE if perfectly calibrated: mean (95th pct)": _chance(evaluated[name].get("calibration", {})),
            }
        )
        if "reliability_before" in cal:  # two classes: reliability diagrams of P(positive)
            tables[name] = (cal["reliability_before"], cal["reliability_after"], cal["fitted_on"])
    if not rows:
        return []
    if tables:
        save(reliability_figure(tables), out / "reliability.png")
    return [
        "## Calibrated probabilities",
        "",
        f"Each model's output is mapped by `train.calibration` ({p.train.calibration}), fitted on held-out predictions, never on "
        "test, and folded into its output layer, so the exported model and `predict` give the calibrated probability; the "
        "map is monotone, so ranking, AUC and labels do not change. ECE: expected calibration error over 10 equal-mass bins. "
        "'Before' and 'after' are on the predictions the map was fitted on (after is optimistic by the one or two "
        f"parameters fitted); the test figure is on {next(iter(evaluated.values()))['n_test']} images only, so it stands beside "
        "the ECE a perfectly calibrated model with the same probabilities would score there (labels drawn from those "
        "probabilities, 2,000 times): a test ECE within that range cannot tell calibrated from not.",
        "",
        pd.DataFrame(rows),
        "",
        *(["![Reliability diagrams before (red) and after (blue) calibration](reliability.png)", ""] if tables else []),
    ]


def _test_ece(evaluated_cal: dict):
    """The test ECE evaluate recorded: of P(positive) for two classes, of the most probable class's probability for N."""
    return evaluated_cal.get("ece_test", evaluated_cal.get("ece_test_top_label"))


def _chance(cal: dict) -> str:
    """The ECE a perfectly calibrated model would score on the test images (simulated), for reading the measured one."""
    c = cal.get("ece_if_perfectly_calibrated")
    return f"{c['mean']:.3f} ({c['p95']:.3f})" if c else "n/a"
