"""The report's 'Settings, and how they were chosen': each model's grid point and int8 settings (never chosen on test)."""

from __future__ import annotations

import json

import pandas as pd

from brainmri.config import Params


def _settings_row(p: Params, name: str, t: dict) -> dict:
    """One model's chosen settings, from its train metrics `t` and its export metrics."""
    settings, sel = t.get("settings") or {}, t.get("selection") or {}
    points = sel.get("points") or []
    chosen_auc = next((pt["cv_auc_pooled_out_of_fold"] for pt in points if all(pt.get(k) == v for k, v in settings.items())), None)
    export_file = p.model_file("export", name, "export_metrics")
    int8 = json.loads(export_file.read_text()).get("int8", {}) if export_file.is_file() else {}
    i8 = int8.get("settings") or {}
    unused = "–" if settings.get("dense") == 0 else None  # a linear head is fitted to convergence: no rate, dropout or epochs
    return {
        "Model": name,
        "Feature layer": (settings.get("feature_layer") or "whole base") if settings else "",
        "Learning rate": unused or settings.get("learning_rate", ""),
        "Dropout": unused or settings.get("dropout", ""),
        "Epochs": unused or settings.get("epochs", ""),
        "Head": ("linear" if settings.get("dense") == 0 else f"{settings.get('dense')} units") if "dense" in settings else "",
        "Penalty": _penalty(settings),
        "Augmented copies": _copies(t),
        "Threshold rule": t.get("threshold_rule", ""),
        "Threshold set on": t.get("threshold_set_on", "val"),
        "Val check: sensitivity / specificity [95% CI]": _val_check(t.get("threshold_check_on_val")),
        "Grid points": len(points) or 1,
        "Chosen point's pooled CV AUC": f"{chosen_auc:.3f}" if chosen_auc is not None else "n/a",
        "int8 (chosen on val)": f"{i8.get('calibration_method', '')}, reduce_range {i8.get('reduce_range', '')}" if i8 else "n/a",
    }


def _penalty(settings: dict) -> str:
    """A linear head's inverse penalty C (scikit-learn's), or a hidden layer's L2 per unit of mean loss."""
    if "dense" not in settings:
        return ""
    return f"C {settings.get('linear_c', '')}" if settings["dense"] == 0 else f"L2 {settings.get('l2', '')}"


def _copies(t: dict) -> str:
    """Whether the model trained with the augmented copies, and whether CV chose that (the model offered both)."""
    used = "with" if t.get("augment") else "without"
    return f"{used} (chosen by CV)" if "augment" in (t.get("settings") or {}) else used


def _val_check(check: dict | None) -> str:
    if not check:
        return "n/a"
    if "sensitivity" not in check:  # N classes: the arg-max on val (no threshold to check)
        return f"accuracy {check['accuracy']:.2f}, balanced {check['balanced_accuracy']:.2f} ({check['n_images']} images)"
    return " / ".join(f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" for m in (check["sensitivity"], check["specificity"]))


def selection_section(p: Params, trained: dict) -> list:
    """Which settings each model was trained and quantized with, and how they were chosen (never on test)."""
    rows = [_settings_row(p, name, trained[name]) for name in p.models]
    return [
        "### Settings, and how they were chosen",
        "",
        "Where each number was set. **Train+val, by cross-validation** (grouped, stratified folds; each fold's head "
        "fitted as the final one): every grid point of `params.yaml` (feature layer, head: linear or hidden layer, its "
        "penalty, learning rate, dropout, epochs; with or without the augmented copies where a model offers both), by "
        "pooled out-of-fold AUC; the threshold rule, by cross-fitted pooled "
        "out-of-fold balanced accuracy; the calibration map and the threshold itself, on the pooled out-of-fold "
        "predictions. **Train**: the final head's weights. **Val**: the int8 file (the candidate closest to fp32) and the "
        "held-out check of the threshold in the last column; a model without cross-validation (the reference CNN) "
        "sets its calibration and threshold on val. **Test**: nothing; it was read only to produce the figures above. "
        "The chosen point's CV AUC is the best of its grid, so biased upwards; its seed spread and the test figures are not.",
        "",
        pd.DataFrame(rows),
        "",
    ]
