"""Figures of N-class probabilities (n, K), columns in ingest's label_names order: macro one-vs-rest AUC, multi-class
log loss and arg-max accuracy. What cross-validation, selection, calibration and train.json use for N classes where
a two-class model uses brainmri.stats.metrics.point (contract: notes/nclass_contract.md items 2, 3 and 5)."""

from __future__ import annotations

import numpy as np

EPS = 1e-7  # probabilities clipped to [EPS, 1] before a log: float32 softmax outputs can be exactly 0


def macro_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Macro one-vs-rest AUC (scikit-learn's, labels 0..K-1); NaN when some class has no image in `y`, where the
    class's one-vs-rest AUC is undefined (as a two-class AUC is NaN with one class)."""
    from sklearn.metrics import roc_auc_score

    y, prob = np.asarray(y).astype(int), np.asarray(prob, np.float64)
    k = prob.shape[1]
    if len(np.unique(y)) < k:
        return float("nan")
    prob = prob / prob.sum(axis=1, keepdims=True)  # scikit-learn checks that rows sum to 1; float32 rows miss by 1e-7
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(k))))


def log_loss(y: np.ndarray, prob: np.ndarray, sample_weight=None) -> float:
    """Multi-class log loss (natural log, weighted mean over images), probabilities clipped at EPS."""
    from sklearn.metrics import log_loss as sk_log_loss

    prob = np.clip(np.asarray(prob, np.float64), EPS, 1.0)
    prob = prob / prob.sum(axis=1, keepdims=True)
    return float(sk_log_loss(np.asarray(y).astype(int), prob, sample_weight=sample_weight, labels=list(range(prob.shape[1]))))


def accuracy(y: np.ndarray, prob: np.ndarray) -> float:
    """The share of images whose arg-max class is their label (the N-class decision, contract item 3)."""
    return float(np.mean(np.argmax(prob, axis=1) == np.asarray(y).astype(int))) if len(y) else float("nan")


def point(y: np.ndarray, prob: np.ndarray) -> dict:
    """{"auc", "accuracy", "bce"} as brainmri.stats.metrics.point gives for two classes: "auc" is the macro one-vs-rest
    AUC and "bce" the multi-class log loss, under the same keys so that readers of train.json need no change."""
    return {"auc": macro_auc(y, prob), "accuracy": accuracy(y, prob), "bce": log_loss(y, prob)}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so that no exponential overflows."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
