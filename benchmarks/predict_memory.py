"""Peak memory of `brainmri predict` against the number of inputs: it should not grow with them.

    python benchmarks/predict_memory.py [--counts 100 10000] [--size 224]

Each count runs in a fresh process on that many image files (hard links to real scans, cycling through them)
with a tiny ONNX model built here (probability = mean brightness; the model is not what is measured), at the
backbones' 224 px input, so that holding every decoded input at once would cost 224 x 224 x 3 x 4 bytes = 0.6 MB
per image. Prints the peak RSS of each run and the ratio of the largest count to the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from factory import SHARED_DATA, tiny_onnx  # noqa: E402

from brainmri.core.machine import cpu_model  # noqa: E402

CHILD = """
import json, resource, sys, time
from brainmri.deploy.predict import predict
t = time.perf_counter()
frame = predict(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(json.dumps({"rows": len(frame), "errors": int((frame["error"] != "").sum()), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    sources = sorted(f for f in SHARED_DATA.glob("*/*.jpg"))[:50]
    print(f"CPU: {cpu_model()}; model input {args.size} px; inputs cycle through {len(sources)} real JPEG scans")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BRAINMRI_QUIET": "1"}
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        model = tiny_onnx(Path(tmp) / "model.onnx", size=args.size)
        for n in args.counts:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            for i in range(n):
                link = folder / f"{i:06d}.jpg"
                try:
                    os.link(sources[i % len(sources)], link)
                except OSError:  # another file system than the data's: copy instead
                    link.write_bytes(sources[i % len(sources)].read_bytes())
            start = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(model), str(folder), str(Path(tmp) / f"n{n}.csv")],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            peaks[n] = r["peak_rss_mb"]
            print(
                f"{n:>6} images: {r['rows']} rows ({r['errors']} errors) in {r['seconds']:.1f} s "
                f"({n / r['seconds']:.0f} images/s; process {time.perf_counter() - start:.1f} s); peak RSS {r['peak_rss_mb']:.1f} MB"
            )
    lo, hi = min(args.counts), max(args.counts)
    ratio = peaks[hi] / peaks[lo]
    print(f"peak RSS at {hi} images / at {lo} images = {ratio:.3f} ({'within' if ratio <= 1.10 else 'NOT within'} 10%)")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
