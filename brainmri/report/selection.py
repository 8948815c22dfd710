"""The report's 'Settings, and how they were chosen': each model's grid point and int8 settings (never chosen on test)."""

from __future__ import annotations

import json

import pandas as pd

from brainmri.config import Params


def _settings_row(p: Params, name: str, t: dict) -> dict:
    """One model's chosen settings, from its train metrics `t` and its export metrics."""
    settings, sel = t.get("settings") or {}, t.get("selection") or {}
    points = sel.get("points") or []
    chosen_auc = next((pt["cv_auc_pooled_out_of_fold"] for pt in points if all(pt[k] == v for k, v in settings.items())), None)
    export_file = p.model_file("export", name, "export_metrics")
    int8 = json.loads(export_file.read_text()).get("int8", {}) if export_file.is_file() else {}
    i8 = int8.get("settings") or {}
    return {
        "Model": name,
        "Feature layer": (settings.get("feature_layer") or "whole base") if settings else "",
        "Learning rate": settings.get("learning_rate", ""),
        "Dropout": settings.get("dropout", ""),
        "Epochs": settings.get("epochs", ""),
        "Threshold rule": t.get("threshold_rule", ""),
        "Grid points": len(points) or 1,
        "Chosen point's pooled CV AUC": f"{chosen_auc:.3f}" if chosen_auc is not None else "n/a",
        "int8 (chosen on val)": f"{i8.get('calibration_method', '')}, reduce_range {i8.get('reduce_range', '')}" if i8 else "n/a",
    }


def selection_section(p: Params, trained: dict) -> list:
    """Which settings each model was trained and quantized with, and how they were chosen (never on test)."""
    rows = [_settings_row(p, name, trained[name]) for name in p.models]
    return [
        "### Settings, and how they were chosen",
        "",
        "Lists in `params.yaml` are grids: every point is cross-validated on train+val only (grouped, stratified folds; "
        "each fold's head fitted as the final one) and the best pooled out-of-fold AUC wins; the threshold rule is chosen "
        "the same way, by pooled out-of-fold balanced accuracy with each fold's threshold set on its inner validation part. "
        "The final head trains on train; val sets its threshold and, with the CV predictions, its calibration. The int8 "
        "file is the candidate closest to fp32 on the validation images. The chosen point's CV AUC is the best of its "
        "grid, so it is biased upwards; the test figures above are not, because test played no part in any choice made "
        "here. Values given as single numbers in params were set by hand beforehand (some, such as 100 epochs without "
        "early stopping, after a cross-validation of an earlier protocol that included the test images).",
        "",
        pd.DataFrame(rows),
        "",
    ]
