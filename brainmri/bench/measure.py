"""Timed rows: every runtime at batch 1 and benchmark.batch_size in interleaved rounds, as median and quartiles per
image; for a model's runtimes with the GEMM peaks beside them (benchmark), for a composed graph's ONNX rows (ensemble)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from brainmri.bench.peaks import matmul_peak, ort_gemm_peaks
from brainmri.bench.ranking import ranking
from brainmri.bench.timing import interleaved, round_settings, timing_batch
from brainmri.config import Params
from brainmri.core import timing_lock
from brainmri.core.machine import cpu_model
from brainmri.core.progress import log


def measure(p: Params, name: str, runtimes: dict[str, Callable], images: np.ndarray, flops: int) -> dict:
    """Time every runtime at batch 1 and benchmark.batch_size in interleaved rounds, with the GEMM peaks."""
    b = p.benchmark
    peak = matmul_peak(b.threads)
    gemm = ort_gemm_peaks(b.threads)
    rows = []
    for batch in (1, b.batch_size):
        x = np.ascontiguousarray(images[:batch])
        seconds = interleaved(runtimes, x, b, first=batch == 1)
        for rt in runtimes:
            per_image = np.array(seconds[rt]) / batch * 1000.0
            rows.append(_row(name, rt, batch, per_image, flops, gemm))
    return {"rows": rows, "gemm": gemm, "numpy_peak": peak}


def _row(name: str, rt: str, batch: int, per_image: np.ndarray, flops: int, gemm: dict[str, float]) -> dict:
    """One runtime's figures at one batch size from its milliseconds per image, one value a round; logged."""
    ips = 1000.0 / float(np.median(per_image))
    p25, p50, p75 = (float(v) for v in np.percentile(per_image, [25, 50, 75]))
    row_peak, unit = (gemm["int8"], "int8") if rt.endswith("int8") else (gemm["fp32"], "fp32")
    log.info("benchmark %s: %s batch %d: %.1f ms/image (IQR %.1f)", name, rt, batch, p50, p75 - p25)
    return {
        "runtime": rt,
        "batch": batch,
        "rounds": len(per_image),  # timed calls behind these figures (benchmark.min_repeats to .repeats)
        "p50_ms": round(p50, 3),
        "p25_ms": round(p25, 3),
        "p75_ms": round(p75, 3),
        "iqr_ms": round(p75 - p25, 3),
        "p95_ms": round(float(np.percentile(per_image, 95)), 3),
        "mean_ms": round(float(per_image.mean()), 3),
        "images_per_s": round(ips, 2),
        "gflops_per_s": round(flops * ips / 1e9, 1),
        "share_of_matmul_peak": round(flops * ips / 1e9 / row_peak, 3),  # of ONNX Runtime's own GEMM rate, in its precision
        "peak_kind": unit,
    }


def composed_latency(p: Params, path, images: np.ndarray) -> dict:
    """The composed graph timed as benchmark@MODEL times the ONNX rows of any model (ONNX Runtime and OpenVINO fp32,
    benchmark.* settings, interleaved rounds), with no other stage process running (brainmri/core/timing_lock.py)."""
    from brainmri.deploy.runtimes import runner

    b = p.benchmark
    runtimes = {rt: runner(path, kind, b.threads) for rt, kind in (("onnxruntime_fp32", "onnxruntime"), ("openvino_fp32", "openvino"))}
    images = timing_batch(images, b.batch_size)
    with timing_lock.timing(p.path("timing_cache"), "ensemble", p.orchestration.exclusive):
        seconds = {batch: interleaved(runtimes, np.ascontiguousarray(images[:batch]), b, first=batch == 1) for batch in (1, b.batch_size)}
    rows = []
    for batch in (1, b.batch_size):
        for rt, s in seconds[batch].items():
            p25, p50, p75 = (float(v) for v in np.percentile(np.array(s) / batch * 1000.0, [25, 50, 75]))
            rows.append({"runtime": rt, "batch": batch, "p50_ms": round(p50, 3), "p25_ms": round(p25, 3), "p75_ms": round(p75, 3)})
    return {
        "rows": rows,
        "ranking": {f"batch_{bs}": ranking(rows, bs) for bs in (1, b.batch_size)},
        "machine": {"cpu": cpu_model(), "threads": b.threads},
        "settings": round_settings(b),
    }
