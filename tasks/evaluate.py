"""evaluate stage: one model on the held-out test split, with 95% group-bootstrap intervals and a labelled confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainmri import calibration
from brainmri.config import Params
from brainmri.fsutil import jsonable, write_csv, write_json, write_metrics
from brainmri.metrics import confusion, fmt, with_intervals
from brainmri.plots import confusion_figure, save
from brainmri.preprocess import load_batch
from brainmri.progress import summary
from tasks.split import split_part


def evaluate(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics, predictions, ROC and confusion files; return the metrics."""
    p.model(name)  # an unknown name stops here, before any work
    from sklearn.metrics import roc_curve

    from brainmri.models import load_model

    bb = p.backbones[p.models[name].backbone]
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    model = load_model(p.model_file("models", name, "model"))
    part = split_part(p, "test")
    test, y = part.frame, part.y
    pos, neg = p.ingest.positive_class, p.ingest.negative_class
    x = load_batch(part.paths, bb.input_size)
    prob = np.asarray(model.predict(x, batch_size=16, verbose=0), dtype=np.float64).reshape(-1)
    threshold = float(trained["threshold"])
    pred = (prob >= threshold).astype(int)

    metrics = {
        "model": name,
        "n_test": int(len(y)),
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "points_per_image": round(100.0 / max(1, len(y)), 2),
        "bootstrap_resamples": p.train.bootstrap,
        "bootstrap_unit": "duplicate group",  # whole groups are drawn: a scan and its copy are one case, not two
        "n_groups": int(test["group"].nunique()),
        "test": with_intervals(y, prob, threshold, p.train.bootstrap, p.seed, groups=test["group"].to_numpy()),
        "calibration": {  # of the calibrated model train saved; train.json has the fit on out-of-fold predictions
            "ece_test": round(calibration.ece(y, prob), 4),
            "bins": "10 equal-mass",
            "note": f"{len(y)} test images: a coarse check of the map fitted without them",
        },
    }
    names = (neg, pos)
    preds = test[["source_path", "group", "label"]].assign(
        probability=np.round(prob, 6), actual=[names[v] for v in y], predicted=[names[v] for v in pred], correct=pred == y
    )
    fpr, tpr, thr = roc_curve(y, prob)
    matrix = confusion(y, pred)
    write_csv(p.model_file("eval", name, "predictions"), preds)
    write_csv(p.model_file("eval", name, "roc"), pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.clip(thr, 0, 1)}).round(6))
    write_json(
        p.model_file("eval", name, "confusion"),
        {"rows": "actual", "columns": "predicted", "labels": list(names), "matrix": matrix.tolist()},
    )
    shown = (f"{neg}\n(no tumour)", f"{pos}\n(tumour)")
    save(confusion_figure(matrix, shown, f"{name} (test, threshold {threshold:.2f})"), p.model_file("eval", name, "confusion_png"))
    metrics = jsonable(metrics)
    write_json(p.model_file("eval", name, "metrics"), metrics)
    t = metrics["test"]
    write_metrics(
        p.path("eval") / name / p.paths.files.scores,
        {
            f"test_{k}{part}": t[k][v]
            for k in ("auc", "accuracy", "sensitivity", "specificity", "bce")
            for part, v in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))
        },
    )
    summary(
        f"evaluate {name}",
        f"test accuracy {fmt(t['accuracy']['value'])} [{fmt(t['accuracy']['ci_low'])}, {fmt(t['accuracy']['ci_high'])}], "
        f"AUC {fmt(t['auc']['value'])}, sensitivity {fmt(t['sensitivity']['value'])}, specificity {fmt(t['specificity']['value'])} "
        f"({len(y)} images: one image moves accuracy {metrics['points_per_image']} points)",
    )
    return metrics
