"""benchmark.json from the timed rows: the fastest admissible runtime, the ranking at each batch size, the speed-ups."""

from __future__ import annotations

from brainmri.bench.ranking import ranking
from brainmri.bench.timing import round_settings
from brainmri.config import Params
from brainmri.core.progress import log


def fastest_admissible(rows: list[dict], fidelity: dict, batches: tuple[int, ...]) -> dict:
    """Per batch size, the fastest runtime whose val check passed (None when none did)."""
    return {
        f"batch_{bs}": min(
            (r for r in rows if r["batch"] == bs and fidelity.get(r["runtime"], {}).get("admissible")),
            key=lambda r: r["p50_ms"],
            default={"runtime": None},
        )["runtime"]
        for bs in batches
    }


def speedups(rows: list[dict], batches: tuple[int, ...]) -> dict:
    """Per batch size, ONNX Runtime fp32 against compiled Keras, and int8 against fp32 (ratios of medians; None where
    int8 failed its val check and was not timed)."""
    med = {(r["runtime"], r["batch"]): r["p50_ms"] for r in rows}

    def ratio(slow: str, fast: str, bs: int):
        return round(med[slow, bs] / med[fast, bs], 2) if (slow, bs) in med and (fast, bs) in med else None

    return {
        f"batch_{bs}": {
            "onnxruntime_fp32_speedup_over_keras_compiled": ratio("keras_compiled", "onnxruntime_fp32", bs),
            "int8_speedup_over_fp32": ratio("onnxruntime_fp32", "onnxruntime_int8", bs),
        }
        for bs in batches
    }


def benchmark_record(p: Params, name: str, size: int, flops: int, memo: dict, key: str, fidelity: dict, machine: dict) -> dict:
    """benchmark.json: the timed rows (`memo`, this model's or a sibling's), their rankings and ratios, the peaks, the
    val check and the machine; a warning when a batch size's spread is too wide to rank."""
    b = p.benchmark
    batches = (1, b.batch_size)
    rows, gemm, peak = memo["rows"], memo["gemm"], memo["numpy_peak"]
    timed = {"by": memo["model"], "at": memo["measured_at"], "reused": memo["model"] != name, "window": memo.get("window")}
    fastest = fastest_admissible(rows, fidelity, batches)
    ranks = {f"batch_{bs}": ranking(rows, bs) for bs in batches}
    too_wide = [k for k, v in ranks.items() if not v["rankable"]]
    if too_wide:
        log.warning(
            "benchmark %s: the spread is too wide to rank %s at %s", name, ranks[too_wide[0]]["not_told_apart"], ", ".join(too_wide)
        )
    return {
        "model": name,
        "input_size": size,
        "flops_per_image": flops,
        "gflop_per_image": round(flops / 1e9, 3),
        "matmul_peak_gflops": round(gemm["fp32"], 1),  # ONNX Runtime's fp32 GEMM: the '% peak' of fp32 rows
        "int8_gemm_peak_gops": round(gemm["int8"], 1),  # its uint8 x int8 GEMM: the '% peak' of int8 rows
        "numpy_matmul_peak_gflops": round(peak, 1),  # numpy's BLAS, for comparison: not what any runtime here calls
        "rows": rows,
        "ratios": speedups(rows, batches),
        "ranking": ranks,
        "timed": {**timed, "key": key},  # which model's stage measured these graphs, when; reused: a sibling's, same graphs
        "fidelity_on_val": fidelity,
        "fastest_admissible": fastest,  # the fastest runtime whose val check passed: what `predict --runtime` should use here
        "spread_too_wide": bool(too_wide),
        "machine": machine,
        "settings": {"batch_sizes": [1, b.batch_size], **round_settings(b)},
    }
