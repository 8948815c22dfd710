"""What evaluate records of an N-class model (three or more classes) on the test split: per-class and macro metrics
with group-bootstrap intervals, the labelled N x N confusion matrix, a row per image with every class's probability,
and one-vs-rest ROC curves. Two-class models keep their own record (brainmri.stats.evaluation)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainmri.intake.parts import Part
from brainmri.stats import multiclass


def probability_columns(names) -> list[str]:
    """The per-class probability columns of predictions tables (evaluate's and predict's), in label order."""
    return [f"prob_{c}" for c in names]


def record(name: str, part: Part, names, test: dict, prob: np.ndarray, n_boot: int, seed: int) -> dict:
    """metrics.json for N classes: `test` holds the overall (macro) figures under the keys two-class records use where
    they mean the same (auc, accuracy, f1, brier, ...), `test_per_class` each class's."""
    y = part.y
    return {
        "model": name,
        "classes": list(names),
        "n_test": int(len(y)),
        "n_per_class": {c: int((y == i).sum()) for i, c in enumerate(names)},
        "decision": "the most probable class (arg-max of the calibrated probabilities)",
        "threshold": None,
        "points_per_image": round(100.0 / max(1, len(y)), 2),
        "bootstrap_resamples": n_boot,
        "bootstrap_resamples_used": test["resamples_used"],  # resamples missing a class are skipped
        "bootstrap_unit": "duplicate group",  # whole groups are drawn: a scan and its copy are one case, not two
        "n_groups": int(part.frame["group"].nunique()),
        "auc_definition": "macro average of one-vs-rest AUCs",
        "test": test["overall"],
        "test_per_class": test["per_class"],
        "calibration": {
            "ece_test_top_label": round(multiclass.top_label_ece(y, prob), 4),
            "ece_if_perfectly_calibrated": multiclass.ece_if_calibrated(prob, seed),
            "bins": "10 equal-mass, on the most probable class's probability",
            "note": f"{len(y)} test images: a coarse check of the map fitted without them",
        },
    }


def prediction_table(part: Part, prob: np.ndarray, pred: np.ndarray, names) -> pd.DataFrame:
    """One row per test image: every class's probability, the actual and predicted class, and whether they agree."""
    cols = dict(zip(probability_columns(names), np.round(prob, 6).T, strict=True))
    return part.frame[["source_path", "group", "label"]].assign(
        **cols, actual=[names[v] for v in part.y], predicted=[names[v] for v in pred], correct=pred == part.y
    )


def roc_table(y: np.ndarray, prob: np.ndarray, names) -> pd.DataFrame:
    """Each class's one-vs-rest ROC curve, stacked with a `class` column (thresholds clipped to 0..1)."""
    from sklearn.metrics import roc_curve

    frames = []
    for c, cls in enumerate(names):
        if len(np.unique(y == c)) < 2:
            continue
        fpr, tpr, thr = roc_curve(y == c, prob[:, c])
        frames.append(pd.DataFrame({"class": cls, "fpr": fpr, "tpr": tpr, "threshold": np.clip(thr, 0, 1)}))
    return pd.concat(frames).round(6) if frames else pd.DataFrame(columns=["class", "fpr", "tpr", "threshold"])
