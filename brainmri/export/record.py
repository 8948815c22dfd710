"""What export records: the metadata written into the ONNX file, the parity check against Keras, and export.json's
int8 figures on the test images."""

from __future__ import annotations

import json

import numpy as np

from brainmri.config import Params
from brainmri.core.limits import MAX_CLASSES
from brainmri.export.convert import ExportError
from brainmri.stats.metrics import point


def _input_fields(p: Params, name: str, size: int) -> dict:
    """The metadata every model carries first: its name, and how predict makes its input as training's was made."""
    return {
        "model": name,
        "input_size": size,
        "max_side": p.ingest.max_side,
        "max_pixels": p.ingest.max_pixels,
        "crop_to_content": p.ingest.crop_to_content,  # predict crops as ingest did
    }


def onnx_metadata(p: Params, name: str, size: int, trained: dict) -> dict:
    """What predict needs to run the file as training's images were made, and to label its output: a binary model's
    threshold and two class names (an N-class model's: onnx_metadata_classes)."""
    return {
        **_input_fields(p, name, size),
        "threshold": trained["threshold"],
        "positive_class": p.ingest.positive_class,
        "negative_class": p.ingest.negative_class,
        "weights": trained["weights"]["description"],
    }


def onnx_metadata_classes(p: Params, name: str, size: int, trained: dict) -> dict:
    """An N-class model's metadata: `classes` (its output columns' names, in order) where a binary model has a threshold
    and two names; ExportError for more classes than predict takes."""
    names = list(p.ingest.label_names)
    if len(names) > MAX_CLASSES:
        raise ExportError(f"{name}: {len(names)} classes; predict takes a model of at most {MAX_CLASSES}")
    return {
        **_input_fields(p, name, size),
        "classes": names,
        "weights": trained["weights"]["description"],
    }


def metadata_props(meta: dict) -> dict[str, str]:
    """The metadata as the ONNX file holds it: every value through str(), a list (an N-class model's classes) as JSON."""
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in meta.items()}


def check_parity(name: str, p_keras: np.ndarray, p_onnx: np.ndarray, threshold: float, tolerance: float) -> dict:
    """The ONNX probabilities against Keras's on the same images; ExportError when they differ by more than `tolerance`
    or give another label anywhere."""
    diff = float(np.max(np.abs(p_keras - p_onnx))) if len(p_onnx) else 0.0
    same_labels = bool(np.array_equal(p_keras >= threshold, p_onnx >= threshold))
    if diff > tolerance or not same_labels:
        raise ExportError(
            f"{name}: ONNX output differs from Keras on the val images: max |p_keras - p_onnx| = {diff:.2e} "
            f"(export.parity_tolerance {tolerance:.0e}), labels identical: {same_labels}; "
            "nothing was written"
        )
    return {"images": "val", "n_images": int(len(p_onnx)), "max_abs_diff": diff, "tolerance": tolerance, "labels_identical": same_labels}


def check_parity_classes(name: str, p_keras: np.ndarray, p_onnx: np.ndarray, classes: list[str], tolerance: float) -> dict:
    """An N-class model's parity: every class's ONNX probability against Keras's on the same images (n, K); ExportError
    when any differs by more than `tolerance` or an arg-max label changes anywhere."""
    per_class = np.max(np.abs(p_keras - p_onnx), axis=0) if len(p_onnx) else np.zeros(len(classes))
    diff = float(np.max(per_class))
    same_labels = bool(np.array_equal(np.argmax(p_keras, axis=1), np.argmax(p_onnx, axis=1)))
    if diff > tolerance or not same_labels:
        raise ExportError(
            f"{name}: ONNX output differs from Keras on the val images: max |p_keras - p_onnx| over {len(classes)} classes = "
            f"{diff:.2e} (export.parity_tolerance {tolerance:.0e}), arg-max labels identical: {same_labels}; nothing was written"
        )
    return {
        "images": "val",
        "n_images": int(len(p_onnx)),
        "max_abs_diff": diff,  # over every class
        "max_abs_diff_per_class": {c: float(d) for c, d in zip(classes, per_class, strict=True)},
        "tolerance": tolerance,
        "labels_identical": same_labels,  # the arg-max class
    }


def label_metrics(y, prob: np.ndarray, threshold: float | None) -> dict:
    """Accuracy and AUC of `prob` against labels `y`: a binary model's at `threshold` (brainmri.stats.metrics.point),
    an N-class model's (threshold None, prob (n, K)) by arg-max, with macro one-vs-rest AUC (NaN unless every class is
    in `y`)."""
    if threshold is not None:
        return point(y, prob, threshold)
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    accuracy = float(np.mean(np.argmax(prob, axis=1) == y)) if len(y) else float("nan")
    auc = float("nan")
    if len(np.unique(y)) == k:
        rows = prob / prob.sum(axis=1, keepdims=True)  # scikit-learn wants rows summing to 1 within 1e-8; float32 sums need not
        auc = float(roc_auc_score(y, rows, multi_class="ovr", average="macro", labels=list(range(k))))
    return {"accuracy": accuracy, "auc": auc}


def int8_record(y, p_onnx: np.ndarray, p_int8: np.ndarray, threshold: float | None, selection: dict, images: int, classes: dict) -> dict:
    """The chosen int8 file against fp32 on the val images (test stays unread until evaluate); it was calibrated on
    `images` images, `classes` of each. N classes (threshold None): arg-max accuracy, macro one-vs-rest AUC, the labels
    that changed, and the largest change of any class's probability."""
    m32, m8 = label_metrics(y, p_onnx, threshold), label_metrics(y, p_int8, threshold)
    extra = {} if threshold is not None else {"labels_changed": int(np.sum(np.argmax(p_int8, axis=1) != np.argmax(p_onnx, axis=1)))}
    return {
        "images": "val",  # the change int8 makes, measured where its settings were chosen
        "settings": selection["chosen"],
        "selection": selection,
        "calibration_images": images,  # int8 calibration images (the key export.json has always had)
        "calibration_classes": classes,  # seeded, class-stratified
        "accuracy_fp32": round(m32["accuracy"], 4),
        "accuracy_int8": round(m8["accuracy"], 4),
        "accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
        "auc_fp32": round(m32["auc"], 4),
        "auc_int8": round(m8["auc"], 4),
        "auc_change": round(m8["auc"] - m32["auc"], 4),
        "max_abs_prob_change": round(float(np.max(np.abs(p_int8 - p_onnx))) if len(p_onnx) else 0.0, 4),
        **extra,
    }
