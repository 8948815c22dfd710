"""The report's 'Calibrated probabilities': each model's calibration map, its ECE before and after, and its reliability
diagram."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.report.plots import reliability_figure, save


def _map_text(cal: dict) -> str:
    """The map's name and its fitted parameters."""
    return cal["method"] + {"temperature": f" (T = {1 / cal['a']:.2f})", "platt": f" (a = {cal['a']:.2f}, c = {cal['c']:+.2f})"}.get(
        cal["method"], ""
    )


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
                "Fitted on": cal["fitted_on"],
                "ECE before": f"{cal['ece_before']:.3f}",
                "ECE after": f"{cal['ece_after']:.3f}",
                "Log loss before -> after": f"{cal['bce_before']:.3f} -> {cal['bce_after']:.3f}",
                "Test ECE (after)": f"{evaluated[name].get('calibration', {}).get('ece_test', float('nan')):.3f}",
                "Test ECE if perfectly calibrated: mean (95th pct)": _chance(evaluated[name].get("calibration", {})),
            }
        )
        tables[name] = (cal["reliability_before"], cal["reliability_after"], cal["fitted_on"])
    if not rows:
        return []
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
        "![Reliability diagrams before (red) and after (blue) calibration](reliability.png)",
        "",
    ]


def _chance(cal: dict) -> str:
    """The ECE a perfectly calibrated model would score on the test images (simulated), for reading the measured one."""
    c = cal.get("ece_if_perfectly_calibrated")
    return f"{c['mean']:.3f} ({c['p95']:.3f})" if c else "n/a"
