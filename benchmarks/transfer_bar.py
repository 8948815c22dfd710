"""The offline transfer-learning bar, measured the way it was set: 5-fold cross-validation over all images with
duplicate groups kept in one fold, frozen backbone features, a plain logistic regression against the pipeline's
trained head (same folds, same features). Needs the ingest and split stages done.

    python benchmarks/transfer_bar.py --model vgg16-aug --set backbones.vgg16.weights=../shared/weights/vgg16_hed_notop.weights.h5 \
        --set backbones.vgg16.feature_layer=block4_pool

With a feature_layer set, the bar itself (logistic regression on the whole base's features, the protocol it was
set with) is measured on the same folds beside logistic regression on the model's own features.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from feature_cache import overrides  # noqa: E402  (same folder)

from brainmri.config import load_params
from brainmri.core.files import read_manifest, write_csv
from brainmri.core.progress import progress
from brainmri.intake.augment import copies
from brainmri.intake.decode import load_rgb, save_png
from brainmri.intake.parts import make_part
from brainmri.learn import features
from brainmri.learn.crossval import cross_validate
from brainmri.learn.fitting import seed_everything
from brainmri.learn.models import build_network
from tasks.weights import weights


def augmented_features(p, backbone: str, extractor, frame: pd.DataFrame, tmp: Path) -> dict[int, np.ndarray]:
    """Features of augmented copies of every image, drawn as the augment stage draws them; each fold trains on its own."""
    src = p.path("ingest_images")
    paths, owner = [], []
    for i, r in enumerate(progress(frame.itertuples(index=False), "augment all images", total=len(frame))):
        img = load_rgb(src / r.image)
        for k, _, copy in copies(p, img, r.image_id):
            save_png(copy, tmp / f"{r.image_id}_{k}.png")
            paths.append(tmp / f"{r.image_id}_{k}.png")
            owner.append(i)
    feats = features.extract(p, backbone, extractor, paths, "augmented copies")
    return {i: feats[np.array(owner) == i] for i in sorted(set(owner))}


def parse_args() -> argparse.Namespace:
    """The command line: params, model, overrides, folds, repeats and where to write out-of-fold probabilities."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--model",
        default="vgg16-noaug",
        help="a models.* entry with a frozen base; with augment, each fold's head also fits on augmented copies of its own images",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fold assignments to average over (seeds seed, seed+1, ...): one alone moves AUC by 0.01-0.02",
    )
    ap.add_argument("--oof", help="write each image's out-of-fold probabilities (every repeat) to this CSV, for benchmarks/peer.py")
    return ap.parse_args()


def whole_base_runs(args: argparse.Namespace, backbone: str, seed: int, everything, groups: np.ndarray) -> list[dict]:
    """One cross-validation per fold assignment on the whole base's pooled features (feature_layer unset), same folds."""
    q = load_params(args.params, {**overrides(args.set + [f"backbones.{backbone}.feature_layer="]), "train": {"cv_folds": args.folds}})
    whole = build_network(q, backbone, q.seed)
    f_whole = features.extract(q, backbone, whole.extractor, everything.paths, "all images, whole base")
    return [cross_validate(q, args.model, f_whole, everything.y, groups, {}, fold_seed=seed + r) for r in range(args.repeats)]


def print_scores(rows: dict) -> None:
    """Prints each row's AUC (mean of folds, per assignment, pooled out of fold) and accuracy."""
    key = {"baseline": "baseline_logreg", "model": "model"}
    for label, (rs, which) in rows.items():
        auc = np.array([r[key[which]]["auc"]["mean_of_folds"] for r in rs])
        acc = np.array([r[key[which]]["accuracy"]["mean_of_folds"] for r in rs])
        pooled = np.array([r[key[which]]["auc"]["pooled_out_of_fold"] for r in rs])
        print(
            f"{label:<44} AUC, mean of folds {auc.mean():.3f} (per assignment {', '.join(f'{a:.3f}' for a in auc)}), "
            f"pooled out of fold {pooled.mean():.3f}   accuracy, mean of folds {acc.mean():.3f}"
        )


def print_differences(runs: list[dict], rows: dict) -> None:
    """Prints the trained model's per-fold AUC gain over each logistic-regression row."""
    for label, (rs, which) in rows.items():
        if which == "baseline":
            diff = [
                f["model_auc"] - g["baseline_auc"]
                for r, b in zip(runs, rs, strict=True)
                for f, g in zip(r["per_fold"], b["per_fold"], strict=True)
            ]
            print(f"trained model minus {label}: AUC {np.mean(diff):+.3f} (better in {sum(d > 0 for d in diff)} of {len(diff)} folds)")


def write_oof(path: str, split: pd.DataFrame, runs: list[dict]) -> None:
    """Writes each image's out-of-fold probabilities, head and logistic regression, every repeat, to a CSV."""
    frame = split[["source_path", "label", "group"]].copy()
    for r, run in enumerate(runs, 1):
        frame[f"p_head_{r}"], frame[f"p_logreg_{r}"] = run["predictions"]["model"], run["predictions"]["baseline"]
    write_csv(path, frame)
    print(f"out-of-fold probabilities: {path}")


def main() -> None:
    args = parse_args()
    p = load_params(args.params, {**overrides(args.set), "train": {"cv_folds": args.folds}})
    spec = p.model(args.model)
    seed_everything(p.seed)
    weights(p, spec.backbone)  # the weights stage's copy, as train reads it
    net = build_network(p, spec.backbone, p.seed)
    split = read_manifest(p.path("split_manifest")).sort_values("source_path", kind="stable")
    everything = make_part(p, split, p.path("ingest_images"))  # train, val and test alike: the bar's protocol
    feats = features.extract(p, spec.backbone, net.extractor, everything.paths, "all images")
    groups = everything.frame["group"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        aug = augmented_features(p, spec.backbone, net.extractor, everything.frame, Path(tmp)) if spec.augment else {}
    runs = [cross_validate(p, args.model, feats, everything.y, groups, aug, fold_seed=p.seed + r) for r in range(args.repeats)]
    bb = p.backbones[spec.backbone].at(p.backbones[spec.backbone].grid()[0])  # a grid in params: its first point
    standard = None
    if bb.feature_layer:  # the bar as set: logistic regression on the whole base's pooled features, same folds
        standard = whole_base_runs(args, spec.backbone, p.seed, everything, groups)
    print(
        f"{len(everything.y)} images, {args.folds}-fold grouped CV x {args.repeats} fold assignments, {bb.application} features "
        f"at {bb.feature_layer or 'the last layer'}, {bb.pooling} pooled ({net.weights.describe()})"
    )
    rows = {"logistic regression, same features": (runs, "baseline"), f"trained model ({args.model})": (runs, "model")}
    if standard:
        rows = {"logistic regression, whole base (the bar)": (standard, "baseline"), **rows}
    print_scores(rows)
    print_differences(runs, rows)
    if args.oof:
        write_oof(args.oof, split, runs)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
