"""external stage: one exported ONNX model, the artifact users deploy, scored on the external set with its own threshold:
the same metrics and group-bootstrap intervals as evaluate, and the change from the test split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_csv, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.intake.preprocess import load_batch

PARTS = (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))
CHUNK = 64  # images decoded and scored at a time: memory stays bounded whatever the external set's size


def external_set(p: Params) -> tuple[dict, pd.DataFrame]:
    """ingest_external's record, and the manifest rows of the images to score (not quarantined, not duplicates)."""
    intake = json.loads(p.path("external_report").read_text())
    manifest = pd.read_csv(p.path("external_manifest"), keep_default_na=False, dtype={"used": str})
    return intake, manifest[manifest["used"] == "True"].reset_index(drop=True)


def external(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write metrics.json, scores.json and predictions.csv under paths.external_eval."""
    p.model(name)  # an unknown name stops here, before any work
    intake, used = external_set(p)
    folder = p.path("external_eval") / name
    out = {"model": name, "configured": intake["configured"], "synthetic": intake["synthetic"], "n_images": int(len(used))}
    if not intake["configured"] or used.empty:
        out["note"] = (
            f"no external set: {intake['source']} holds nothing but hidden files"
            if not intake["configured"]
            else "no external image left: every one duplicates an ingested image or was quarantined"
        )
        with atomic_dir(folder) as tmp:
            write_json(tmp / p.paths.files.metrics, out)
            write_metrics(tmp / p.paths.files.scores, {})
            write_csv(tmp / p.paths.files.predictions, pd.DataFrame(columns=["source_path", "label", "probability", "predicted"]))
        summary(f"external {name}", out["note"])
        return out

    # imported here, where there is a set to score: without one (the default) the stage needs neither scikit-learn
    # nor ONNX Runtime, and skips their second of start-up
    from brainmri.deploy.onnxrt import metadata, probabilities, session
    from brainmri.stats.metrics import fmt, with_intervals

    sess = session(p.model_file("export", name, "onnx"))
    meta = metadata(sess)
    threshold, size = float(meta["threshold"]), int(meta["input_size"])
    paths = [p.path("external_images") / n for n in used["image"]]
    prob = np.concatenate([probabilities(sess, load_batch(paths[i : i + CHUNK], size)) for i in range(0, len(paths), CHUNK)])
    y = (used["label"] == p.ingest.positive_class).to_numpy(int)
    m = with_intervals(y, prob, threshold, p.train.bootstrap, p.seed, groups=used["group"].to_numpy())
    test = json.loads(p.model_file("eval", name, "metrics").read_text())["test"]
    out.update(
        {
            "threshold": threshold,
            "n_positive": int(y.sum()),
            "n_groups": int(used["group"].nunique()),
            "bootstrap_unit": "duplicate group",
            "external": m,
            "change_from_test": {k: round(m[k]["value"] - test[k]["value"], 4) for k in ("auc", "accuracy", "sensitivity", "specificity")},
        }
    )
    if intake["synthetic"]:
        out["note"] = "SYNTHETIC external set: a check of the mechanics, not a generalisation result"
    names = (p.ingest.negative_class, p.ingest.positive_class)
    preds = used[["source_path", "label"]].assign(probability=np.round(prob, 6), predicted=[names[int(v >= threshold)] for v in prob])
    with atomic_dir(folder) as tmp:
        write_json(tmp / p.paths.files.metrics, out)
        write_metrics(
            tmp / p.paths.files.scores,
            {f"external_{k}{s}": m[k][v] for k in ("auc", "accuracy") for s, v in PARTS},
        )
        write_csv(tmp / p.paths.files.predictions, preds)
    summary(
        f"external {name}",
        f"{len(y)} images: AUC {fmt(m['auc']['value'])} [{fmt(m['auc']['ci_low'])}, {fmt(m['auc']['ci_high'])}], accuracy "
        f"{fmt(m['accuracy']['value'])} ({out['change_from_test']['auc']:+.3f} AUC from test)"
        + (" SYNTHETIC" if intake["synthetic"] else ""),
    )
    return out
