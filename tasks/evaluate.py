"""evaluate stage: one exported model (the ONNX file users deploy, parity-checked against Keras by export) on the held-out
test split, with 95% group-bootstrap intervals and a labelled confusion matrix; and its model card. Two classes are
scored at the model's threshold; three or more by the arg-max, per class and macro (brainmri.stats.multiclass_evaluation).

Scoring the ONNX file with ONNX Runtime, not the Keras model, means this stage imports no TensorFlow."""

from __future__ import annotations

import json

import numpy as np

from brainmri.config import Params
from brainmri.core.files import jsonable, write_csv, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.deploy.onnxrt import probabilities, session
from brainmri.intake.parts import Part, split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration
from brainmri.provenance.model_card import model_card
from brainmri.report.plots import confusion_figure, save
from brainmri.stats import multiclass
from brainmri.stats import multiclass_evaluation as mce
from brainmri.stats.evaluation import evaluation_record, prediction_table, roc_table
from brainmri.stats.metrics import confusion, fmt, interval_scores

SCORED_CLASSES = (
    "auc",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "log_loss",
)  # N classes' scores.json: macro AUC and what a reader compares first


def evaluate(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics, predictions, ROC and confusion files; return the metrics."""
    p.model(name)  # an unknown name stops here, before any work
    bb = p.backbones[p.models[name].backbone]
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    exported = json.loads(p.model_file("export", name, "export_metrics").read_text())
    part = split_part(p, "test")
    y = part.y
    prob = probabilities(session(p.model_file("export", name, "onnx")), load_batch(part.paths, bb.input_size))
    if not p.ingest.binary:
        metrics = evaluate_classes(p, name, part, prob)
        write_json(p.model_file("eval", name, "card"), model_card(p, name, trained, exported, metrics))
        return metrics
    pos, neg = p.ingest.positive_class, p.ingest.negative_class
    threshold = float(trained["threshold"])
    pred = (prob >= threshold).astype(int)
    metrics = evaluation_record(
        name, part, prob, threshold, p.train.bootstrap, p.seed, calibration.ece(y, prob), calibration.ece_if_calibrated(prob, seed=p.seed)
    )
    names = (neg, pos)
    matrix = confusion(y, pred)

    write_csv(p.model_file("eval", name, "predictions"), prediction_table(part, prob, pred, names))
    write_csv(p.model_file("eval", name, "roc"), roc_table(y, prob))
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
    scored = ("auc", "accuracy", "sensitivity", "specificity", "bce")
    write_metrics(p.path("eval") / name / p.paths.files.scores, interval_scores("test_", t, scored))
    summary(
        f"evaluate {name}",
        f"test accuracy {fmt(t['accuracy']['value'])} [{fmt(t['accuracy']['ci_low'])}, {fmt(t['accuracy']['ci_high'])}], "
        f"AUC {fmt(t['auc']['value'])}, sensitivity {fmt(t['sensitivity']['value'])}, specificity {fmt(t['specificity']['value'])} "
        f"({len(y)} images: one image moves accuracy {metrics['points_per_image']} points)",
    )
    return metrics


def evaluate_classes(p, name: str, part: Part, prob: np.ndarray) -> dict:
    """Score model `name`'s test probabilities `prob` (n, K): write metrics, scores, predictions, ROC and confusion files."""
    names, y = p.ingest.label_names, part.y
    pred = prob.argmax(axis=1)
    groups = part.frame["group"].to_numpy()
    test = multiclass.with_intervals(y, prob, names, p.train.bootstrap, p.seed, groups=groups)
    metrics = jsonable(mce.record(name, part, names, test, prob, p.train.bootstrap, p.seed))
    matrix = multiclass.confusion(y, pred, len(names))
    write_csv(p.model_file("eval", name, "predictions"), mce.prediction_table(part, prob, pred, names))
    write_csv(p.model_file("eval", name, "roc"), mce.roc_table(y, prob, names))
    labelled = {"rows": "actual", "columns": "predicted", "labels": list(names), "matrix": matrix.tolist()}
    write_json(p.model_file("eval", name, "confusion"), labelled)
    save(confusion_figure(matrix, names, f"{name} (test, most probable class)"), p.model_file("eval", name, "confusion_png"))
    write_json(p.model_file("eval", name, "metrics"), metrics)
    write_metrics(p.path("eval") / name / p.paths.files.scores, interval_scores("test_", metrics["test"], SCORED_CLASSES))
    t = metrics["test"]
    summary(
        f"evaluate {name}",
        f"test macro AUC {fmt(t['auc']['value'])} [{fmt(t['auc']['ci_low'])}, {fmt(t['auc']['ci_high'])}], accuracy "
        f"{fmt(t['accuracy']['value'])}, balanced accuracy {fmt(t['balanced_accuracy']['value'])} ({len(y)} images, {len(names)} classes)",
    )
    return metrics
