"""Fuzz benchmark: mutated real images through the decoding boundary and through ingest, split and predict; model
metadata through predict's reader; small random ONNX graphs through predict; hostile params.yaml files (Hypothesis);
stage commands run two at a time on one workspace.

    python benchmarks/fuzz.py [--decode 20000] [--pipeline 10000] [--metadata 20000] [--graph 1000] [--params 2000]
                              [--concurrent 20] [--batch 500] [--seed 16]

Cases come from tests/fuzzing.py (seeded: the same arguments give the same bytes). Each batch runs in process in
one worker under a memory cap and per-case timeouts; this prints the count, the speed and every failure (a
traceback, a hang, a memory refusal, a lost row, a message of more than one line, a temporary file left, a model's
worker past 1 GiB). Exit 1 if there was any failure. A graph case starts a model worker (about 0.5 s); a metadata
case takes microseconds: a run of 10,000 cases in about 20 CPU minutes is mostly metadata and decode cases.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzzing  # noqa: E402

from brainmri.core.machine import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", type=int, default=20_000, help="mutated inputs through decode_bytes")
    ap.add_argument("--pipeline", type=int, default=10_000, help="mutated files (hostile names) through ingest, split, predict")
    ap.add_argument("--metadata", type=int, default=20_000, help="random model metadata through predict's reader")
    ap.add_argument("--graph", type=int, default=1_000, help="small random ONNX graphs through predict")
    ap.add_argument("--params", type=int, default=2_000, help="hostile params.yaml files (Hypothesis, tests/fuzz_params.py)")
    ap.add_argument("--concurrent", type=int, default=20, help="pairs of stage commands started together on one workspace")
    ap.add_argument("--batch", type=int, default=500, help="inputs per worker process (pipeline: per dataset folder)")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; memory cap {fuzzing.MEMORY_CAP >> 30} GiB per worker, {fuzzing.CASE_TIMEOUT:g} s per case")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        plan = (
            ("decode", args.decode, 2 * args.batch),
            ("pipeline", args.pipeline, args.batch),
            ("metadata", args.metadata, 10 * args.batch),
            ("graph", args.graph, max(1, args.batch // 5)),
        )
        for mode, total, batch in plan:
            if not total:
                continue
            start, totals, failures, rss = time.perf_counter(), Counter(), [], 0.0
            for first in range(0, total, batch):
                n = min(batch, total - first)
                timeout = 120 + (2 + 2 * fuzzing.GRAPH_SECONDS) * n if mode == "graph" else 120 + 2 * n
                r = fuzzing.run_batch(args.seed, first, n, mode, Path(tmp) / f"{mode}-{first}", timeout=timeout)
                failures += r.pop("failures")
                rss = max(rss, r.pop("max_rss_mb", 0.0), r.pop("worker_peak_rss_mb", 0.0))
                r.pop("seconds", None)
                totals.update(r)
            wall = time.perf_counter() - start
            detail = ", ".join(f"{k} {v}" for k, v in totals.items() if k != "cases")
            print(
                f"{mode}: {totals['cases']} cases in {wall:.1f} s = {totals['cases'] / wall:.0f}/s ({detail}); "
                f"worker peak RSS {rss:.0f} MB (a model's worker included); failures: {len(failures)}"
            )
            for f in failures[:20]:
                print(f"  FAIL case {f['case']} [{f['kind']}]: {f['error'][:300]}")
            failed += len(failures)
        for mode, total, run in (("params", args.params, fuzz_params), ("concurrent", args.concurrent, fuzz_concurrent)):
            if total:
                failed += report(mode, *timed(run, total, args.seed, Path(tmp) / mode))
    return 1 if failed else 0


def timed(run, total: int, seed: int, work: Path) -> tuple:
    start = time.perf_counter()
    cases, failures = run(total, seed, work)
    return cases, failures, time.perf_counter() - start


def report(mode: str, cases: int, failures: list[str], wall: float) -> int:
    print(f"{mode}: {cases} cases in {wall:.1f} s = {cases / max(wall, 1e-9):.1f}/s; failures: {len(failures)}")
    for f in failures[:20]:
        print(f"  FAIL [{mode}]: {f[:300]}")
    return len(failures)


def fuzz_params(total: int, seed: int, work: Path) -> tuple[int, list[str]]:
    """`total` hostile params files, drawn by Hypothesis; the first failure stops the run (Hypothesis then shrinks it)."""
    import itertools

    from fuzz_params import check_case, hostile_params
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    counter, failures = itertools.count(), []

    @hypothesis_seed(seed)
    @settings(max_examples=total, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile_params())
    def case(params):
        problem = check_case(work / f"p{next(counter)}", params)
        if problem:
            failures.append(problem)
            raise AssertionError(problem)

    try:
        case()
    except AssertionError:
        pass
    return next(counter), failures[:1]


def fuzz_concurrent(total: int, seed: int, work: Path) -> tuple[int, list[str]]:
    """Pairs of one stage's command started together (a random delay apart) on one phantom workspace: each ends in 0,
    or 2 naming the run that holds the stage; afterwards the outputs are whole and no temporary file is left. (Two
    different stages at once are DVC's to order: `dvc repro` and the flow hold its locks.)"""
    import random
    import subprocess

    rng, failures = random.Random(seed), []
    root = concurrent_workspace(work)
    for i in range(total):
        pair = [rng.choice(["ingest", "split", "augment", "audit"])] * 2  # the same stage twice: one lock holds the other off
        first = subprocess.Popen(["brainmri", "-q", pair[0]], cwd=root, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0, 3))
        second = subprocess.run(["brainmri", "-q", pair[1]], cwd=root, capture_output=True, text=True, timeout=600)
        first_err = first.communicate(timeout=600)[1]
        for stage, code, err in ((pair[0], first.returncode, first_err), (pair[1], second.returncode, second.stderr)):
            if code not in (0, 2) or "Traceback" in err or (code == 2 and "already runs" not in err and "not found" not in err):
                failures.append(f"case {i} {pair}: {stage} exit {code}: {err[-300:]}")
        failures += [f"case {i} {pair}: {problem}" for problem in workspace_problems(root)]
    return total, failures


def concurrent_workspace(work: Path) -> Path:
    """A phantom project, ingested, split and augmented once."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from factory import make_project, tiny_training

    from brainmri.config import load_params
    from brainmri.intake.phantoms import generate
    from flows.cli import main

    root = make_project(work, {**tiny_training(), "ingest": {"source": "data/raw/ph"}})
    generate(load_params(root / "params.yaml").resolve("data/raw/ph"), {"yes": True, "no": False}, 12, 1, 64, 96, 0.1)
    for stage in ("ingest", "split", "augment"):
        main(["--params", str(root / "params.yaml"), "-q", stage])
    return root


def workspace_problems(root: Path) -> list[str]:
    """Temporary files left, or outputs that do not read back whole."""
    from brainmri.core.files import read_manifest

    left = sorted(str(f.relative_to(root)) for f in root.rglob(".*.tmp*"))
    problems = [f"temporary files left: {left[:5]}"] if left else []
    for manifest, folder in (("data/ingest/manifest.csv", "data/ingest/images"), ("data/augment/manifest.csv", "data/augment/images")):
        if (root / manifest).is_file():
            rows = read_manifest(root / manifest)
            missing = [n for n in rows["image"] if not (root / folder / n).is_file()]
            problems += [f"{manifest}: {len(missing)} images missing from {folder}"] if missing else []
    return problems


if __name__ == "__main__":
    sys.exit(main())
