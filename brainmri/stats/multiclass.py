"""N-class metrics (three or more classes) with 95% group-bootstrap intervals: per class and macro.

Per class (one-vs-rest): AUC, recall (sensitivity), precision, F1. Overall: macro one-vs-rest AUC, macro recall
(= balanced accuracy), macro precision and F1, accuracy, log loss, and the multi-class Brier score (mean over images
of the squared distance between the probability vector and the one-hot label, 0..2). The decision is the arg-max.
Values follow scikit-learn's definitions (tests/test_multiclass_metrics.py holds the bootstrap's fast arithmetic to
scikit-learn within 1e-12); the resampling is the same cluster bootstrap as two-class metrics
(brainmri.stats.metrics.group_resamples), so a patient's or a scan's copies come along together.
"""

from __future__ import annotations

import numpy as np

from brainmri.stats.metrics import _percentiles, _rank_auc, group_resamples

OVERALL = ("auc", "accuracy", "balanced_accuracy", "precision", "f1", "log_loss", "brier")  # macro where per class
PER_CLASS = ("auc", "recall", "precision", "f1")
EPS = 1e-7  # probabilities clipped before the log, as for two classes (a float32 softmax can give exactly 0)


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts: rows the actual class, columns the predicted class, in label order."""
    return np.bincount(np.asarray(y, int) * k + np.asarray(pred, int), minlength=k * k).reshape(k, k)


def _per_class(matrix: np.ndarray, y: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    """Each class's one-vs-rest AUC, recall, precision and F1 (NaN where undefined; F1 0 with no true positive)."""
    tp = np.diag(matrix).astype(float)
    actual, said = matrix.sum(axis=1).astype(float), matrix.sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, precision = tp / actual, tp / said
        f1 = np.where(tp > 0, 2 * tp / (actual + said), 0.0)
    auc = np.array([_rank_auc(y == c, prob[:, c]) for c in range(prob.shape[1])])
    return {"auc": auc, "recall": recall, "precision": precision, "f1": f1}


