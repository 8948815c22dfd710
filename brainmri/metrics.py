"""Binary classification metrics with 95% bootstrap intervals, and the decision threshold chosen on validation."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

POINT_METRICS = ("accuracy", "bce", "auc", "sensitivity", "specificity", "precision", "f1", "brier")


def fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
    """A metric for people: 'n/a' when it is undefined (None or NaN), e.g. sensitivity with no tumour images."""
    return "n/a" if value is None or value != value else format(value * scale, spec)


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1; among ties, the one nearest 0.5.

    It is placed midway between the validation score it admits and the next lower one, not on a score itself,
    so rounding-level differences (ONNX, another batch size) cannot flip a validation image.
    """
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, prob, drop_intermediate=False)
    thr = np.clip(thr, 0.0, 1.0)
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    mids = np.array([(thr[i] + thr[i + 1]) / 2 if i + 1 < len(thr) else thr[i] / 2 for i in best])
    return float(mids[np.argmin(np.abs(mids - 0.5))])


def confusion(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """2x2 counts: rows are the actual class, columns the predicted class, in the order (negative, positive)."""
    return skm.confusion_matrix(y, pred, labels=[0, 1])


def point(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    y = np.asarray(y, dtype=int)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    pred = (prob >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion(y, pred)
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    return {
        "accuracy": div(tp + tn, len(y)),
        "bce": float(skm.log_loss(y, prob, labels=[0, 1])),
        "auc": float(skm.roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan"),
        "sensitivity": sens,
        "specificity": div(tn, tn + fp),
        "precision": prec,
        "f1": div(2 * prec * sens, prec + sens) if tp else 0.0,
        "brier": float(np.mean((prob - y) ** 2)),
    }


def with_intervals(y: np.ndarray, prob: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict[str, dict]:
    """Each metric as {value, ci_low, ci_high}: percentile intervals over `n_boot` resamples of the images."""
    y, prob = np.asarray(y), np.asarray(prob)
    values = point(y, prob, threshold)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in POINT_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in point(y[idx], prob[idx], threshold).items():
            draws[k].append(v)
    out = {}
    for k in POINT_METRICS:
        d = np.asarray([v for v in draws[k] if not np.isnan(v)])
        lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (float("nan"), float("nan"))
        out[k] = {"value": round(values[k], 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)}
    return out
