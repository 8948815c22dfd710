"""What the train stage writes about a model: train.json's record, cv_predictions.csv's rows, and its summary line."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainmri.config import GRID, Params, candidates
from brainmri.core.files import jsonable
from brainmri.intake.parts import Part
from brainmri.learn import calibration
from brainmri.learn.fitting import Trained
from brainmri.stats.metrics import point, with_intervals


def train_record(p: Params, name: str, net, run: Trained, parts: tuple[Part, Part, Part], cw, cal: dict, decision, scores) -> dict:
    """train.json: the model, its weights and data, its training, threshold (`decision`: it and what it was set on),
    settings and how they were chosen, its train and val figures (`scores`: the saved model's train and val
    probabilities, val a held-out check of the threshold), its calibration and CV."""
    tr, aug, va = parts
    threshold, set_on = decision
    bb, spec = run.bb, p.models[name]
    out = {
        "model": name,
        "backbone": spec.backbone,
        "application": bb.application,
        "augment": spec.augment,
        "weights": {
            "kind": net.weights.kind,
            "path": net.weights.path,
            "sha256": net.weights.sha256,
            "origin": net.weights.origin,
            "description": net.weights.describe(),
        },
        "n_train": len(tr.paths),
        "n_augmented": len(aug.paths),
        "n_val": len(va.paths),
        "class_weight": cw,
        "epochs_run": int(len(run.history)),
        "selected_epoch": int(run.best),
        "threshold": round(threshold, 6),
        "threshold_rule": run.rule,
        "threshold_rule_chosen_by": _rule_chosen_by(p, run.selection),
        "threshold_set_on": set_on,
        "threshold_check_on_val": _val_check(p, va, scores[1], threshold),
        "settings": {k: getattr(bb, k) for k in GRID},
        "selection": run.selection or {"protocol": "single values in params: nothing chosen by measurement"},
        "train": _summary(tr.y, scores[0], threshold),
        "val": _summary(va.y, scores[1], threshold),
        "calibration": cal,
        "cv": run.cv,  # of the heads before calibration (AUC does not change under a monotone map; BCE does)
    }  # no timings here: evaluate and export depend on this file, and it must only change when the model does
    return jsonable(out)


def _val_check(p: Params, va: Part, prob: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity and balanced accuracy on val at the threshold set elsewhere, with 95% group-bootstrap
    intervals: val's images helped set neither the threshold nor the settings of a cross-validated model."""
    m = with_intervals(va.y, prob, threshold, p.train.bootstrap, p.seed, va.frame["group"].to_numpy())
    return {"n_images": int(len(va.y)), **{k: m[k] for k in ("sensitivity", "specificity", "balanced_accuracy") if k in m}}


def _rule_chosen_by(p: Params, selection: dict | None) -> str:
    if selection and "threshold_rules" in selection:
        return "cross-fitted pooled out-of-fold balanced accuracy over train+val (selection.threshold_rules)"
    if len(candidates(p.train.threshold)) > 1:
        return "train.threshold's first rule: this model has no cross-validation to choose by"
    return "params (one rule)"


def _summary(y, prob, threshold) -> dict:
    m = point(y, prob, threshold)
    return {k: round(m[k], 4) for k in ("accuracy", "bce", "auc")}


def cv_predictions(run: Trained, cal: dict) -> pd.DataFrame:
    """cv_predictions.csv, what the ensemble stage chooses members on: each image's out-of-fold probability, raw and
    calibrated (no rows for a model without CV)."""
    if run.oof is None:
        return pd.DataFrame(columns=["image", "group", "label", "fold"]).assign(probability=[], calibrated=[])
    oof = run.oof[1]
    return run.per_image.assign(probability=np.round(oof, 6), calibrated=np.round(calibration.apply(oof, cal["a"], cal["c"]), 6))


def train_summary(out: dict, cv: dict | None, threshold: float) -> str:
    """The stage's one-line summary: selected epoch, val figures, threshold and CV AUC."""
    return (
        f"selected epoch {out['selected_epoch']} of {out['epochs_run']}; val accuracy {out['val']['accuracy']:.3f}, "
        f"val AUC {out['val']['auc']:.3f}; threshold {threshold:.3f}"
        + (
            f"; CV AUC mean of folds {cv['model']['auc']['mean_of_folds']:.3f} +/- {cv['model']['auc']['sd_of_folds']:.3f}, "
            f"pooled out of fold {cv['model']['auc']['pooled_out_of_fold']:.3f}"
            if cv
            else ""
        )
    )
