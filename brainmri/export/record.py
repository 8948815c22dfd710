"""What export records: the metadata written into the ONNX file, the parity check against Keras, and export.json's
int8 figures on the test images."""

from __future__ import annotations

import numpy as np

from brainmri.config import Params
from brainmri.export.convert import ExportError
from brainmri.stats.metrics import point


def onnx_metadata(p: Params, name: str, size: int, trained: dict) -> dict:
    """What predict needs to run the file as training's images were made, and to label its output."""
    return {
        "model": name,
        "input_size": size,
        "max_side": p.ingest.max_side,
        "max_pixels": p.ingest.max_pixels,
        "crop_to_content": p.ingest.crop_to_content,  # predict crops as ingest did
        "threshold": trained["threshold"],
        "positive_class": p.ingest.positive_class,
        "negative_class": p.ingest.negative_class,
        "weights": trained["weights"]["description"],
    }


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


def int8_record(y, p_onnx: np.ndarray, p_int8: np.ndarray, threshold: float, selection: dict, images: int, classes: dict) -> dict:
    """The chosen int8 file against fp32 on the val images (test stays unread until evaluate); it was calibrated on
    `images` images, `classes` of each."""
    m32, m8 = point(y, p_onnx, threshold), point(y, p_int8, threshold)
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
    }
