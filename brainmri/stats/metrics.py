"""Binary classification metrics with 95% group-bootstrap intervals, paired model comparisons, and the threshold chosen on validation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn import metrics as skm

POINT_METRICS = ("accuracy", "bce", "auc", "sensitivity", "specificity", "precision", "f1", "brier")
INTERVAL_PARTS = (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))  # scores.json: key suffix, interval part


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
    auc = float(skm.roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan")
    return _from_counts(tp, fp, fn, tn, float(skm.log_loss(y, prob, labels=[0, 1])), auc, float(np.mean((prob - y) ** 2)))


def _from_counts(tp: int, fp: int, fn: int, tn: int, bce: float, auc: float, brier: float) -> dict[str, float]:
    """POINT_METRICS from the confusion counts and the three probability scores (NaN where a ratio is undefined)."""
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    return {
        "accuracy": div(tp + tn, tp + tn + fp + fn),
        "bce": bce,
        "auc": auc,
        "sensitivity": sens,
        "specificity": div(tn, tn + fp),
        "precision": prec,
        "f1": div(2 * prec * sens, prec + sens) if tp else 0.0,
        "brier": brier,
    }


def _fast_point(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """`point` in plain numpy, for the thousands of bootstrap resamples: scikit-learn's input checks cost ~5 ms a call,
    the arithmetic microseconds. The same definitions (tests/test_evaluate.py holds them to `point` within 1e-12):
    AUC as the Mann-Whitney statistic with ties counted half (what roc_auc_score's trapezoids sum to)."""
    y = np.asarray(y, dtype=int).reshape(-1)
    prob = np.clip(np.asarray(prob, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    pred = prob >= threshold
    pos = y == 1
    tp, fn = int(np.sum(pred & pos)), int(np.sum(~pred & pos))
    fp, tn = int(np.sum(pred & ~pos)), int(np.sum(~pred & ~pos))
    bce = float(-np.mean(np.where(pos, np.log(prob), np.log(1 - prob))))
    return _from_counts(tp, fp, fn, tn, bce, _rank_auc(pos, prob), float(np.mean((prob - y) ** 2)))


def _rank_auc(pos: np.ndarray, prob: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U over n_pos * n_neg, tied scores at their average rank; NaN with one class."""
    n_pos = int(np.sum(pos))
    n_neg = len(pos) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(prob, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]  # 1-based average ranks
    return float((np.sum(ranks[pos]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_resamples(groups: np.ndarray | None, n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Image indices of `n_boot` bootstrap resamples that draw whole duplicate groups with replacement.

    Copies of one scan are not independent test cases: resampling images would count a scan and its copy as two
    draws and give intervals that are too narrow. A group's images all come along. `groups` None makes every
    image its own group: the plain image bootstrap.
    Written by hand because scikit-learn's `resample` draws rows, not clusters; this is the cluster bootstrap.
    """
    inverse = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1 if n else 0)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picked = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[g] for g in picked]) if len(members) else np.arange(0)


def _percentiles(draws: list[float]) -> tuple[float, float]:
    d = np.asarray([v for v in draws if not np.isnan(v)])
    lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (float("nan"), float("nan"))
    return round(float(lo), 4), round(float(hi), 4)


def with_intervals(
    y: np.ndarray, prob: np.ndarray, threshold: float, n_boot: int, seed: int, groups: np.ndarray | None = None
) -> dict[str, dict]:
    """Each metric as {value, ci_low, ci_high}: percentile intervals over `n_boot` resamples of the duplicate groups
    (of the images when `groups` is None). Resamples holding one class only are skipped."""
    y, prob = np.asarray(y), np.asarray(prob)
    values = point(y, prob, threshold)
    draws = {k: [] for k in POINT_METRICS}
    for idx in group_resamples(groups, len(y), n_boot, seed):
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in _fast_point(y[idx], prob[idx], threshold).items():
            draws[k].append(v)
    out = {}
    for k in POINT_METRICS:
        lo, hi = _percentiles(draws[k])
        out[k] = {"value": round(values[k], 4), "ci_low": lo, "ci_high": hi}
    return out


def interval_scores(prefix: str, metrics: dict[str, dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Flat scores.json entries of metrics with intervals: `prefix` + metric + suffix for the value and both bounds."""
    return {f"{prefix}{k}{suffix}": metrics[k][part] for k in keys for suffix, part in INTERVAL_PARTS}


def _auc(y: np.ndarray, prob: np.ndarray) -> float:
    """ROC AUC for two classes, the value roc_auc_score gives (NaN with one class, where it raises), with a cheaper
    input check: over thousands of resamples scikit-learn's checks cost more than the AUC itself."""
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if not np.isfinite(prob).all():
        raise ValueError("AUC of non-finite scores (NaN or infinity)")
    return _rank_auc(np.asarray(y).reshape(-1) == 1, prob)


def paired_auc_differences(
    y: np.ndarray, probs: dict[str, np.ndarray], reference: str, groups: np.ndarray | None, n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per model, its AUC minus the `reference` model's on the same images, with a 95% group-bootstrap interval.

    Every model is scored on the same resamples, so what the images have in common cancels and the interval
    is that of the difference itself: it excludes 0 only when the gap is more than the luck of the draw.
    """
    y = np.asarray(y)
    names = list(probs)
    probs = {n: np.asarray(v) for n, v in probs.items()}
    draws: dict[str, list[float]] = {n: [] for n in names}
    for idx in group_resamples(groups, len(y), n_boot, seed):
        if len(np.unique(y[idx])) < 2:
            continue
        auc = {n: _auc(y[idx], probs[n][idx]) for n in names}
        for n in names:
            draws[n].append(auc[n] - auc[reference])
    out = {}
    for n in names:
        lo, hi = _percentiles(draws[n])
        out[n] = {"value": round(_auc(y, probs[n]) - _auc(y, probs[reference]), 4), "ci_low": lo, "ci_high": hi, "resamples": len(draws[n])}
    return out
