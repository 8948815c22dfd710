"""evaluate stage: one exported model (the ONNX file users deploy, parity-checked against Keras by export) on the held-out
test split, with 95% group-bootstrap intervals and a labelled confusion matrix; and its model card.

Scoring the ONNX file with ONNX Runtime, not the Keras model, means this stage imports no TensorFlow."""

from __future__ import annotations

import json

from brainmri.config import Params
from brainmri.core.files import jsonable, write_csv, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.deploy.onnxrt import probabilities, session
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration
from brainmri.provenance.model_card import model_card
from brainmri.report.plots import confusion_figure, save
from brainmri.stats.evaluation import evaluation_record, prediction_table, roc_table
from brainmri.stats.metrics import confusion, fmt, interval_scores


def evaluate(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics, predictions, ROC and confusion files; return the metrics."""
    p.model(name)  # an unknown name stops here, before any work
    bb = p.backbones[p.models[name].backbone]
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    exported = json.loads(p.model_file("export", name, "export_metrics").read_text())
    part = split_part(p, "test")
    y = part.y
    pos, neg = p.ingest.positive_class, p.ingest.negative_class

    prob = probabilities(session(p.model_file("export", name, "onnx")), load_batch(part.paths, bb.input_size))
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
