"""Peak memory of each pipeline stage at full size, measured in one run; the budget is 8 GiB.

Runs each stage's own command from dvc.yaml (DAG order, one at a time, as `dvc repro` and the flow with
max_workers 1 do) as a child process, and reads its peak resident set size from the kernel (wait4's
ru_maxrss). It rewrites the stages' outputs in the workspace and does not touch dvc.lock, so use a
measurement clone. Example, in a clone whose params point at the offline weights:
    python benchmarks/peak_memory.py --models vgg19-aug resnet50v2-aug vgg16-aug smallcnn-aug --cold-cache
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from brainmri.config import load_params
from flows.workspace import stage_command, stage_graph, topological

BUDGET_GIB = 8.0


def run(cmd: str, root: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in GiB and exit code of one stage command."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "BRAINMRI_QUIET": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, shell=True, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return time.monotonic() - start, usage.ru_maxrss / 2**20, proc.returncode  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="the workspace's params.yaml (default: %(default)s)")
    ap.add_argument("--models", nargs="*", help="models whose stages to run (default: all in params)")
    ap.add_argument("--stages", nargs="*", help="only these stage kinds, e.g. train export (default: all)")
    ap.add_argument("--cold-cache", action="store_true", help="move the feature cache aside so every feature is computed")
    args = ap.parse_args()
    p = load_params(args.params)
    root = p.root
    models = set(args.models or p.models)
    keep = models | {p.models[m].backbone for m in models}  # weights@BACKBONE stages come with their models
    stages = [s for s in topological(stage_graph(root)) if "@" not in s or s.split("@", 1)[1] in keep]
    if args.stages:
        stages = [s for s in stages if s.split("@")[0] in args.stages]
    if set(models) != set(p.models):
        stages = [s for s in stages if s != "report"]  # the report needs every model's outputs
    cache, aside = p.path("feature_cache"), p.path("feature_cache").with_name("features.peak-memory-aside")
    if args.cold_cache and cache.exists():
        cache.rename(aside)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; budget {BUDGET_GIB:.0f} GiB; cold cache: {args.cold_cache}"
    )
    print(f"{'stage':32s} {'wall s':>8s} {'peak GiB':>9s}")
    rows = []
    try:
        for stage in stages:
            cmd = stage_command(root, stage)
            if Path(args.params).name != "params.yaml":  # stage commands read params.yaml unless told otherwise
                cmd = cmd.replace("brainmri ", f"brainmri --params {shlex.quote(str(Path(args.params).resolve()))} ", 1)
            wall, peak, code = run(cmd, root)
            rows.append((stage, wall, peak))
            print(f"{stage:32s} {wall:8.1f} {peak:9.2f}" + ("  FAILED" if code else ""), flush=True)
            if code:
                return code
    finally:
        if args.cold_cache and aside.exists():
            shutil.rmtree(cache, ignore_errors=True)
            aside.rename(cache)
    worst = max(rows, key=lambda r: r[2])
    total = sum(r[1] for r in rows)
    print(f"total wall {total / 60:.1f} min; largest peak {worst[2]:.2f} GiB in {worst[0]}: {worst[2] / BUDGET_GIB:.2f} of the budget")
    return 0 if worst[2] < BUDGET_GIB else 1


if __name__ == "__main__":
    sys.exit(main())
