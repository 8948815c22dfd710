"""The report's 'CPU latency' section: every runtime's time per image by model and batch size, from the benchmark stage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.report.plots import latency_figure, save

RUNTIMES = {
    "keras_predict": "Keras predict",
    "keras_compiled": "Keras compiled",
    "onnxruntime_fp32": "ORT fp32",
    "onnxruntime_int8": "ORT int8",
    "openvino_fp32": "OpenVINO fp32",
    "openvino_bf16": "OpenVINO bf16",
    "openvino_int8": "OpenVINO int8",
}


def rankable(rank: dict) -> str:
    """The report's 'Rankable' cell for one batch size's ranking (brainmri/bench/ranking.py)."""
    if not rank.get("rankable", True):
        return "no: spread too wide"
    ties = "; ".join(" = ".join(pair) for pair in rank.get("tied", []))
    return f"yes (tied: {ties})" if ties else "yes"


def _peak_share(by: dict, runtime: str, bs: int) -> str:
    """A runtime's rate as a share of the GEMM peak, or 'not timed' (a runtime that failed its val check is not timed)."""
    row = by.get((runtime, bs))
    return f"{100 * row['share_of_matmul_peak']:.0f}" if row else "not timed"


def _latency_row(name: str, bs: int, b: dict, e: dict) -> dict:
    """One model at one batch size: b its benchmark record, e its export metrics."""
    by = {(x["runtime"], x["batch"]): x for x in b["rows"]}
    r = b["ratios"][f"batch_{bs}"]
    return {
        "Model": name,
        "Batch": bs,
        **{f"{v} ms": by[k, bs]["p50_ms"] if (k, bs) in by else float("nan") for k, v in RUNTIMES.items()},
        "Fastest passing its val check": b.get("fastest_admissible", {}).get(f"batch_{bs}") or "n/a",
        "ORT fp32 / compiled Keras": f"{r['onnxruntime_fp32_speedup_over_keras_compiled']:.2f}x",
        "int8 / fp32": f"{r['int8_speedup_over_fp32']:.2f}x" if r["int8_speedup_over_fp32"] else "not timed (failed its val check)",
        "fp32 % peak": _peak_share(by, "onnxruntime_fp32", bs),
        "int8 % peak": _peak_share(by, "onnxruntime_int8", bs),
        "Rankable": rankable(b.get("ranking", {}).get(f"batch_{bs}", {})),
        "Timed by": "itself" if b.get("timed", {}).get("by", name) == name else f"{b['timed']['by']} (same graphs)",
        "int8 Δ acc (pts)": f"{e['int8']['accuracy_change_points']:+.1f}",
        "int8 Δ AUC": f"{e['int8']['auc_change']:+.3f}",
    }


def latency_table(p: Params) -> tuple[pd.DataFrame | None, dict]:
    """Per model and batch size: ms per image for each runtime, the fair ratios, and int8's accuracy change; and the
    machine (of the last model's benchmark). None and {} when any model has no benchmark or export record."""
    rows, machine = [], {}
    for name in p.models:
        path, exp = p.model_file("benchmark", name, "benchmark"), p.model_file("export", name, "export_metrics")
        if not (path.is_file() and exp.is_file()):
            return None, {}
        b, e = json.loads(path.read_text()), json.loads(exp.read_text())
        machine = {
            **b["machine"],
            "peak": b["matmul_peak_gflops"],
            "int8_peak": b.get("int8_gemm_peak_gops", float("nan")),
            "tie_iqr": next(iter(b.get("ranking", {}).values()), {}).get("tie_iqr", float("nan")),
        }
        rows += [_latency_row(name, bs, b, e) for bs in b["settings"]["batch_sizes"]]
    return pd.DataFrame(rows), machine


def _machine_note(p: Params, machine: dict) -> str:
    """Where the times were measured, what '% peak' and 'rankable' mean, and (when timings are reused) 'Timed by'."""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads per runtime; TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']}, ONNX Runtime {machine['onnxruntime']}. ONNX Runtime's own GEMM "
        f"reaches {machine['peak']:.0f} GFLOP/s in float32 and {machine['int8_peak']:.0f} GOP/s in uint8 x int8 here; "
        "'% peak' is each ONNX Runtime row's rate as a share of the peak in its precision. The runtimes are timed in "
        "interleaved rounds; a batch size is 'rankable' when every two neighbours in speed are told apart by their "
        "interquartile ranges, or tied: quartiles that overlap while both are narrow (an IQR within "
        f"{machine['tie_iqr']:.0%} of the median)."
        + (
            " A model whose graphs match a sibling's (aug and noaug of one backbone, cut at the same layer) shows the "
            "sibling's timings ('Timed by'): one architecture is timed once, within benchmark.reuse_minutes "
            f"({p.benchmark.reuse_minutes}) on the same machine and boot; each model's val check is its own."
            if p.benchmark.reuse_minutes
            else ""
        )
    )


def latency_section(p: Params, out: Path) -> tuple[pd.DataFrame | None, list]:
    """The latency table and the section's lines, its bar chart drawn into `out`; (None, []) before any benchmark."""
    latency, machine = latency_table(p)
    if latency is None:
        return None, []
    save(latency_figure(latency, list(RUNTIMES.values())), out / "latency.png")
    return latency, [
        "## CPU latency: Keras against ONNX Runtime, measured fairly",
        "",
        "The original study timed `model.evaluate` over the whole test set against `session.run` per batch, which is not "
        "the same work, and reported ONNX 7 to 17 times faster. Here every runtime gets the same preprocessed images at the "
        "same batch sizes, after warm-up, with thread counts set; times are medians of repeated calls, per image.",
        "",
        latency,
        _machine_note(p, machine),
        "",
        "![Latency per image by runtime and batch size](latency.png)",
        "",
    ]
