"""The offline transfer-learning bar, measured the way it was set: 5-fold cross-validation over all images with
duplicate groups kept in one fold, frozen backbone features, a plain logistic regression against the pipeline's
trained head (same folds, same features). Needs the ingest and split stages done.

    python benchmarks/transfer_bar.py --model vgg16-noaug --set backbones.vgg16.weights=../shared/weights/vgg16_hed_notop.weights.h5
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from feature_cache import overrides  # noqa: E402  (same folder)

from brainmri import features
from brainmri.config import load_params
from brainmri.models import build_network
from tasks.split import make_part
from tasks.train import cross_validate, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="vgg16-noaug", help="a models.* entry whose backbone has a frozen base; augmentation is not used")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    p = load_params(args.params, {**overrides(args.set), "train": {"cv_folds": args.folds}})
    spec = p.model(args.model)
    seed_everything(p.seed)
    net = build_network(p, spec.backbone, p.seed)
    split = pd.read_csv(p.path("split_manifest"), keep_default_na=False).sort_values("source_path", kind="stable")
    everything = make_part(p, split, p.path("ingest_images"))  # train, val and test alike: the bar's protocol
    feats = features.extract(p, spec.backbone, net.extractor, everything.paths, "all images")
    cv = cross_validate(p, args.model, feats, everything.y, everything.frame["group"].to_numpy(), {})
    m, b = cv["model"], cv["baseline_logreg"]
    print(
        f"{len(everything.y)} images, {args.folds}-fold grouped CV, {p.backbones[spec.backbone].application} features "
        f"({net.weights.describe()})"
    )
    for label, r in (("logistic regression", b), (f"trained head ({args.model})", m)):
        auc, acc = r["auc"], r["accuracy"]
        print(f"{label:<32} AUC {auc['mean']:.3f} +/- {auc['sd']:.3f}   accuracy {acc['mean']:.3f} +/- {acc['sd']:.3f}")
    print(
        f"head minus logistic regression: AUC {m['auc']['mean'] - b['auc']['mean']:+.3f}, "
        f"accuracy {m['accuracy']['mean'] - b['accuracy']['mean']:+.3f} (per-fold AUC differences: "
        + ", ".join(f"{r['model_auc'] - r['baseline_auc']:+.3f}" for r in cv["per_fold"])
        + ")"
    )
    return None


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