def point(y: np.ndarray, prob: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(overall metrics, per-class arrays) of labels `y` (n,) and probabilities `prob` (n, k), decided by arg-max."""
    y = np.asarray(y, int).reshape(-1)
    prob = np.asarray(prob, np.float64)
    k = prob.shape[1]
    matrix = confusion(y, prob.argmax(axis=1), k)
    per = _per_class(matrix, y, prob)
    clipped = np.clip(prob, EPS, 1 - EPS)
    onehot = np.eye(k)[y]
    overall = {
        "auc": float(np.nanmean(per["auc"])) if np.isfinite(per["auc"]).any() else float("nan"),
        "accuracy": float(np.trace(matrix) / max(1, len(y))),
        "balanced_accuracy": float(np.nanmean(per["recall"])),  # scikit-learn's: the mean recall of the classes present
        "precision": float(np.nanmean(np.where(matrix.sum(axis=0) > 0, per["precision"], 0.0))),  # sklearn: 0 for a class never said
        "f1": float(np.mean(per["f1"])),
        "log_loss": float(-np.mean(np.log(clipped[np.arange(len(y)), y] / clipped.sum(axis=1)))),
        "brier": float(np.mean(np.sum((prob - onehot) ** 2, axis=1))),
    }
    return overall, per


def with_intervals(y, prob, names: tuple[str, ...], n_boot: int, seed: int, groups: np.ndarray | None = None) -> dict:
    """{"overall": {metric: {value, ci_low, ci_high}}, "per_class": {class: {metric: {...}}}}: percentile intervals over
    `n_boot` resamples of the groups (of the images when `groups` is None). A resample missing a class is skipped:
    that class's one-vs-rest AUC and recall are undefined there."""
    y, prob = np.asarray(y, int).reshape(-1), np.asarray(prob, np.float64)
    k = prob.shape[1]
    overall, per = point(y, prob)
    draws_o = {m: [] for m in OVERALL}
    draws_c = {m: [[] for _ in range(k)] for m in PER_CLASS}
    for idx in group_resamples(groups, len(y), n_boot, seed):
        if len(np.unique(y[idx])) < k:
            continue
        o, c = point(y[idx], prob[idx])
        for m in OVERALL:
            draws_o[m].append(o[m])
        for m in PER_CLASS:
            for j in range(k):
                draws_c[m][j].append(c[m][j])
    cell = lambda v, d: {"value": round(float(v), 4), **dict(zip(("ci_low", "ci_high"), _percentiles(d), strict=True))}  # noqa: E731
    return {
        "overall": {m: cell(overall[m], draws_o[m]) for m in OVERALL},
        "per_class": {names[j]: {m: cell(per[m][j], draws_c[m][j]) for m in PER_CLASS} for j in range(k)},
        "resamples_used": len(draws_o["auc"]),
    }


def top_label_ece(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top label: |accuracy - mean confidence| over `bins` equal-mass bins of the
    arg-max probability, weighted by bin size (the two-class ECE's bins, on the confidence of the class said)."""
    y, prob = np.asarray(y, int).reshape(-1), np.asarray(prob, np.float64)
    if not len(y):
        return float("nan")
    conf, correct = prob.max(axis=1), (prob.argmax(axis=1) == y).astype(float)
    order = np.argsort(conf, kind="stable")
    return float(sum(len(b) * abs(correct[b].mean() - conf[b].mean()) for b in np.array_split(order, bins) if len(b)) / len(y))


def ece_if_calibrated(prob: np.ndarray, seed: int, draws: int = 500) -> dict[str, float]:
    """The top-label ECE a perfectly calibrated model would score on as many images: labels drawn from the model's own
    probabilities `draws` times (mean and 95th percentile), as for two classes."""
    prob = np.asarray(prob, np.float64)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    sims = [top_label_ece((rng.random((len(prob), 1)) > cum).sum(axis=1), prob) for _ in range(draws)]
    return {"mean": round(float(np.mean(sims)), 4), "p95": round(float(np.percentile(sims, 95)), 4), "draws": draws}


def macro_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present with both outcomes (scikit-learn's with every class present)."""
    aucs = [_rank_auc(y == c, prob[:, c]) for c in range(prob.shape[1])]
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def paired_auc_differences(y, probs: dict[str, np.ndarray], reference: str, groups, n_boot: int, seed: int) -> dict[str, dict]:
    """Per model, its macro AUC minus the `reference` model's on the same images and the same group resamples, with a
    95% interval (brainmri.stats.metrics.paired_auc_differences for N classes; resamples missing a class skipped)."""
    y = np.asarray(y, int).reshape(-1)
    k = next(iter(probs.values())).shape[1]
    draws: dict[str, list[float]] = {n: [] for n in probs}
    for idx in group_resamples(groups, len(y), n_boot, seed):
        if len(np.unique(y[idx])) < k:
            continue
        auc = {n: macro_auc(y[idx], v[idx]) for n, v in probs.items()}
        for n in probs:
            draws[n].append(auc[n] - auc[reference])
    out = {}
    for n, v in probs.items():
        lo, hi = _percentiles(draws[n])
        out[n] = {
            "value": round(macro_auc(y, v) - macro_auc(y, probs[reference]), 4),
            "ci_low": lo,
            "ci_high": hi,
            "resamples": len(draws[n]),
        }
    return out


def macro_roc(y: np.ndarray, prob: np.ndarray, grid: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """The macro-averaged one-vs-rest ROC curve: each class's true positive rate interpolated on one false positive
    rate grid, then averaged (as scikit-learn's ROC example does), over the classes present with both outcomes."""
    from sklearn.metrics import roc_curve

    fpr = np.linspace(0.0, 1.0, grid)
    tprs = []
    for c in range(prob.shape[1]):
        if 0 < np.sum(y == c) < len(y):
            f, t, _ = roc_curve(y == c, prob[:, c])
            tprs.append(np.interp(fpr, f, t))
    return fpr, (np.mean(tprs, axis=0) if tprs else np.full(grid, np.nan))
