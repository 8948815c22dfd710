"""The peer bar: the PyPI package `detect-tumor` (a 4-class VGG16 in ONNX) on the real dataset, against our models.

Needs the ingest and split stages done and `pip install -e .[peer]`. Tumour = any class but "notumor"; its
probability is 1 - p(notumor). The peer runs with its own preprocessing (its package's `preprocess`), ours with ours.

- all images: the peer on every ingested source file; beside it, with --oof, our out-of-fold predictions from
  benchmarks/transfer_bar.py --oof, where every image is scored by a model that never trained on it;
- test split: the peer and each exported model of ours (--models) on the held-out test images.

    python benchmarks/peer.py --oof reports/bar_oof.csv --models vgg16-aug vgg16-noaug
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from brainmri.config import load_params
from brainmri.core.files import read_manifest
from brainmri.deploy.onnxrt import metadata, session
from brainmri.deploy.predict import predict


def peer_probabilities(files: list[str]) -> np.ndarray:
    """p(tumour) from detect-tumor's own model and preprocessing, unrounded (its result object rounds to 0.01%)."""
    import onnxruntime as ort
    from detect_tumor.labels import load_class_labels, load_onnx_bytes
    from detect_tumor.preprocess import preprocess

    sess = ort.InferenceSession(load_onnx_bytes(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    notumor = {v: k for k, v in load_class_labels().items()}["notumor"]
    return np.array([1.0 - float(sess.run(None, {name: preprocess(f)})[0][0][notumor]) for f in files])


def accuracy_auc(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    return float(np.mean((prob >= threshold) == y)), float(roc_auc_score(y, prob))


def scores(y: np.ndarray, prob: np.ndarray, threshold: float) -> str:
    return "accuracy {:.3f}   AUC {:.3f}".format(*accuracy_auc(y, prob, threshold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--oof", help="out-of-fold predictions CSV written by transfer_bar.py --oof")
    ap.add_argument("--models", nargs="*", default=[], help="exported models of ours to score on the test split")
    args = ap.parse_args()
    p = load_params(args.params)
    split = read_manifest(p.path("split_manifest")).sort_values("source_path", kind="stable")
    source = p.resolve(p.ingest.source)
    files = [str(source / s) for s in split["source_path"]]
    y = (split["label"] == p.ingest.positive_class).to_numpy()
    peer = peer_probabilities(files)
    print(f"{len(files)} images of {source} ({int(y.sum())} tumour); tumour = not 'notumor', threshold 0.5 for the peer")
    print(f"  {'detect-tumor 0.1.1 (all images)':<44} {scores(y, peer, 0.5)}")
    if args.oof:
        oof = pd.read_csv(args.oof, keep_default_na=False).set_index("source_path").loc[split["source_path"]]
        kinds: dict[str, list[str]] = {}
        for col in [c for c in oof.columns if c.startswith("p_")]:
            kinds.setdefault(re.sub(r"_\d+$", "", col[2:]), []).append(col)
        for kind, cols in kinds.items():
            acc, auc = zip(*(accuracy_auc(y, oof[c].to_numpy(), 0.5) for c in cols), strict=True)
            label = f"ours out-of-fold, {kind} (all images)"
            each = f"  (per fold assignment: AUC {', '.join(f'{a:.3f}' for a in auc)})" if len(cols) > 1 else ""
            print(f"  {label:<44} accuracy {np.mean(acc):.3f}   AUC {np.mean(auc):.3f}{each}")
    test = (split["split"] == "test").to_numpy()
    print(f"test split: {int(test.sum())} images ({int(y[test].sum())} tumour)")
    print(f"  {'detect-tumor 0.1.1':<44} {scores(y[test], peer[test], 0.5)}")
    for name in args.models:
        model = p.model_file("export", name, "onnx")
        threshold = float(metadata(session(model))["threshold"])
        with tempfile.TemporaryDirectory() as tmp:
            prob = predict(model, [f for f, t in zip(files, test, strict=True) if t], Path(tmp) / "p.csv")["probability"].to_numpy(float)
        print(f"  {name + f' (threshold {threshold:.3f})':<44} {scores(y[test], prob, threshold)}")


if __name__ == "__main__":
    main()
