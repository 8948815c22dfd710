"""Head training on cached features: the compiled loop (brainmri.learn.headfit) against the Keras-fit path it replaced.

For each model, on the same split, seed and initial weights, both paths train the final head and its 5-fold CV:
the old one is tasks/train.py exactly as it was at --old-commit (read with `git show`, not copied), the new one is
brainmri.learn.transfer.head_and_cv. Printed per model: val and test AUC of the final head, CV AUC (mean of folds), the largest
per-image change of test probability between the two, and the wall time of head training incl. CV (feature
extraction excluded: both read the same cache; the new path's time includes tracing and compiling its tf.function),
wall and CPU seconds of this process (on a shared machine the CPU time is the steadier of the two).

Needs ingest, split and augment done in the project of --params; features are computed once into its cache.
The documented offline measurement (README) on a project with the real set:

    python benchmarks/heads.py --params /tmp/ws/params.yaml --models vgg16-noaug vgg16-aug \\
        --set backbones.vgg16.weights=/work/shared/weights/vgg16_hed_notop.weights.h5 --set backbones.vgg16.feature_layer=block4_pool
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from feature_cache import overrides  # noqa: E402  (same folder)
from sklearn.metrics import roc_auc_score

from brainmri.config import load_params
from brainmri.core.machine import cpu_model
from brainmri.intake.parts import split_part
from brainmri.learn import features, fitting
from brainmri.learn.models import build_head, build_network
from brainmri.learn.transfer import head_and_cv

REPO = Path(__file__).resolve().parents[1]


def old_module(commit: str):
    """tasks/train.py as it was at `commit`, imported under another name beside the current one."""
    src = subprocess.run(["git", "show", f"{commit}:tasks/train.py"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"tasks.train_{commit}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, f"{commit}:tasks/train.py", "exec"), mod.__dict__)  # noqa: S102  (our own file from git history)
    return mod


def run(p, name: str, old, reseed: bool) -> dict:
    spec = p.model(name)
    bb = p.backbones[spec.backbone].at(p.backbones[spec.backbone].grid()[0])  # a grid in params: its first point
    tr, aug, va = fitting.data_parts(p, spec.augment)
    te = split_part(p, "test")
    fitting.seed_everything(p.seed)
    net = build_network(p, spec.backbone, p.seed)
    f_tr, f_aug, f_val, f_te = (
        features.extract(p, spec.backbone, net.extractor, part.paths, d)
        for part, d in ((tr, "train"), (aug, "aug"), (va, "val"), (te, "test"))
    )
    out = {}
    for path in ("old", "new"):
        fitting.seed_everything(p.seed)  # the same global random state as the stage at this point: same initial weights
        net = build_network(p, spec.backbone, p.seed)
        start, cpu = time.monotonic(), time.process_time()
        if path == "old":  # the old stage's lines, calling the old module's fit and _cv
            f_fit, y_fit = np.concatenate([f_tr, f_aug]), np.concatenate([tr.y, aug.y])
            net.attach(build_head(f_fit.shape[1], bb, p.seed, adapt_on=f_fit))
            fit_args = {"batch": p.train.batch_size, "cw": old.class_weights(y_fit, p.train.class_weight), "patience": bb.patience}
            history, best = old.fit(net.head, f_fit, y_fit, (f_val, va.y), bb.learning_rate, bb.epochs, label=f"train {name}", **fit_args)
            cv = old._cv(p, name, tr, aug, va, f_tr, f_aug, f_val)
        else:
            result = head_and_cv(p, name, net, tr, aug, va, f_tr, f_aug, f_val)
            history, best, cv = result.history, result.best, result.cv
        seconds, cpu = time.monotonic() - start, time.process_time() - cpu
        out[path] = {
            "seconds": seconds,
            "cpu_s": cpu,
            "best": best,
            "epochs": len(history),
            "val_auc": roc_auc_score(va.y, fitting.predict(net.head, f_val)),
            "test_auc": roc_auc_score(te.y, fitting.predict(net.head, f_te)),
            "cv_auc": cv["model"]["auc"]["mean"],
            "p_test": fitting.predict(net.head, f_te),
        }
    noise = {}
    if reseed:  # the old path's own draw noise: its final head again, same initial weights, shuffle/dropout seed + 1
        import keras

        fitting.seed_everything(p.seed)
        net = build_network(p, spec.backbone, p.seed)
        f_fit, y_fit = np.concatenate([f_tr, f_aug]), np.concatenate([tr.y, aug.y])
        net.attach(build_head(f_fit.shape[1], bb, p.seed, adapt_on=f_fit))
        keras.utils.set_random_seed(p.seed + 1)
        fit_args = {"batch": p.train.batch_size, "cw": old.class_weights(y_fit, p.train.class_weight), "patience": bb.patience}
        old.fit(net.head, f_fit, y_fit, (f_val, va.y), bb.learning_rate, bb.epochs, label=f"train {name}", **fit_args)
        p_alt = fitting.predict(net.head, f_te)
        noise = {
            "old reseeded: test_auc": roc_auc_score(te.y, p_alt),
            "old reseeded: max |dp| test": float(np.abs(out["old"]["p_test"] - p_alt).max()),
        }
    return {
        "model": name,
        **{f"{k} {path}": out[path][k] for k in ("test_auc", "val_auc", "cv_auc", "seconds", "cpu_s") for path in ("old", "new")},
        "max |dp| test": float(np.abs(out["old"]["p_test"] - out["new"]["p_test"]).max()),
        "epochs old/new": f"{out['old']['best']}/{out['old']['epochs']} {out['new']['best']}/{out['new']['epochs']}",
        **noise,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="+", default=["vgg16-noaug", "vgg16-aug"], help="models.* entries with a frozen base")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--old-commit", default="189fc24", help="the commit whose tasks/train.py is the old path (Keras model.fit)")
    ap.add_argument(
        "--reseed",
        action="store_true",
        help="also train the old path's final head with shuffle/dropout seed + 1 (same start): its own max |dp| on test, for scale",
    )
    args = ap.parse_args()
    p = load_params(args.params, overrides(args.set))
    old = old_module(args.old_commit)
    rows = []
    for name in args.models:
        rows.append(run(p, name, old, args.reseed))
        print(pd.DataFrame(rows[-1:]).round(4).to_string(index=False), flush=True)
    import tensorflow as tf

    print(
        f"\nhead training incl. {p.train.cv_folds}-fold CV, old = tasks/train.py@{args.old_commit} (Keras fit), "
        "new = brainmri.learn.headfit"
    )
    print(f"CPU: {cpu_model()}; TensorFlow {tf.__version__}; Python {sys.version.split()[0]}")
    print(pd.DataFrame(rows).round(4).to_markdown(index=False))


if __name__ == "__main__":
    main()
