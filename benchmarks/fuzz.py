"""Fuzz benchmark: mutated real images through the decoding boundary and through ingest, split and predict; model
metadata through predict's reader; small random ONNX graphs through predict.

    python benchmarks/fuzz.py [--decode 20000] [--pipeline 10000] [--metadata 20000] [--graph 1000] [--batch 500] [--seed 16]

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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
