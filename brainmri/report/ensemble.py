"""The report's 'Ensemble': the ensemble beside its best single member on CV (cross-fitted), test and the external set,
and whether it is kept."""

from __future__ import annotations

import json

import pandas as pd

from brainmri.config import Params
from brainmri.report.cells import ci
from brainmri.stats.metrics import fmt


def _diff(d: dict) -> str:
    return f"{fmt(d['value'], '+.3f')} [{fmt(d['ci_low'], '+.3f')}, {fmt(d['ci_high'], '+.3f')}]"


def _row(what: str, ensemble: str, best_single: str, difference: str = "") -> dict:
    return {"": what, "Ensemble": ensemble, "Best single member": best_single, "Difference [95% CI]": difference}


def _scored_rows(e: dict) -> list[dict]:
    """AUC and accuracy rows on each set the ensemble was scored on (test, and external when there is one)."""
    rows = []
    for key, label in (("threshold_check_on_val", "Val (threshold check)"), ("test", "Test"), ("external", "External")):
        if key not in e:
            continue
        s = e[key]
        synthetic = ", SYNTHETIC" if s.get("synthetic") else ""
        rows.append(
            _row(
                f"{label} AUC ({s['n_images']} images{synthetic}; best single: {e['best_single']})",
                ci(s["ensemble"]["auc"], pct=False),
                ci(s["best_single"]["auc"], pct=False),
                _diff(s["best_single_auc_difference"]),
            )
        )
        rows.append(_row(f"{label} accuracy %", ci(s["ensemble"]["accuracy"]), ci(s["best_single"]["accuracy"])))
        if key == "threshold_check_on_val":  # the threshold set on CV, checked where it was not set
            for m in ("sensitivity", "specificity"):
                rows.append(_row(f"{label} {m} %", ci(s["ensemble"][m]), ci(s["best_single"][m])))
    return rows


def _latency_rows(e: dict) -> list[dict]:
    """The ensemble's median ms per image in ONNX Runtime and OpenVINO, at batch 1 and the largest batch."""
    lat = {(x["runtime"], x["batch"]): x["p50_ms"] for x in e["latency"]["rows"]}
    big = max(bs for _, bs in lat)
    return [
        _row(
            f"Latency, {rt.replace('_', ' ')} (ms/image, batch 1 / {big}; median)",
            f"{lat[rt, 1]:.1f} / {lat[rt, big]:.1f}",
            "see the latency table",
        )
        for rt in ("onnxruntime_fp32", "openvino_fp32")
    ]


def ensemble_section(p: Params) -> list:
    """The ensemble beside its best single member on CV (cross-fitted), test and the external set, and whether it is kept."""
    e = json.loads((p.path("ensemble") / p.paths.files.ensemble).read_text())
    head = ["## Ensemble", ""]
    if not e["configured"]:
        return [*head, "No ensemble: `ensemble.members` is empty.", ""]
    cv = e["cv"]
    flip = " (each image also mirrored left to right, both scored and averaged)" if e["tta_flip"] else ""
    cv_row = _row(
        "CV AUC, cross-fitted (train+val; best single chosen per fold)",
        f"{cv['ensemble_auc']:.3f}",
        f"{cv['best_single_auc']:.3f}",
        _diff(cv["auc_difference"]),
    )
    members = ", ".join(f"{m} {w:.2f}" for m, w in e["members"].items())
    return [
        *head,
        f"One ONNX graph composed of its members' exported graphs{flip}: the weighted mean of their calibrated probabilities "
        f"(weights {members}), at threshold {e['threshold']:.3f} (Youden's J on the cross-fitted out-of-fold predictions over "
        f"train+val; val is its held-out check). Members and weights were chosen by "
        f"{e['selection']['protocol']}. The CV row is cross-fitted: each fold's images are scored by an ensemble, and by a best "
        "single member, both chosen (and the members' calibration maps refitted) on the other folds, which removes the bias of "
        f"choosing the members and weights. It does not remove everything: {cv['limits']}. Differences are paired, over "
        "duplicate-group bootstrap resamples; on val, test and external the best single member is scored the same way as "
        "the ensemble, at its own threshold. Test is scored from the members' own test predictions (evaluate's files, "
        "without the mirror), so no stage but evaluate opens a test image.",
        "",
        pd.DataFrame([cv_row, *_scored_rows(e), *_latency_rows(e)]),
        "",
        f"**{e['decision'][0].upper()}{e['decision'][1:]}.**",
        "",
    ]
