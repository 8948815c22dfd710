"""What the train stage writes about a model: train.json's record, cv_predictions.csv's rows, and its summary line.

N classes (notes/nclass_contract.md item 3): train.json gains "classes" (label_names), "threshold" is null and
"threshold_rule" "argmax"; the train/val and CV figures keep their keys, with the macro one-vs-rest AUC, arg-max
accuracy and multi-class log loss under them; cv_predictions.csv has one probability column per class."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainmri.config import COPIES, GRID, Params, candidates
from brainmri.core.files import jsonable
from brainmri.intake.parts import Part
from brainmri.learn import calibration, features, multiclass
from brainmri.learn.fitting import ARGMAX, Trained
from brainmri.stats.metrics import point, with_intervals


def train_record(p: Params, name: str, net, run: Trained, parts: tuple[Part, Part, Part], cw, cal: dict, decision, scores) -> dict:
    """train.json: the model, its weights and data, its training, threshold (`decision`: it and what it was set on),
    settings and how they were chosen, its train and val figures (`scores`: the saved model's train and val
    probabilities, val a held-out check of the threshold), its calibration and CV."""
    tr, aug, va = parts
    bb, spec = run.bb, p.models[name]
    used = len(aug.paths) if run.copies else 0  # the augmented copies the final model fitted on
    settings = {k: getattr(bb, k) for k in GRID} | ({COPIES: run.copies} if COPIES in p.grid(name)[0] else {})
    out = {
        "model": name,
        "backbone": spec.backbone,
        "application": bb.application,
        "augment": bool(used),  # whether the final model used the copies (a list in models.<name>.augment: CV chose)
        "weights": {
            "kind": net.weights.kind,
            "path": net.weights.path,
            "sha256": net.weights.sha256,
            "origin": net.weights.origin,
            "description": net.weights.describe(),
        },
        # the frozen base's arithmetic for the cached features the head trained on (an end-to-end model: none cached)
        "feature_precision": "fp32" if net.end_to_end else features.precision(p),
        "n_train": len(tr.paths),
        "n_augmented": used,
        "n_val": len(va.paths),
        "class_weight": cw,
        "epochs_run": int(len(run.history)),
        "selected_epoch": int(run.best),
        **_decision(p, run, va, scores[1], decision),
        "settings": settings,
        "selection": run.selection or {"protocol": "single values in params: nothing chosen by measurement"},
        "train": _summary(p, tr.y, scores[0], decision[0]),
        "val": _summary(p, va.y, scores[1], decision[0]),
        "calibration": cal,
        "cv": run.cv,  # of the heads before calibration (AUC does not change under a monotone map; BCE does)
    }  # no timings here: evaluate and export depend on this file, and it must only change when the model does
    return jsonable(out)


def _decision(p: Params, run: Trained, va: Part, p_val: np.ndarray, decision) -> dict:
    """train.json's decision keys: the threshold, its rule, how the rule was chosen, what it was set on and its check on
    val (two classes); for N classes the class names and the arg-max, with no threshold."""
    threshold, set_on = decision
    if not p.ingest.binary:
        return {
            "classes": list(p.ingest.label_names),
            "threshold": None,
            "threshold_rule": ARGMAX,
            "threshold_rule_chosen_by": "N classes: the arg-max of the calibrated probabilities, no threshold",
            "threshold_set_on": None,
            "threshold_check_on_val": _val_check_n(va, p_val),
        }
    return {
        "threshold": round(threshold, 6),
        "threshold_rule": run.rule,
        "threshold_rule_chosen_by": _rule_chosen_by(p, run.selection),
        "threshold_set_on": set_on,
        "threshold_check_on_val": _val_check(p, va, p_val, threshold),
    }


def _val_check_n(va: Part, prob: np.ndarray) -> dict:
    """The arg-max decision's accuracy and balanced accuracy (the mean of the per-class recalls) on val, point
    figures: the group-bootstrap intervals of N-class metrics are evaluate's."""
    from sklearn.metrics import balanced_accuracy_score

    if not len(va.y):
        return {"n_images": 0}
    pred = np.argmax(prob, axis=1)
    return {
        "n_images": int(len(va.y)),
        "accuracy": round(float(np.mean(pred == va.y)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(va.y, pred)), 4),
    }


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


def _summary(p: Params, y, prob, threshold) -> dict:
    """Accuracy, log loss and AUC: at the threshold for two classes; arg-max, multi-class and macro one-vs-rest for N."""
    m = point(y, prob, threshold) if p.ingest.binary else multiclass.point(y, prob)
    return {k: round(m[k], 4) for k in ("accuracy", "bce", "auc")}


def cv_predictions(run: Trained, cal: dict, classes: tuple[str, ...] = ()) -> pd.DataFrame:
    """cv_predictions.csv, what the ensemble stage chooses members on: each image's out-of-fold probability, raw and
    calibrated (no rows for a model without CV). With N `classes`: `cv_predictions_n`."""
    if len(classes) > 2:
        return cv_predictions_n(run, cal, classes)
    if run.oof is None:
        return pd.DataFrame(columns=["image", "group", "label", "fold"]).assign(probability=[], calibrated=[])
    oof = run.oof[1]
    return run.per_image.assign(probability=np.round(oof, 6), calibrated=np.round(calibration.apply(oof, cal["a"], cal["c"]), 6))


def cv_predictions_n(run: Trained, cal: dict, classes: tuple[str, ...]) -> pd.DataFrame:
    """cv_predictions.csv for N classes: image, group, label, fold, then probability_<class> for each class (raw,
    out of fold) and calibrated_<class> for each (temperature `cal["T"]` applied), in label_names order."""
    raw_cols, cal_cols = [f"probability_{c}" for c in classes], [f"calibrated_{c}" for c in classes]
    if run.oof is None:
        return pd.DataFrame(columns=["image", "group", "label", "fold", *raw_cols, *cal_cols])
    oof = run.oof[1]
    mapped = calibration.apply_temperature(oof, cal["T"])
    cols = {**dict(zip(raw_cols, np.round(oof, 6).T, strict=True)), **dict(zip(cal_cols, np.round(mapped, 6).T, strict=True))}
    return run.per_image.assign(**cols)


def train_summary(out: dict, cv: dict | None, threshold: float | None) -> str:
    """The stage's one-line summary: selected epoch, val figures, threshold (N classes: the arg-max) and CV AUC."""
    decision = f"threshold {threshold:.3f}" if threshold is not None else "decision: arg-max (macro AUC)"
    return (
        f"selected epoch {out['selected_epoch']} of {out['epochs_run']}; val accuracy {out['val']['accuracy']:.3f}, "
        f"val AUC {out['val']['auc']:.3f}; {decision}"
        + (
            f"; CV AUC mean of folds {cv['model']['auc']['mean_of_folds']:.3f} +/- {cv['model']['auc']['sd_of_folds']:.3f}, "
            f"pooled out of fold {cv['model']['auc']['pooled_out_of_fold']:.3f}"
            if cv
            else ""
        )
    )
