"""Pooled CV AUC of the linear head at several inverse penalties C, for one model, chosen exactly as train chooses
(brainmri.learn.selection.select over a grid of `dense: [0]` and the given `linear_c` values, with and without the
augmented copies where the model offers both), from the feature cache.

Shows how flat the linear head's CV AUC is in its penalty, and where the default (C = 1, the CV report's
logistic-regression bar) sits (docs/measurements.md). Reads train+val only; test is never read. Run the pipeline (or
`brainmri train MODEL`) first, so features are cached.

    python benchmarks/linear_penalty.py --model vgg16-aug --c 0.1,0.3,1,3,10
"""

from __future__ import annotations

import argparse
import time

from brainmri.config import load_params
from brainmri.core.machine import cpu_model
from brainmri.learn import features
from brainmri.learn.fitting import data_parts, seed_everything
from brainmri.learn.models import build_network
from brainmri.learn.selection import select
from brainmri.learn.transfer import TrainVal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="vgg16-noaug")
    ap.add_argument("--c", default="0.1,0.3,1,3,10", help="comma-separated inverse penalties (scikit-learn's C), each above 0")
    args = ap.parse_args()
    cs = [float(x) for x in args.c.split(",")]
    base = load_params(args.params)
    backbone = base.models[args.model].backbone
    p = load_params(args.params, {"backbones": {backbone: {"dense": [0], "linear_c": cs}}})
    spec = p.models[args.model]
    seed_everything(p.seed)
    grid = p.grid(args.model)
    net = build_network(p, backbone, p.seed, layers=list(dict.fromkeys(g["feature_layer"] for g in grid)))
    parts = data_parts(p, spec.augment)
    names = ("train", "aug", "val")
    f = [features.extract(p, backbone, net.extractor, part.paths, f"{backbone} {w}") for part, w in zip(parts, names, strict=True)]
    data = TrainVal(net, *parts, *f)
    start = time.monotonic()
    _, _, _, record = select(p, args.model, grid, data.at, data.y, data.groups)
    print(f"CPU: {cpu_model()}; {args.model}, {len(data.y)} train+val images, {p.train.cv_folds}-fold CV, seed {p.seed}")
    for pt in record["points"]:
        layer = pt["feature_layer"] or "whole base"
        auc, loss = pt["cv_auc_pooled_out_of_fold"], pt["cv_bce_pooled_out_of_fold"]
        copies = {True: "with copies", False: "no copies"}.get(pt.get("augment"), "")
        print(f"  {layer:12s} C {pt['linear_c']:<6g} {copies:11s} pooled CV AUC {auc:.4f}  log loss {loss:.4f}")
    print(f"{len(grid)} points in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
