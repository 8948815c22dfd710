"""Head training alone, at the sizes the pipeline trains: the compiled loop (brainmri.learn.headfit) on synthetic features.

Six heads at once, as one model's final head and its 5 CV folds train (the issue's "head training including 5-fold
CV"), 100 epochs, batch 32, no early stopping, the params' head (dense 256, dropout), under the same op determinism
as the train stage. Sizes: 512-d features (VGG at block 4 or whole) and 2048-d (ResNet50V2), ~170 training rows (a
noaug model on the real set) and ~860 (an aug model: the originals plus their copies). Prints wall and CPU seconds
per size, and the CPU. The train stage trains more heads than this (every grid point's folds, and the CV reruns of
other seeds); its log gives those times.

    python benchmarks/head_speed.py [--epochs 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from brainmri.config import load_params
from brainmri.core.machine import cpu_model
from brainmri.learn.headfit import HeadJob, fit_heads
from brainmri.learn.models import build_head

SIZES = [(512, 170), (2048, 170), (512, 860), (2048, 860)]  # (feature width, training rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--heads", type=int, default=6)
    args = ap.parse_args()
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as the train stage runs
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    bb = p.backbones["resnet50v2"].at(p.backbones["resnet50v2"].grid()[0])
    print(f"CPU: {cpu_model()}; {args.heads} heads, {args.epochs} epochs, batch {p.train.batch_size}")
    for d, n in SIZES:
        rng = np.random.default_rng(0)
        jobs = []
        for h in range(args.heads):
            x, xv = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n // 5, d)).astype(np.float32)
            y, yv = (rng.random(n) < 0.6).astype(np.float32), (rng.random(n // 5) < 0.6).astype(np.float32)
            jobs.append(HeadJob(build_head(d, bb, 0, adapt_on=x, init_seed=h), x, y, xv, yv, {0: 1.2, 1: 0.8}, h))
        start, cpu = time.monotonic(), time.process_time()
        fit_heads(jobs, bb.learning_rate, args.epochs, 0, p.train.batch_size)
        print(f"{d}-d features, {n} rows: {time.monotonic() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
