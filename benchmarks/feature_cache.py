"""Time one head-training epoch on cached features against one epoch through the full frozen model, in one run.

Needs the ingest and split stages done (dvc repro split). Example, full size with the offline VGG16 weights:
    python benchmarks/feature_cache.py --model vgg16-noaug --set backbones.vgg16.weights=../shared/weights/vgg16_hed_notop.weights.h5
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from brainmri.config import load_params
from brainmri.intake.preprocess import load_batch
from brainmri.learn import features
from brainmri.learn.fitting import class_weights, data_parts, seed_everything
from brainmri.learn.models import build_head, build_network
from tasks.weights import weights


def overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = int(value) if value.isdigit() else value
    return out


def timed_epoch(model, x, y, batch: int, cw) -> float:
    start = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=batch, class_weight=cw, shuffle=True, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="vgg16-noaug", help="a models.* entry whose backbone has a frozen base")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param, e.g. backbones.vgg16.input_size=64")
    ap.add_argument("--repeats", type=int, default=3, help="timed head epochs (the median is reported)")
    args = ap.parse_args()
    p = load_params(args.params, overrides(args.set))
    spec = p.models[args.model]
    bb = p.backbones[spec.backbone]
    seed_everything(p.seed)
    weights(p, spec.backbone)  # the weights stage's copy, as train reads it
    net = build_network(p, spec.backbone, p.seed)
    tr, _, _ = data_parts(p, augment=False)
    y, cw, batch = tr.y, class_weights(tr.y, p.train.class_weight), p.train.batch_size
    t0 = time.perf_counter()
    feats = features.extract(p, spec.backbone, net.extractor, tr.paths, "benchmark")
    t_cache = time.perf_counter() - t0  # as the train stage pays it: the feature worker's start (TensorFlow, the extractor's copy) included
    x = load_batch(tr.paths, bb.input_size)

    head = build_head(feats.shape[1], bb, p.seed, adapt_on=feats)
    head.compile(optimizer="adam", loss="binary_crossentropy")
    timed_epoch(head, feats, y, batch, cw)  # warm-up: graph tracing
    t_head = float(np.median([timed_epoch(head, feats, y, batch, cw) for _ in range(args.repeats)]))

    net.attach(build_head(feats.shape[1], bb, p.seed, adapt_on=feats))
    net.full.compile(optimizer="adam", loss="binary_crossentropy")
    net.full.fit(x[: 2 * batch], y[: 2 * batch], epochs=1, batch_size=batch, verbose=0)  # warm-up: graph tracing
    t_full = timed_epoch(net.full, x, y, batch, cw)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model} "
        f"({bb.application}, {bb.input_size} px, weights: {net.weights.describe()}); {len(y)} training images"
    )
    print(f"{'feature cache (this run; 0 if cached before)':<48} {t_cache:9.3f} s")
    print(f"{'one epoch, head on cached features (median)':<48} {t_head:9.3f} s")
    print(f"{'one epoch, full model with frozen base':<48} {t_full:9.3f} s")
    print(f"ratio full / cached: {t_full / t_head:.0f}x (target: at least 20x)")


if __name__ == "__main__":
    main()
