"""How ingest and split grow with the number of images: n = 1k, 3k, 10k, 30k (the issue's targets: 3,000 in at most
60 s, 10,000 in at most 3 minutes and 2 GiB, 30,000 in at most 10 minutes, on 2 cores).

Each set mixes perturbed copies of the real images (one of benchmarks/duplicates.py's kinds each: crops into the
head, pads, rescales, JPEG re-encodes, gamma, small turns, burned-in text) with brain-like phantoms
(brainmri.intake.phantoms), a fifth of those with a near-copy; image k depends on the seed and k alone, so the
set of n images is the first n of a pool generated once under --work (hard links, as ingest follows no symbolic
links). ingest and split run in a fresh process per n, with the default params.yaml but ingest.source set. Printed
per n: the wall time of each stage, the peak resident memory of the stage process and of its largest worker, the
duplicate groups found, and the growth exponent log(t2/t1)/log(n2/n1) between successive n.

    python benchmarks/ingest_scale.py [--n 1000 3000 10000] [--work /work/scale-data/ingest_scale] [--seed 0]

--work must lie outside the repository: the sets are generated data, never committed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from duplicates import KINDS, perturb  # noqa: E402

from brainmri.core.machine import cpu_model  # noqa: E402
from brainmri.intake.phantoms import phantom  # noqa: E402

REAL_SHARE = 0.4  # of the images, perturbed copies of real ones: 10k images give each real scan ~16 copies
NEAR_COPY_SHARE = 0.2  # of the phantoms, followed by a near-copy (re-encoded, shifted by a few pixels)


def parse_args() -> argparse.Namespace:
    """The command line: the sizes, where the sets go, the data and the seed; --run is the child's own mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--work", default="/work/scale-data/ingest_scale")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "brain_tumor_dataset"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", nargs=2, metavar=("SOURCE", "PROJECT"), help=argparse.SUPPRESS)
    return ap.parse_args()


def _image(k: int, real: list[tuple[str, Path]], seed: int) -> tuple[str, bytes, str]:
    """Image k of the pool: (class, encoded bytes, extension)."""
    rng = np.random.default_rng([seed, k])
    if rng.random() < REAL_SHARE:
        label, path = real[int(rng.integers(len(real)))]
        with Image.open(path) as img:
            out = perturb(img.convert("RGB"), str(rng.choice(list(KINDS))), rng)
    else:
        tumor = bool(rng.random() < 0.5)
        label = "yes" if tumor else "no"
        base = np.random.default_rng([seed, k - 1 if k and rng.random() < NEAR_COPY_SHARE else k, 7])  # near-copy of k-1
        arr = np.pad(phantom(base, tumor, int(base.integers(200, 321)), int(base.integers(200, 321))), 16)
        out = Image.fromarray(np.roll(arr, int(rng.integers(-4, 5)), axis=1))
    buf = io.BytesIO()
    if rng.random() < 0.7:
        out.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        return label, buf.getvalue(), ".jpg"
    out.convert("RGB").save(buf, format="PNG")
    return label, buf.getvalue(), ".png"


def pool(work: Path, n: int, data: Path, seed: int) -> Path:
    """The first n images of the pool under work/pool (made where missing), in class folders."""
    real = sorted((f.parent.name, f) for f in data.glob("*/*") if f.is_file())
    root = work / f"pool-{seed}"
    for c in ("no", "yes"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        if not any((root / c / f"{k:06d}{e}").exists() for c in ("no", "yes") for e in (".jpg", ".png")):
            label, data_bytes, ext = _image(k, real, seed)
            (root / label / f"{k:06d}{ext}").write_bytes(data_bytes)
    return root


def subset(work: Path, root: Path, n: int) -> Path:
    """A folder of the pool's first n images (hard links)."""
    out = work / f"set-{n}"
    shutil.rmtree(out, ignore_errors=True)
    for c in ("no", "yes"):
        (out / c).mkdir(parents=True)
        for f in (root / c).iterdir():
            if int(f.stem) < n:
                os.link(f, out / c / f.name)
    return out


def child(source: str, project: str) -> None:
    """In the fresh process: ingest and split `source` into `project`; print one JSON line of times and memory."""
    import resource

    from brainmri.config import load_params
    from tasks.ingest import ingest
    from tasks.split import split

    proj = Path(project)
    proj.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    for d in ("subjects", "weights"):
        (proj / d).mkdir(exist_ok=True)
    p = load_params(proj / "params.yaml", {"ingest": {"source": source}})
    t0 = time.monotonic()
    report = ingest(p)
    t1 = time.monotonic()
    split(p)
    t2 = time.monotonic()
    own, workers = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    d = report["duplicates"]
    out = {"ingest_s": t1 - t0, "split_s": t2 - t1, "peak_mib": own, "worker_peak_mib": workers}
    print(json.dumps({**out, **d, "conflicts": len(d["conflicts"])}))


def measure(work: Path, source: Path, n: int) -> dict:
    """ingest + split of `source` in a fresh process; its JSON line."""
    project = work / f"project-{n}"
    shutil.rmtree(project, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, __file__, "--run", str(source), str(project)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.run:
        child(*args.run)
        return
    work = Path(args.work)
    if work.resolve().is_relative_to(REPO):
        sys.exit(f"--work {work} lies inside the repository; generated sets stay outside it")
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; seed {args.seed}")
    print("| n | ingest s | split s | total s | peak MiB (stage / worker) | groups | duplicate groups | images in them | exponent |")
    print("|---|---|---|---|---|---|---|---|---|")
    prev = None
    for n in sorted(args.n):
        started = time.monotonic()
        source = subset(work, pool(work, n, Path(args.data), args.seed), n)
        made = time.monotonic() - started
        r = measure(work, source, n)
        total = r["ingest_s"] + r["split_s"]
        exp = f"{math.log(total / prev[1]) / math.log(n / prev[0]):.2f}" if prev else ""
        print(
            f"| {n} | {r['ingest_s']:.1f} | {r['split_s']:.1f} | {total:.1f} | {r['peak_mib']:.0f} / {r['worker_peak_mib']:.0f} | "
            f"{r['n_groups']} | {r['n_duplicate_groups']} | {r['n_images_in_duplicate_groups']} | {exp} |",
            flush=True,
        )
        print(f"  (set made in {made:.0f} s; {r['conflicts']} label conflicts)", flush=True)
        prev = (n, total)


if __name__ == "__main__":
    main()
