"""Peak memory of `brainmri predict` against the number of inputs (it should not grow with them), and against the
model: normal ones and the worst hostile ones that can be built (it should stay under 1.5 GiB).

    python benchmarks/predict_memory.py [--counts 100 10000] [--size 224] [--models tiny vgg19 bomb:Expand:250000000 ...]

Each count runs in a fresh process on that many image files (hard links to real scans, cycling through them)
with a tiny ONNX model built here (probability = mean brightness; the model is not what is measured), at the
backbones' 224 px input, so that holding every decoded input at once would cost 224 x 224 x 3 x 4 bytes = 0.6 MB
per image. Prints the peak RSS of each run and the ratio of the largest count to the smallest.

`--models` then runs predict on the smallest count with each model: tiny; vgg19 (VGG19's convolutions at 224 px,
random weights: the largest exported model's cost); bomb:OP:N (tests/fuzzing.py: OP asks for N float32 values);
loop:BODY (2^62 trips, stopped at a 5 s limit). predict's model runs in a worker process: each line gives predict's
own peak RSS, the worker's, and the most the two held at the same moment (sampled every 2 ms).
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
import json, re, resource, sys, time
from brainmri.core.errors import BrainMRIError
from brainmri.deploy import sandbox
from brainmri.deploy.predict import predict

def high_water(pid):  # VmHWM: this process's own peak (ru_maxrss also counts what the parent held when it forked)
    try:
        return int(re.search(r"VmHWM:\\s+(\\d+)", open(f"/proc/{pid}/status").read()).group(1)) / 1024
    except (OSError, AttributeError):  # gone: ended by its cap
        return None

def rss(pid):
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * 4096 / 2**20
    except (OSError, IndexError):
        return 0.0

workers, live, together = [], [], [0.0]
start, close = sandbox.Worker.__init__, sandbox.Worker.close
def starting(self, *a, **k):
    start(self, *a, **k)
    live.append(self.proc.pid)
def closing(self):
    workers.append(high_water(self.proc.pid))
    close(self)
sandbox.Worker.__init__, sandbox.Worker.close = starting, closing

def sample():  # both processes' resident memory at the same moments, every 2 ms: what they hold together
    while True:
        together[0] = max(together[0], rss("self") + sum(rss(w) for w in live))
        time.sleep(0.002)

import threading
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
try:
    frame = predict(sys.argv[1], sys.argv[2:-1], sys.argv[-1], bounds={"run_seconds": 5.0} if "loop" in sys.argv[1] else None)
    rows, errors, outcome = len(frame), int((frame["error"] != "").sum()), "scored"
except BrainMRIError as exc:
    rows, errors, outcome = 0, 0, str(exc).split(": ", 1)[-1]
worker = max([w for w in workers if w is not None], default=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
print(json.dumps({"rows": rows, "errors": errors, "seconds": time.perf_counter() - t, "outcome": outcome,
                  "peak_rss_mb": high_water("self"), "worker_rss_mb": worker, "together_mb": together[0]}))
"""


def build(spec: str, path: Path, size: int) -> Path:
    """The model named by `spec` (see the module's docstring), saved at `path`."""
    import onnx
    from fuzzing import bomb, loop

    if spec == "tiny":
        return tiny_onnx(path, size=size)
    if spec == "vgg19":
        from fuzzing import vgg19

        return vgg19(path, size)
    kind, *args = spec.split(":")
    onnx.save(bomb(args[0], int(args[1]), size=size) if kind == "bomb" else loop(args[0], size=size), path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", nargs="*", default=[], help="tiny, vgg19, bomb:OP:N or loop:BODY (see above)")
    ap.add_argument("--extra", nargs="*", default=[], help="more input files for --models (a 40-megapixel scan, say)")
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
        for spec in args.models:
            model = build(spec, Path(tmp) / f"{spec.replace(':', '-')}.onnx", args.size)
            n = min(args.counts)
            inputs = [str(Path(tmp) / f"n{n}"), *args.extra]
            cmd = [sys.executable, "-c", CHILD, str(model), *inputs, str(Path(tmp) / f"{model.stem}.csv")]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout.splitlines()[-1])
            both = r["together_mb"]
            print(
                f"{spec:>30}: {r['outcome'][:70]:<70} {r['seconds']:5.1f} s; peaks: predict {r['peak_rss_mb']:6.1f} MB, worker "
                f"{r['worker_rss_mb']:6.1f} MB, both at once {both:6.1f} MB ({'under' if both < 1536 else 'OVER'} 1.5 GiB)"
            )
    lo, hi = min(args.counts), max(args.counts)
    ratio = peaks[hi] / peaks[lo]
    print(f"peak RSS at {hi} images / at {lo} images = {ratio:.3f} ({'within' if ratio <= 1.10 else 'NOT within'} 10%)")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
