"""evaluate stage: one exported model (the ONNX file users deploy, parity-checked against Keras by export) on the held-out
test split, with 95% group-bootstrap intervals and a labelled confusion matrix; and its model card.

Scoring the ONNX file with ONNX Runtime, not the Keras model, means this stage imports no TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import BrainMRIError
from brainmri.core.files import jsonable, write_csv, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.deploy.onnxrt import INPUT, probabilities, session
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration
from brainmri.provenance.lineage import lineage, md5
from brainmri.report.plots import confusion_figure, save
from brainmri.stats.metrics import confusion, fmt, with_intervals


def evaluate(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics, predictions, ROC and confusion files; return the metrics."""
    p.model(name)  # an unknown name stops here, before any work
    from sklearn.metrics import roc_curve

    bb = p.backbones[p.models[name].backbone]
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    exported = json.loads(p.model_file("export", name, "export_metrics").read_text())
    part = split_part(p, "test")
    test, y = part.frame, part.y
    pos, neg = p.ingest.positive_class, p.ingest.negative_class
    prob = probabilities(session(p.model_file("export", name, "onnx")), load_batch(part.paths, bb.input_size))
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
    write_json(p.model_file("eval", name, "card"), model_card(p, name, trained, exported, metrics))
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


def model_card(p: Params, name: str, trained: dict, exported: dict, evaluated: dict) -> dict:
    """What the exported model is, how well it did, and where it came from (the DVC chain back to the raw data)."""
    onnx_file = p.model_file("export", name, "onnx")
    try:
        chain = lineage(p.root, onnx_file, with_metrics=False)
    except BrainMRIError as exc:  # run outside DVC: say so instead of inventing a chain
        chain = {"note": str(exc)}
    files = {k: {"file": getattr(p.paths.files, k), "md5": md5(p.model_file("export", name, k))} for k in ("onnx", "onnx_int8")}
    return {
        "model": name,
        "task": f"brain MRI slice: tumour ({p.ingest.positive_class}) vs no tumour ({p.ingest.negative_class})",
        "intended_use": "research and teaching; not a medical device, not for diagnosis",
        "backbone": trained["backbone"],
        "augmented_training": p.models[name].augment,
        "weights": trained["weights"],
        "input": {"name": INPUT, **{k: exported["metadata"][k] for k in ("input_size", "max_side")}},
        "threshold": trained["threshold"],
        "files": files,
        "metrics": {
            "test": evaluated["test"],
            "n_test": evaluated["n_test"],
            "calibration": trained.get("calibration", {}).get("method"),
            "parity": exported["parity"],
            "int8": exported["int8"],
        },
        "lineage": chain,
        "libraries": library_versions(),
    }


CARD_LIBRARIES = ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "scikit-learn", "pillow", "dvc")


def library_versions() -> dict[str, str]:
    """The versions that built and exported the model (installed from requirements.lock; versions.yaml has all)."""
    from importlib import metadata

    out = {}
    for dist in CARD_LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
