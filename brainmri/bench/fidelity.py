"""Each ONNX runtime checked against ONNX Runtime fp32 on the validation images."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from brainmri.config import Params
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch
from brainmri.stats.metrics import point


def check_on_val(p: Params, name: str, runtimes: dict[str, Callable], size: int) -> dict:
    """Each ONNX runtime against ONNX Runtime fp32 on the validation images (real scans: random inputs saturate the
    sigmoid and hide differences). An fp32 runtime passes within export.parity_tolerance of every probability; a
    bf16 or int8 one when val accuracy moves by at most 1 point (labels_changed says how many flipped). Val, never test.
    An N-class model: check_classes_on_val."""
    val = split_part(p, "val")
    x = load_batch(val.paths, size)
    if not p.ingest.binary:
        return check_classes_on_val(p, runtimes, val.y, x)
    threshold = json.loads(p.model_file("models", name, "train_metrics").read_text())["threshold"]

    def probs(fn):
        return np.concatenate([np.asarray(fn(x[i : i + 8])).reshape(-1) for i in range(0, len(x), 8)]) if len(x) else np.zeros(0)

    ref = probs(runtimes["onnxruntime_fp32"])
    base = point(val.y, ref, threshold)["accuracy"]
    out = {}
    for rt, fn in runtimes.items():
        if rt.startswith("keras"):
            continue
        prob = probs(fn)
        diff = float(np.max(np.abs(prob - ref))) if len(x) else 0.0
        change = 100 * (point(val.y, prob, threshold)["accuracy"] - base)
        exact = rt.endswith("fp32")
        out[rt] = {
            "n_val": int(len(x)),
            "max_abs_prob_diff": round(diff, 6),
            "labels_changed": int(np.sum((prob >= threshold) != (ref >= threshold))),
            "accuracy_change_points": round(change, 2),
            "rule": f"max |p - p_ort_fp32| <= {p.export.parity_tolerance:g}" if exact else "|val accuracy change| <= 1 point",
            "admissible": bool(diff <= p.export.parity_tolerance if exact else abs(change) <= 1.0),
        }
    return out


def check_classes_on_val(p: Params, runtimes: dict[str, Callable], y: np.ndarray, x: np.ndarray) -> dict:
    """An N-class model's runtimes against ONNX Runtime fp32 on the val images `x` (labels `y`), as check_on_val does
    a binary model's: the largest difference over every class's probability, and the arg-max labels (accuracy, and how
    many changed)."""
    k = len(p.ingest.label_names)

    def probs(fn):
        rows = [np.asarray(fn(x[i : i + 8])).reshape(-1, k) for i in range(0, len(x), 8)]
        return np.concatenate(rows) if rows else np.zeros((0, k))

    def accuracy(prob):
        return float(np.mean(np.argmax(prob, axis=1) == y)) if len(y) else 0.0

    ref = probs(runtimes["onnxruntime_fp32"])
    out = {}
    for rt, fn in runtimes.items():
        if rt.startswith("keras"):
            continue
        prob = probs(fn)
        diff = float(np.max(np.abs(prob - ref))) if len(x) else 0.0
        change = 100 * (accuracy(prob) - accuracy(ref))
        exact = rt.endswith("fp32")
        out[rt] = {
            "n_val": int(len(x)),
            "max_abs_prob_diff": round(diff, 6),  # over every class
            "labels_changed": int(np.sum(np.argmax(prob, axis=1) != np.argmax(ref, axis=1))),  # arg-max labels
            "accuracy_change_points": round(change, 2),
            "rule": f"max |p - p_ort_fp32| <= {p.export.parity_tolerance:g}" if exact else "|val accuracy change| <= 1 point",
            "admissible": bool(diff <= p.export.parity_tolerance if exact else abs(change) <= 1.0),
        }
    return out
