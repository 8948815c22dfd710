"""Head training alone, at the sizes the pipeline trains: the compiled loop (brainmri.learn.headfit) on synthetic features.

Six heads at once, as one model's final head and its 5 CV folds train (the issue's "head training including 5-fold
CV"), 100 epochs, batch 32, no early stopping, the params' head (dense 256, dropout), under the same op determinism
as the train stage. Sizes: 512-d features (VGG at block 4 or whole) and 2048-d (ResNet50V2), ~170 training rows (a
noaug model on the real set) and ~860 (an aug model: the originals plus their copies). Prints wall and CPU seconds
per size, and the CPU. The train stage trains more heads than this (every grid point's folds, and the CV reruns of
other seeds); its log gives those times.

    python benchmarks/head_speed.py [--epochs 100]

`--settings` runs one size (2048-d, ~860 rows: ResNet50V2 with copies, the train stage's heaviest group) in child
processes under each memory allocator and thread count (issue 33) and prints their times as ratios to the first,
measured in one run, with a digest of the trained weights, which must be the same in every setting:

    python benchmarks/head_speed.py --settings --heads 32 --epochs 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from brainmri.config import load_params
from brainmri.core.machine import cpu_model
from brainmri.learn.headfit import HeadJob, fit_heads
from brainmri.learn.models import build_head

SIZES = [(512, 170), (2048, 170), (512, 860), (2048, 860)]  # (feature width, training rows)


SETTINGS = [  # (label, environment): malloc was TensorFlow's default before issue 33; the stages now pool (BFC)
    ("malloc, 2 threads", {"TF_CPU_ALLOCATOR_USE_BFC": "false"}),
    ("pooled (BFC), 2 threads", {"TF_CPU_ALLOCATOR_USE_BFC": "true"}),
    ("pooled (BFC), 1 thread", {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}),
]


def compare_settings(args) -> None:
    """Each setting in a fresh child process (the allocator and thread pools are fixed when TensorFlow starts)."""
    print(f"CPU: {cpu_model()}; {args.heads} heads, {args.epochs} epochs, 2048-d features, 860 rows")
    rows = []
    for label, env in SETTINGS:
        cmd = [sys.executable, __file__, "--one", "--heads", str(args.heads), "--epochs", str(args.epochs)]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["wall"]
    print("| setting | wall s | user CPU s | system CPU s | wall ratio to the first | weights digest |\n|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['wall']:.1f} | {r['user']:.1f} | {r['system']:.1f} | {r['wall'] / base:.2f} | {r['digest']} |")


def one_setting(args, bb, batch: int) -> None:
    """The 2048-d, 860-row size once, in this process's setting: its times and the trained weights' digest, as JSON."""
    jobs = _jobs(bb, args.heads, 2048, 860)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    fit_heads(jobs, bb.learning_rate, args.epochs, 0, batch)
    wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256(b"".join(w.tobytes() for j in jobs for w in j.head.get_weights())).hexdigest()[:16]
    cpu = {"user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime}
    print(json.dumps({"wall": wall, **cpu, "digest": digest}))


def _jobs(bb, heads: int, d: int, n: int) -> list[HeadJob]:
    rng = np.random.default_rng(0)
    jobs = []
    for h in range(heads):
        x, xv = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n // 5, d)).astype(np.float32)
        y, yv = (rng.random(n) < 0.6).astype(np.float32), (rng.random(n // 5) < 0.6).astype(np.float32)
        jobs.append(HeadJob(build_head(d, bb, 0, adapt_on=x, init_seed=h), x, y, xv, yv, {0: 1.2, 1: 0.8}, h))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--settings", action="store_true", help="compare allocators and thread counts at the heaviest size")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child of --settings
    args = ap.parse_args()
    if args.settings:
        return compare_settings(args)
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as the train stage runs
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    bb = p.backbones["resnet50v2"].at(p.backbones["resnet50v2"].grid()[0])
    if args.one:
        return one_setting(args, bb, p.train.batch_size)
    print(f"CPU: {cpu_model()}; {args.heads} heads, {args.epochs} epochs, batch {p.train.batch_size}")
    for d, n in SIZES:
        jobs = _jobs(bb, args.heads, d, n)
        start, cpu = time.monotonic(), time.process_time()
        fit_heads(jobs, bb.learning_rate, args.epochs, 0, p.train.batch_size)
        print(f"{d}-d features, {n} rows: {time.monotonic() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
