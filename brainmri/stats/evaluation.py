"""What evaluate records of one model on the test split: the metrics with group-bootstrap intervals, a row per image,
and the ROC curve."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainmri.core.files import read_manifest
from brainmri.intake.parts import Part
from brainmri.stats.metrics import with_intervals
from brainmri.stats.multiclass_evaluation import probability_columns


def evaluation_record(name: str, part: Part, prob: np.ndarray, threshold: float, n_boot: int, seed: int, ece: float, chance: dict) -> dict:
    """metrics.json: the test figures with 95% intervals over `n_boot` duplicate-group resamples, and the expected
    calibration error `ece` of the calibrated model's probabilities beside `chance`, what a perfectly calibrated
    model would score on as many images."""
    y, test = part.y, part.frame
    return {
        "model": name,
        "n_test": int(len(y)),
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "points_per_image": round(100.0 / max(1, len(y)), 2),
        "bootstrap_resamples": n_boot,
        "bootstrap_unit": "duplicate group",  # whole groups are drawn: a scan and its copy are one case, not two
        "n_groups": int(test["group"].nunique()),
        "test": with_intervals(y, prob, threshold, n_boot, seed, groups=test["group"].to_numpy()),
        "calibration": {  # of the calibrated model train saved; train.json has the fit on out-of-fold predictions
            "ece_test": round(ece, 4),
            "ece_if_perfectly_calibrated": chance,  # simulated: labels drawn from the model's own probabilities
            "bins": "10 equal-mass",
            "note": f"{len(y)} test images: a coarse check of the map fitted without them",
        },
    }


def prediction_table(part: Part, prob: np.ndarray, pred: np.ndarray, names: tuple[str, str]) -> pd.DataFrame:
    """One row per test image: its probability, actual and predicted class (`names`: negative, positive), and whether
    they agree."""
    y = part.y
    return part.frame[["source_path", "group", "label"]].assign(
        probability=np.round(prob, 6), actual=[names[v] for v in y], predicted=[names[v] for v in pred], correct=pred == y
    )


def roc_table(y: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    """The ROC curve's points, thresholds clipped to 0..1 (scikit-learn puts an infinite one first)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, prob)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.clip(thr, 0, 1)}).round(6)


def evaluated_probabilities(p, name: str, part: Part) -> np.ndarray:
    """Model `name`'s test probabilities as evaluate recorded them (its exported ONNX file's, 6 decimals; (n, K) for N
    classes), in the order of `part`'s rows: what another stage scores test with, without opening a test image."""
    path = p.model_file("eval", name, "predictions")
    frame = read_manifest(path).set_index("source_path")
    missing = sorted(set(part.frame["source_path"]) - set(frame.index))
    if missing:
        raise ValueError(f"{path}: no prediction for {len(missing)} test images (e.g. {missing[0]}); run evaluate@{name} again")
    if p.ingest.binary:
        return frame.loc[part.frame["source_path"], "probability"].to_numpy(float)
    return frame.loc[part.frame["source_path"], probability_columns(p.ingest.label_names)].to_numpy(float)  # (n, K)
