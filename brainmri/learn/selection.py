"""Choices made by measurement on train+val only: the grid point (pooled out-of-fold AUC), the threshold rule
(cross-fitted pooled out-of-fold balanced accuracy), and the threshold that rule sets on the pooled out-of-fold
predictions.

N classes (notes/nclass_contract.md items 3 and 5): the grid point by the macro one-vs-rest AUC of the pooled
out-of-fold probabilities, their multi-class log loss beside it, under the two-class keys; no threshold rule, the
decision is the arg-max of the calibrated probabilities."""

from __future__ import annotations

import numpy as np

from brainmri.config import COPIES, Params
from brainmri.core.progress import log
from brainmri.learn import calibration, multiclass
from brainmri.learn.crossval import Fold, cv_folds, out_of_fold
from brainmri.learn.fitting import train_heads
from brainmri.stats.metrics import youden_threshold

CRITERION = "pooled out-of-fold AUC; ties go to the earlier grid point"
N_CLASS_CRITERION = (
    "pooled out-of-fold macro one-vs-rest AUC (cv_auc_pooled_out_of_fold; cv_bce_pooled_out_of_fold is the multi-class "
    "log loss); ties go to the earlier grid point"
)


def select(p: Params, name: str, grid: list[dict], cv_data, y, groups):
    """Cross-validate every grid point on train+val (grouped, stratified, the pipeline's folds and seed) and choose
    the one with the best pooled out-of-fold AUC; ties go to the earlier point. Test images are never read.
    Returns the chosen point, its folds and their trained heads, and the record of every point's scores."""
    spec = p.backbones[p.models[name].backbone]
    points = [spec.at(g) for g in grid]
    data = {layer: cv_data(layer) for layer in dict.fromkeys(g["feature_layer"] for g in grid)}
    runs = [
        cv_folds(p, name, data[b.feature_layer][0], y, groups, data[b.feature_layer][1] if g.get(COPIES, True) else {}, bb=b)
        for g, b in zip(grid, points, strict=True)
    ]
    jobs = [f.job for run in runs for f in run]
    results = iter(train_heads(p, name, jobs, [b for b, run in zip(points, runs, strict=True) for _ in run]))
    trained = [[next(results) for _ in run] for run in runs]
    scores = [_point_scores(p, name, g, run, data[g["feature_layer"]][0], y) for g, run in zip(grid, runs, strict=True)]
    best = max(range(len(grid)), key=lambda i: (np.nan_to_num(scores[i]["cv_auc_pooled_out_of_fold"], nan=-1.0), -i))
    record = {
        "protocol": (
            f"every grid point cross-validated on train+val only ({len(y)} images; grouped, stratified "
            f"{p.train.cv_folds}-fold, seed {p.seed}; each fold's head fitted as the final one); test never read"
        ),
        "criterion": CRITERION if p.ingest.binary else N_CLASS_CRITERION,
        "points": scores,
        "chosen": grid[best],
    }
    log.info("select %s: chose %s (pooled CV AUC %.3f)", name, _describe(grid[best]), scores[best]["cv_auc_pooled_out_of_fold"])
    return grid[best], runs[best], trained[best], record


def _point_scores(p: Params, name: str, g: dict, run: list[Fold], feats, y) -> dict:
    """Grid point `g` with the pooled out-of-fold AUC and log loss of its cross-validation `run` (for N classes the
    macro one-vs-rest AUC and the multi-class log loss)."""
    from sklearn.metrics import log_loss, roc_auc_score

    oof = out_of_fold(run, feats, len(y))
    if not p.ingest.binary:
        auc, bce = multiclass.macro_auc(y, oof), multiclass.log_loss(y, oof)
        log.info("select %s: %s -> pooled CV macro AUC %.3f, log loss %.3f", name, _describe(g), auc, bce)
        return {**g, "cv_auc_pooled_out_of_fold": round(auc, 4), "cv_bce_pooled_out_of_fold": round(bce, 4)}
    two = len(np.unique(y)) > 1
    auc = float(roc_auc_score(y, oof)) if two else float("nan")
    bce = float(log_loss(y, np.clip(oof, 1e-7, 1 - 1e-7), labels=[0, 1]))
    log.info("select %s: %s -> pooled CV AUC %.3f, log loss %.3f", name, _describe(g), auc, bce)
    return {**g, "cv_auc_pooled_out_of_fold": round(auc, 4), "cv_bce_pooled_out_of_fold": round(bce, 4)}


def _describe(g: dict) -> str:
    return ", ".join(f"{k} {v if v != '' else '(whole base)'}" for k, v in g.items())


def choose_rule(rules: list, fold: np.ndarray, oof: tuple[np.ndarray, np.ndarray], record: dict) -> tuple:
    """The threshold rule with the best pooled out-of-fold balanced accuracy, cross-fitted: each fold's images are
    labelled at the threshold the rule sets on the other folds' out-of-fold predictions, so no image helps set the
    threshold it is judged at. Chosen on raw outputs: calibration is monotone, so it changes no rule's labels.
    Ties go to the earlier rule."""
    from sklearn.metrics import balanced_accuracy_score

    y, prob = oof
    scores = []
    for rule in rules:
        labels = np.zeros(len(y), int)
        for k in np.unique(fold[fold >= 0]):
            held, rest = fold == k, (fold != k) & (fold >= 0)
            labels[held] = prob[held] >= (youden_threshold(y[rest], prob[rest]) if rule == "youden" else float(rule))
        scores.append({"rule": rule, "cv_balanced_accuracy_pooled_out_of_fold": round(float(balanced_accuracy_score(y, labels)), 4)})
    best = max(range(len(rules)), key=lambda i: (scores[i]["cv_balanced_accuracy_pooled_out_of_fold"], -i))
    log.info("select threshold rule: %s", ", ".join(f"{s['rule']} {s['cv_balanced_accuracy_pooled_out_of_fold']:.3f}" for s in scores))
    return rules[best], {**record, "threshold_rules": scores, "threshold_rule": rules[best]}


def threshold(rule, y: np.ndarray, prob: np.ndarray, cal: dict) -> float:
    """The final model's threshold: Youden's on calibrated probabilities `prob` of labels `y` (the pooled out-of-fold
    predictions over train+val, or val without cross-validation), or the fixed `rule` mapped through `cal`."""
    if rule == "youden":
        return youden_threshold(y, prob)
    # a fixed threshold is on the raw outputs' scale: mapped with them, it gives the labels it gave before
    return float(calibration.apply(float(rule), cal["a"], cal["c"]))
