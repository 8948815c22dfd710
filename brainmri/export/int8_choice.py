"""The int8 settings chosen on val: every candidate of export.int8_calibration_method x export.reduce_range quantized,
scored against fp32 on the validation images, the closest kept, and the choice written into the file."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import onnx

from brainmri.config import Params, candidates
from brainmri.core.machine import cpu_flags
from brainmri.core.progress import log
from brainmri.deploy.onnxrt import probabilities, session
from brainmri.export import ranges_cache
from brainmri.export.quantize import CALIBRATION_BATCH, prepare, quantize
from brainmri.export.record import label_metrics
from brainmri.intake.parts import split_part


def quantize_best(
    p: Params, name: str, fp32: Path, int8: Path, images: list, size: int, threshold: float | None, x_val, p32: np.ndarray
) -> tuple[dict, np.ndarray]:
    """Quantize with every combination of export.int8_calibration_method and export.reduce_range (lists are candidates)
    and keep the one whose int8 probabilities stay closest to fp32's (`p32`) on the validation images `x_val` (mean
    absolute change; ties go to the earlier candidate). Chosen on val, never test: the test figures come after, for the
    chosen file only. An N-class model (threshold None) is scored by arg-max labels. The CPU is recorded because ONNX
    Runtime's int8 kernels, and so the choice, depend on its instructions. Returns the record and the chosen file's
    probabilities on val. A method's ranges come from the frozen base's cache when a sibling calibrated them
    (brainmri.export.ranges_cache)."""
    y = split_part(p, "val").y
    m32 = label_metrics(y, p32, threshold)
    combos = list(itertools.product(candidates(p.export.int8_calibration_method), candidates(p.export.reduce_range)))
    cache = p.path("onnx_cache")
    scores, probs = [], []
    with tempfile.TemporaryDirectory() as tmp:  # one pre-processing, and one calibration per method, for every candidate
        prep = prepare(fp32, Path(tmp) / "prep.onnx")
        ranges = {m: Path(tmp) / f"{m}.json" for m, _ in combos}
        graph = onnx.load(str(prep)).graph  # read once for every method's key and entry
        keys = {m: ranges_cache.ranges_key(graph, images, size, m, CALIBRATION_BATCH) for m in ranges}
        cached = {m: ranges_cache.restore(cache, keys[m], ranges[m]) for m in ranges}
        for i, (method, reduce_range) in enumerate(combos):
            target = int8 if len(combos) == 1 else int8.with_name(f"candidate{i}.onnx")
            how = "its base's cached ranges" if cached[method] else f"calibrated on {len(images)} training images"
            log.info("export %s: quantizing to int8 (%s, reduce_range %s), %s", name, method, reduce_range, how)
            quantize(fp32, target, images, size, method, reduce_range, ranges[method], prep)
            ranges_cache.keep(cache, keys[method], ranges[method], graph)
            probs.append(probabilities(session(target), x_val))
            scores.append(candidate_score(method, reduce_range, y, probs[-1], p32, m32, threshold))
    best = min(range(len(combos)), key=lambda i: (scores[i]["val_mean_abs_prob_change"], i))
    keep_candidate(int8, best, len(combos))
    stamp_choice(int8, combos[best][1])
    record = {
        "protocol": f"every candidate quantized and scored on the {len(y)} validation images; test never read for the choice",
        "criterion": "smallest mean |p_int8 - p_fp32| on val; ties go to the earlier candidate",
        "cpu_flags": cpu_flags(),
        "candidates": scores,
        "chosen": {k: scores[best][k] for k in ("calibration_method", "reduce_range")},
    }
    return record, probs[best]


def candidate_score(method: str, reduce_range: bool, y, p8: np.ndarray, p32: np.ndarray, m32: dict, threshold: float | None) -> dict:
    """How far one candidate's int8 probabilities `p8` moved from fp32's `p32` (metrics `m32`) on val."""
    m8 = label_metrics(y, p8, threshold)
    return {
        "calibration_method": method,  # the key export.json has always had (the param is export.int8_calibration_method)
        "reduce_range": reduce_range,
        "val_mean_abs_prob_change": round(float(np.mean(np.abs(p8 - p32))) if len(p32) else 0.0, 5),
        "val_accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
        "val_auc_change": round(m8["auc"] - m32["auc"], 4),
    }


def keep_candidate(int8: Path, best: int, n: int) -> None:
    """With more than one candidate: the best one's file becomes `int8`, the others are removed."""
    if n > 1:
        for i in range(n):
            path = int8.with_name(f"candidate{i}.onnx")
            if i == best:
                path.replace(int8)
            else:
                path.unlink()


def stamp_choice(int8: Path, reduce_range: bool) -> None:
    """In the file itself: predict warns when 8-bit weights meet a CPU without VNNI, where u8 x s8 products saturate."""
    proto = onnx.load(int8)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(int8_reduce_range=str(reduce_range), int8_chosen_on_cpu_flags=",".join(cpu_flags()))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, int8)
