"""The report's 'Plots' section: every model's ROC curve, confusion matrix and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest
from brainmri.report.plots import confusion_grid, curves_figure, roc_figure, save
from brainmri.stats.multiclass import macro_roc
from brainmri.stats.multiclass_evaluation import probability_columns


def draw_model_plots(p: Params, evaluated: dict, out: Path) -> None:
    """roc.png, training_curves.png and confusion_matrices.png into `out`, from each model's evaluation and history."""
    curves = {}
    for name in p.models:
        if p.ingest.binary:
            roc = pd.read_csv(p.model_file("eval", name, "roc"))
            curves[name] = (roc["fpr"], roc["tpr"], evaluated[name]["test"]["auc"]["value"])
        else:  # one macro-averaged one-vs-rest curve per model, from its test predictions
            preds = read_manifest(p.model_file("eval", name, "predictions"))
            prob = preds[probability_columns(p.ingest.label_names)].to_numpy(float)
            curves[name] = (*macro_roc(p.ingest.label_index(preds["actual"]), prob), evaluated[name]["test"]["auc"]["value"])
    save(roc_figure(curves), out / "roc.png")
    save(curves_figure({n: pd.read_csv(p.model_file("models", n, "history")) for n in p.models}), out / "training_curves.png")
    matrices = {n: pd.DataFrame(json.loads(p.model_file("eval", n, "confusion").read_text())["matrix"]).to_numpy() for n in p.models}
    if p.ingest.binary:
        neg, pos = p.ingest.negative_class, p.ingest.positive_class
        names = (f"{neg}\n(no tumour)", f"{pos}\n(tumour)")
    else:
        names = p.ingest.label_names
    save(confusion_grid(matrices, names), out / "confusion_matrices.png")


PLOTS_SECTION = [
    "## Plots",
    "",
    "![ROC curves](roc.png)",
    "",
    "![Confusion matrices (rows: actual, columns: predicted)](confusion_matrices.png)",
    "",
    "![Training curves (dotted: selected epoch)](training_curves.png)",
    "",
]
