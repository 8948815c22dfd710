"""Permutation test of a model's cross-validated AUC: is the pooled out-of-fold AUC over train+val more than luck?

Each permutation shuffles the labels among the duplicate groups of train+val (a group keeps one label; the augmented
copies follow their image), then cross-validates exactly as train does. By default at the reported configuration:
the grid point train chose (read from data/models/MODEL/train.json), so p answers "is this head's CV AUC real?".
With --with-selection every grid point of params.yaml is cross-validated inside every permutation and the best kept,
so p also pays for the choice among grid points (about 185 s a permutation for the 18-point VGG16 grid on 2 cores).
p = (1 + permutations scoring at least the real AUC) / (1 + permutations). Reads the features from the feature cache
(run the pipeline, or train, first); test is never read.

    python benchmarks/permutation.py --model vgg16-noaug --permutations 200
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from brainmri.config import load_params
from brainmri.core.machine import cpu_model
from brainmri.learn import features
from brainmri.learn.fitting import data_parts, seed_everything
from brainmri.learn.models import build_network
from brainmri.learn.selection import select
from brainmri.learn.transfer import TrainVal


def chosen_auc(p, name: str, grid: list[dict], data: TrainVal, y: np.ndarray) -> float:
    """The pooled out-of-fold AUC of the point of `grid` train would choose with labels `y`."""
    _, _, _, record = select(p, name, grid, data.at, y, data.groups)
    return max(pt["cv_auc_pooled_out_of_fold"] for pt in record["points"])


def group_permutation(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The labels shuffled among duplicate groups: each group takes another group's label, whole."""
    ids, first = np.unique(groups, return_index=True)
    shuffled = dict(zip(ids, rng.permutation(y[first]), strict=True))
    return np.array([shuffled[g] for g in groups])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="vgg16-aug")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--with-selection", action="store_true", help="rerun the whole grid selection in every permutation")
    args = ap.parse_args()
    p = load_params(args.params)
    name, spec = args.model, p.models[args.model]
    grid = p.grid(name)
    if not args.with_selection:
        chosen = json.loads(p.model_file("models", name, "train_metrics").read_text())["selection"]["chosen"]
        grid = [chosen]
    seed_everything(p.seed)
    layers = list(dict.fromkeys(g["feature_layer"] for g in grid))
    net = build_network(p, spec.backbone, p.seed, layers=layers)
    tr, aug, va = data_parts(p, spec.augment)
    f = [
        features.extract(p, spec.backbone, net.extractor, part.paths, f"{spec.backbone} {what}")
        for part, what in ((tr, "train"), (aug, "aug"), (va, "val"))
    ]
    data = TrainVal(net, tr, aug, va, *f)
    start = time.monotonic()
    real = chosen_auc(p, name, grid, data, data.y)
    rng = np.random.default_rng(p.seed)
    null = []
    for i in range(args.permutations):
        null.append(chosen_auc(p, name, grid, data, group_permutation(data.y, data.groups, rng)))
        print(f"permutation {i + 1}/{args.permutations}: chosen AUC {null[-1]:.4f}", flush=True)
    pval = (1 + sum(a >= real for a in null)) / (1 + len(null))
    out = {
        "model": name,
        "cpu": cpu_model(),
        "configuration": grid[0] if len(grid) == 1 else f"grid selection in every permutation ({len(grid)} points)",
        "images": int(len(data.y)),
        "groups": int(len(np.unique(data.groups))),
        "real_chosen_auc": real,
        "permutations": len(null),
        "null_mean": round(float(np.mean(null)), 4),
        "null_p95": round(float(np.percentile(null, 95)), 4),
        "null_max": round(float(np.max(null)), 4),
        "p_value": round(pval, 4),
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
