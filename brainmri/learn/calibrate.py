"""The train stage's calibration step: the map (brainmri.learn.calibration) fitted on held-out predictions, folded
into the model, and described with its before and after figures."""

from __future__ import annotations

import numpy as np

from brainmri.config import Params
from brainmri.core.progress import log
from brainmri.learn import calibration


def calibrate(p: Params, model, held_out: tuple[np.ndarray, np.ndarray], fitted_on: str) -> dict:
    """Fit train.calibration on held-out (labels, probabilities), fold it into `model`'s output layer, and describe it:
    the map, what it was fitted on, and ECE (10 equal-mass bins) and log loss there before and after, with the
    reliability table of each. The after figures are on the data the map was fitted on: one or two parameters, so
    optimistic by little; evaluate gives the test figure. N classes: `calibrate_n`."""
    from sklearn.metrics import log_loss

    if not p.ingest.binary:
        return calibrate_n(p, model, held_out, fitted_on)
    y, prob = held_out
    a, c = calibration.fit(prob, y, p.train.calibration)
    note = ""
    if a <= 0:  # a map that reverses the ranking is no calibration: the model is worse than chance on held-out data
        a, c, note = 1.0, 0.0, "not applied: the fitted map reversed the ranking"
    calibration.fold_into(model, a, c)
    after = calibration.apply(prob, a, c)
    out = {
        "method": p.train.calibration,
        "a": float(a),  # calibrated p = sigmoid(a * logit(p) + c); temperature T = 1 / a; unrounded, so it can be undone
        "c": float(c),
        "fitted_on": f"{fitted_on} ({len(y)} images)",
        "ece_before": round(calibration.ece(y, prob), 4),
        "ece_after": round(calibration.ece(y, after), 4),
        "bce_before": round(float(log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])), 4),
        "bce_after": round(float(log_loss(y, np.clip(after, 1e-7, 1 - 1e-7), labels=[0, 1])), 4),
        "reliability_before": calibration.reliability(y, prob).to_dict(orient="list"),
        "reliability_after": calibration.reliability(y, after).to_dict(orient="list"),
    }
    if note:
        out["note"] = note
    log.info(
        "calibration (%s on %s): ECE %.3f -> %.3f, log loss %.3f -> %.3f",
        out["method"], out["fitted_on"], out["ece_before"], out["ece_after"], out["bce_before"], out["bce_after"],
    )  # fmt: skip
    return out


def top_label(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 where the arg-max class is the label, the arg-max class's probability): an N-class model's top-label
    confidence, what its ECE and reliability table are computed on (Guo et al. 2017)."""
    return (np.argmax(prob, axis=1) == np.asarray(y).astype(int)).astype(float), np.max(prob, axis=1)


def calibrate_n(p: Params, model, held_out: tuple[np.ndarray, np.ndarray], fitted_on: str) -> dict:
    """N classes: temperature scaling (notes/nclass_contract.md item 4) fitted on held-out (labels, probabilities
    (n, K)) and folded into `model`'s softmax layer. train.calibration names the two-class method, 'platt' by default,
    which has no N-class form: for N classes every method but 'none' means temperature ('none': T = 1, nothing fitted).
    Described as the two-class record is, {"method": "temperature", "T": ...}, with ECE and reliability on the
    top-label confidence and "bce" the multi-class log loss."""
    from brainmri.learn import multiclass

    y, prob = held_out
    method = "none" if p.train.calibration == "none" else "temperature"
    temperature = calibration.fit_temperature(prob, y) if method == "temperature" else 1.0
    calibration.fold_temperature(model, temperature)
    after = calibration.apply_temperature(prob, temperature)
    (hit_b, conf_b), (hit_a, conf_a) = top_label(y, prob), top_label(y, after)
    out = {
        "method": method,
        "T": float(temperature),  # calibrated p = softmax(log(p) / T); unrounded, so it can be undone
        "fitted_on": f"{fitted_on} ({len(y)} images)",
        "ece_before": round(calibration.ece(hit_b, conf_b), 4),  # top-label ECE: arg-max confidence against being right
        "ece_after": round(calibration.ece(hit_a, conf_a), 4),
        "bce_before": round(multiclass.log_loss(y, prob), 4),  # multi-class log loss
        "bce_after": round(multiclass.log_loss(y, after), 4),
        "reliability_before": calibration.reliability(hit_b, conf_b).to_dict(orient="list"),
        "reliability_after": calibration.reliability(hit_a, conf_a).to_dict(orient="list"),
    }
    log.info(
        "calibration (temperature %.3f on %s): top-label ECE %.3f -> %.3f, log loss %.3f -> %.3f",
        out["T"], out["fitted_on"], out["ece_before"], out["ece_after"], out["bce_before"], out["bce_after"],
    )  # fmt: skip
    return out
