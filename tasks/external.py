"""external stage: one exported ONNX model, the artifact users deploy, scored on the external set with its own threshold
(two classes) or by its most probable class (more): the same metrics and group-bootstrap intervals as evaluate, and the
change from the test split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_csv, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.intake.external_set import external_images, external_set, no_external_note
from brainmri.intake.preprocess import load_batch

CHUNK = 64  # images decoded and scored at a time: memory stays bounded whatever the external set's size


def external(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics.json, scores.json and predictions.csv under paths.external_eval."""
    p.model(name)  # an unknown name stops here, before any work
    intake, used = external_set(p)
    folder = p.path("external_eval") / name
    out = {"model": name, "configured": intake["configured"], "synthetic": intake["synthetic"], "n_images": int(len(used))}
    if not intake["configured"] or used.empty:
        out["note"] = no_external_note(intake)
        with atomic_dir(folder) as tmp:
            write_json(tmp / p.paths.files.metrics, out)
            write_metrics(tmp / p.paths.files.scores, {})
            write_csv(tmp / p.paths.files.predictions, pd.DataFrame(columns=["source_path", "label", "probability", "predicted"]))
        summary(f"external {name}", out["note"])
        return out

    # imported here, where there is a set to score: without one (the default) the stage needs neither scikit-learn
    # nor ONNX Runtime, and skips their second of start-up
    from brainmri.deploy.onnxrt import metadata, probabilities, session
    from brainmri.stats.metrics import fmt, interval_scores

    sess = session(p.model_file("export", name, "onnx"))
    meta = metadata(sess)
    size = int(meta["input_size"])
    paths, y, groups = external_images(p, used)
    prob = np.concatenate([probabilities(sess, load_batch(paths[i : i + CHUNK], size)) for i in range(0, len(paths), CHUNK)])
    test = json.loads(p.model_file("eval", name, "metrics").read_text())["test"]
    scored = _score_binary(p, meta, y, prob, groups, used) if p.ingest.binary else _score_classes(p, y, prob, groups, used)
    m, preds = scored.pop("external"), scored.pop("predictions")
    change = {k: round(m[k]["value"] - test[k]["value"], 4) for k in scored.pop("compared")}
    out |= {**scored, "n_groups": int(used["group"].nunique())}
    out |= {"bootstrap_unit": "duplicate group", "external": m, "change_from_test": change}
    if intake["synthetic"]:
        out["note"] = "SYNTHETIC external set: a check of the mechanics, not a generalisation result"
    with atomic_dir(folder) as tmp:
        write_json(tmp / p.paths.files.metrics, out)
        write_metrics(tmp / p.paths.files.scores, interval_scores("external_", m, ("auc", "accuracy")))
        write_csv(tmp / p.paths.files.predictions, preds)
    summary(
        f"external {name}",
        f"{len(y)} images: AUC {fmt(m['auc']['value'])} [{fmt(m['auc']['ci_low'])}, {fmt(m['auc']['ci_high'])}], accuracy "
        f"{fmt(m['accuracy']['value'])} ({change['auc']:+.3f} AUC from test)" + (" SYNTHETIC" if intake["synthetic"] else ""),
    )
    return out


def _score_binary(p: Params, meta: dict, y, prob, groups, used: pd.DataFrame) -> dict:
    """Two classes: the metrics at the model's own threshold (from its metadata) and a row per image."""
    from brainmri.stats.metrics import with_intervals

    threshold = float(meta["threshold"])
    m = with_intervals(y, prob, threshold, p.train.bootstrap, p.seed, groups=groups)
    names = (p.ingest.negative_class, p.ingest.positive_class)
    preds = used[["source_path", "label"]].assign(probability=np.round(prob, 6), predicted=[names[int(v >= threshold)] for v in prob])
    compared = ("auc", "accuracy", "sensitivity", "specificity")
    return {"threshold": threshold, "n_positive": int(y.sum()), "external": m, "predictions": preds, "compared": compared}


def _score_classes(p: Params, y, prob, groups, used: pd.DataFrame) -> dict:
    """N classes: macro and per-class metrics of the most probable class, and a row per image with every class's probability."""
    from brainmri.stats import multiclass
    from brainmri.stats.multiclass_evaluation import probability_columns

    names = p.ingest.label_names
    m = multiclass.with_intervals(y, prob, names, p.train.bootstrap, p.seed, groups=groups)
    cols = dict(zip(probability_columns(names), np.round(prob, 6).T, strict=True))
    preds = used[["source_path", "label"]].assign(**cols, predicted=[names[v] for v in prob.argmax(axis=1)])
    return {
        "decision": "the most probable class",
        "n_per_class": {c: int((y == i).sum()) for i, c in enumerate(names)},
        "external_per_class": m["per_class"],
        "external": m["overall"],
        "predictions": preds,
        "compared": ("auc", "accuracy", "balanced_accuracy"),
    }
