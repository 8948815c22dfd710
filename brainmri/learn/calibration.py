"""Calibrated probabilities: a monotone map of the model's logit, fitted on held-out predictions, folded into its output layer.

- `temperature`: p' = sigmoid(logit(p) / T), one parameter, fitted by minimising the log loss;
- `platt`: p' = sigmoid(a * logit(p) + c), scikit-learn's logistic regression on the logit, with Platt's targets;
- `none`: p' = p.

Each is sigmoid(a * z + c) on the logit z, and the output layer is a sigmoid Dense layer (z = w.h + b), so the layer's
kernel and bias absorb the map: w' = a w, b' = a b + c. The saved Keras model, the ONNX export and `predict` then all give
calibrated probabilities with no extra layer; train maps a fixed threshold through the same function (and sets
Youden's on the calibrated outputs), so no label changes.

N classes (notes/nclass_contract.md item 4): temperature scaling on the logits z = log p of the softmax outputs,
p' = softmax(z / T), T fitted by minimising the multi-class log loss of held-out probabilities. Softmax ignores a
shift common to a row's logits, so softmax(log p / T) = softmax((W h + b) / T), and the softmax Dense layer absorbs it:
W' = W / T, b' = b / T. A temperature changes no row's arg-max, so no N-class decision changes either.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

from brainmri.learn.outputs import BINARY_OUTPUT, MULTI_OUTPUT

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before the logit: a saturated float32 sigmoid gives exactly 0 or 1
OUTPUT_LAYER = BINARY_OUTPUT  # the sigmoid Dense layer of every two-class head (brainmri.learn.models.build_head)


def logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(prob, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit(prob: np.ndarray, y: np.ndarray, method: str) -> tuple[float, float]:
    """(a, c) of the map sigmoid(a * logit + c), fitted on held-out probabilities `prob` with labels `y`."""
    y = np.asarray(y).astype(int)
    if method == "none" or len(np.unique(y)) < 2:
        return 1.0, 0.0
    z = logit(prob)
    if method == "temperature":
        from scipy.optimize import minimize_scalar
        from sklearn.metrics import log_loss

        # the temperature on a log scale, between e^-4 and e^4: wide enough for any head here, and always positive
        res = minimize_scalar(lambda s: log_loss(y, expit(z * np.exp(-s)), labels=[0, 1]), bounds=(-4.0, 4.0), method="bounded")
        return float(np.exp(-res.x)), 0.0
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Platt's (1999) targets, (N+ + 1) / (N+ + 2) and 1 / (N- + 2), not 0 and 1: on separable predictions the plain
        # fit's slope grows without bound, and an output layer scaled that far saturates. scikit-learn takes soft
        # targets as each row twice, once per label, weighted by the target's probability of that label.
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        rows = np.concatenate([z, z])[:, None]
        labels = np.concatenate([np.ones(len(z)), np.zeros(len(z))])
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(rows, labels, sample_weight=np.concatenate([target, 1 - target]))
        return float(lr.coef_[0, 0]), float(lr.intercept_[0])
    raise ValueError(f"unknown calibration method {method!r}")


def fit_temperature(prob: np.ndarray, y: np.ndarray) -> float:
    """T of p' = softmax(log p / T) minimising the multi-class log loss of held-out probabilities `prob` (n, K) with
    labels `y` (0..K-1); 1 when `y` holds one class only (nothing to fit on)."""
    from scipy.optimize import minimize_scalar

    from brainmri.learn import multiclass

    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return 1.0
    z = np.log(np.clip(np.asarray(prob, np.float64), EPS, 1.0))
    # log T between -4 and 4, as the two-class temperature: wide enough for any head here, and T always positive
    res = minimize_scalar(lambda s: multiclass.log_loss(y, multiclass.softmax(z * np.exp(-s))), bounds=(-4.0, 4.0), method="bounded")
    return float(np.exp(res.x))


def apply_temperature(prob, temperature: float) -> np.ndarray:
    """Probabilities (n, K) mapped by temperature `temperature`: softmax(log p / T)."""
    from brainmri.learn import multiclass

    return multiclass.softmax(np.log(np.clip(np.asarray(prob, np.float64), EPS, 1.0)) / temperature)


def fold_temperature(model, temperature: float) -> None:
    """Fold temperature `temperature` into `model`'s softmax output layer (found in nested models too), in place:
    kernel / T and bias / T."""
    layer = find_layer(model, MULTI_OUTPUT)
    w, b = layer.get_weights()
    layer.set_weights([(w / temperature).astype(w.dtype), (b / temperature).astype(b.dtype)])


def apply(prob, a: float, c: float) -> np.ndarray:
    return expit(a * logit(prob) + c)


def fold_into(model, a: float, c: float) -> None:
    """Fold the map into `model`'s output layer (found in nested models too), in place."""
    layer = find_layer(model, OUTPUT_LAYER)
    w, b = layer.get_weights()
    layer.set_weights([(w * a).astype(w.dtype), (b * a + c).astype(b.dtype)])


def find_layer(model, name: str):
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            found = find_layer(layer, name)
            if found is not None:
                return found
    return None


def equal_mass_bins(prob: np.ndarray, bins: int) -> list[np.ndarray]:
    """Indices of `prob` in `bins` bins of (nearly) equal count, lowest probabilities first."""
    order = np.argsort(np.asarray(prob), kind="stable")
    return [b for b in np.array_split(order, min(bins, len(order))) if len(b)]


def ece(y, prob, bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-mass bins: the count-weighted mean |observed rate - mean probability|.

    Written out because scikit-learn has none (sklearn.calibration.calibration_curve returns the points, not the counts)."""
    y, prob = np.asarray(y, np.float64), np.asarray(prob, np.float64)
    if not len(y):
        return float("nan")
    return float(sum(len(b) * abs(y[b].mean() - prob[b].mean()) for b in equal_mass_bins(prob, bins)) / len(y))


def ece_if_calibrated(prob, bins: int = 10, draws: int = 2000, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model with these probabilities would score on this many images: labels drawn as
    Bernoulli(prob), `draws` times. On 38 test images it averages 0.13-0.16, so a test ECE of 0.2 cannot tell a
    calibrated model from one that is not; this puts the measured figure beside its chance level."""
    prob = np.asarray(prob, np.float64)
    if not len(prob):
        return {"mean": float("nan"), "p95": float("nan"), "draws": 0}
    rng = np.random.default_rng(seed)
    sims = np.array([ece(rng.random(len(prob)) < prob, prob, bins) for _ in range(draws)])
    return {"mean": round(float(sims.mean()), 4), "p95": round(float(np.percentile(sims, 95)), 4), "draws": draws}


def reliability(y, prob, bins: int = 10) -> pd.DataFrame:
    """One row per equal-mass bin: its mean predicted probability, the observed tumour rate and its size."""
    y, prob = np.asarray(y, np.float64), np.asarray(prob, np.float64)
    rows = [(prob[b].mean(), y[b].mean(), len(b)) for b in equal_mass_bins(prob, bins)]
    return pd.DataFrame(rows, columns=["predicted", "observed", "n"]).round(6)
